"""``--transport mpi``: blocking ``mpi4py`` collectives under ``mpiexec`` (:mod:`lossympi.baselines.mpi`, the code
that ``python -m lossympi.bench gather`` measures).

No deadline: every step waits for the slowest worker, and a stalled worker stalls the run; ``timeout`` and
``deadline`` are accepted and ignored. The event loop is blocked during a collective.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.transport._shared import ReliableServer, ReliableWorker, report_of
from aggregathor.transport.base import META_LIMIT, GatherReport, ParamsReport, decode_meta, encode_meta
from lossympi.baselines.mpi import MPIRoot, MPISender

__all__ = ["MPIServer", "MPIWorker"]


class MPIServer(ReliableServer):
    """Rank 0's side over :class:`lossympi.baselines.mpi.MPIRoot` (``comm``: the MPI communicator, default
    ``COMM_WORLD``)."""

    def __init__(self, comm: Any = None) -> None:
        self.root = MPIRoot(comm, message_limit=META_LIMIT)
        self.size = self.root.size

    async def announce(self, meta: dict[str, Any]) -> None:
        self.root.bcast_bytes(encode_meta(meta))

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        self.root.bcast(theta)
        return ParamsReport()  # MPI's reliable broadcast: no datagrams

    async def gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        return report_of(self.root.gather(rows), rows, 0.0)  # nothing is ever lost

    def close(self) -> None:
        pass  # MPI_Finalize runs at exit (mpi4py)


class MPIWorker(ReliableWorker):
    """A worker's side over :class:`lossympi.baselines.mpi.MPISender`."""

    def __init__(self, comm: Any = None) -> None:
        self.sender = MPISender(comm, message_limit=META_LIMIT)
        self.rank = self.sender.rank
        self.size = self.sender.size

    async def next_message(self) -> dict[str, Any]:
        return decode_meta(self.sender.recv_bytes())

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        self.sender.recv(theta)
        return 1.0

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        self.sender.send(grad)

    def close(self) -> None:
        pass  # MPI_Finalize runs at exit (mpi4py)
