"""``python -m aggregathor.bench``: run one benchmark of aggregathor.

A subcommand is a module of :mod:`aggregathor.bench` with ``HELP``, ``add_arguments``, optionally
``check_arguments``, ``run`` and ``render`` (see :func:`lossympi.bench.common.run_cli`, which both packages'
benchmarks share). The exit status is 0, or 1 when the result lists ``failed`` measurements (the output is
printed anyway), or 2 for bad flags.
"""

from __future__ import annotations

import os
import sys

# TensorFlow's C++ start-up chatter would bury the progress messages; an explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lossympi.bench.common import run_cli  # noqa: E402

#: Subcommand name -> module implementing it.
SUBCOMMANDS: dict[str, str] = {
    "gars": "aggregathor.bench.gars",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("aggregathor.bench", "Benchmarks of aggregathor.", SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
