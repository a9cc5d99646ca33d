"""What one rank runs: the parameter server (rank 0) or a worker, and the logging set-up of a rank process.

The loops live in :mod:`aggregathor.server` (:class:`~aggregathor.server.ParameterServer`) and
:mod:`aggregathor.worker`; this module re-exports their entry points for the launcher.
"""

from __future__ import annotations

import logging
import os

from aggregathor.deadline import Deadline
from aggregathor.server import ParameterServer, build_optimizer, run_server
from aggregathor.summary import RunSummary
from aggregathor.worker import run_worker

__all__ = ["Deadline", "ParameterServer", "RunSummary", "build_optimizer", "configure_logging", "run_server",
           "run_worker"]


def configure_logging() -> None:
    """Log at ``$AGGREGATHOR_LOG`` (default WARNING), each line naming the process."""
    logging.basicConfig(level=os.environ.get("AGGREGATHOR_LOG", "WARNING"),
                        format="%(asctime)s %(name)s rank=%(process)d %(levelname)s %(message)s")
