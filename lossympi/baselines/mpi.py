"""MPI baseline: blocking ``mpi4py`` buffer collectives under ``mpiexec``.

Small messages travel as a ``Bcast`` of a fixed-size byte buffer (a length, then the bytes: nothing is
pickled), parameters as a ``Bcast`` of the array, gradients as a ``Gather`` into rank 0's rows. A blocking
collective has no deadline: it returns once every rank took part, so **every gather waits for the slowest
sender** (a crashed or stalled one stalls the job), the weakness lossympi addresses. The calling thread (and
its event loop) is blocked during a collective.

:class:`MPIRoot` is rank 0's end, :class:`MPISender` a sender's. Used by aggregathor's ``--transport mpi`` and by
``python -m lossympi.bench gather``. ``mpi4py`` is imported when one is built (``pip install mpi4py``, or the
``[mpi]`` extra).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np

from lossympi.baselines.frames import BaselineError, Gathered, bytes_of

__all__ = ["MESSAGE_LIMIT", "MPIRoot", "MPISender", "import_mpi"]

#: Default largest small message (:meth:`MPIRoot.bcast_bytes`), bytes.
MESSAGE_LIMIT = 4096
_U64 = struct.Struct("<Q")


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a BaselineError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise BaselineError("the MPI baseline needs mpi4py, which is not installed: pip install mpi4py "
                            "(or the project's [mpi] extra)") from None
    return MPI


class _Group:
    """This rank of an MPI communicator (``COMM_WORLD`` by default) and its small-message buffer."""

    def __init__(self, comm: Any = None, *, message_limit: int = MESSAGE_LIMIT) -> None:
        self.MPI = import_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.message_limit = int(message_limit)
        self._buf = np.zeros(_U64.size + self.message_limit, np.uint8)

    def _bcast_buf(self) -> bytes:
        self.comm.Bcast([self._buf, self.MPI.BYTE], root=0)
        (n,) = _U64.unpack(self._buf[:_U64.size].tobytes())
        if n > self.message_limit:
            raise BaselineError(f"a message of {n} bytes (limit {self.message_limit})")
        return self._buf[_U64.size:_U64.size + n].tobytes()

    def barrier(self) -> None:
        self.comm.Barrier()

    def library(self) -> dict[str, str]:
        """The MPI library's and mpi4py's versions."""
        import mpi4py

        return {"library": self.MPI.Get_library_version().splitlines()[0], "mpi4py": mpi4py.__version__}


class MPIRoot(_Group):
    """Rank 0's end."""

    def bcast_bytes(self, data: bytes) -> None:
        """Send a small message (at most ``message_limit`` bytes) to every rank (:meth:`MPISender.recv_bytes`)."""
        if len(data) > self.message_limit:
            raise ValueError(f"a message of {len(data)} bytes exceeds the limit of {self.message_limit}")
        self._buf[:_U64.size] = np.frombuffer(_U64.pack(len(data)), np.uint8)
        self._buf[_U64.size:_U64.size + len(data)] = np.frombuffer(data, np.uint8)
        self._bcast_buf()

    def bcast(self, theta: np.ndarray) -> None:
        """Send ``theta`` to every rank."""
        bytes_of(theta)  # C-contiguous
        self.comm.Bcast(theta, root=0)

    def gather(self, rows: np.ndarray) -> Gathered:
        """Every sender's row ``r`` into ``rows[r]`` (``rows[0]`` is left as it is); waits for every sender."""
        if rows.ndim != 2 or rows.shape[0] != self.size:
            raise ValueError(f"rows must be ({self.size}, d), got {rows.shape}")
        bytes_of(rows)
        t0 = time.monotonic()
        self.comm.Gather(self.MPI.IN_PLACE, rows, root=0)
        elapsed = time.monotonic() - t0
        n = self.size - 1
        return Gathered(np.ones(n), elapsed, [elapsed] * n, 0)


class MPISender(_Group):
    """A sender's end."""

    def recv_bytes(self) -> bytes:
        """Rank 0's next small message (:meth:`MPIRoot.bcast_bytes`)."""
        return self._bcast_buf()

    def recv(self, theta: np.ndarray) -> None:
        """Receive rank 0's ``theta`` (:meth:`MPIRoot.bcast`) into ``theta``."""
        bytes_of(theta)
        self.comm.Bcast(theta, root=0)

    def send(self, row: np.ndarray) -> None:
        """Send ``row`` to rank 0's gather (:meth:`MPIRoot.gather`)."""
        bytes_of(row)
        self.comm.Gather(row, None, root=0)
