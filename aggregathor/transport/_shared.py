"""What several backends share: the report of a baseline's gather, the refusal of the honest-gradient side channel,
and the server and worker bases of the reliable baselines (tcp, grpc, mpi: no elasticity, no protocol counters)."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.transport.base import Capability, FaultCounters, GatherReport, decode_meta, encode_meta
from lossympi.baselines import Gathered


def report_of(got: Gathered, rows: np.ndarray, lost_row_fill: float) -> GatherReport:
    """The step's report of a baseline's gather; the rows that did not arrive are set to ``lost_row_fill``
    (one "chunk" per gradient)."""
    n = got.delivered.size
    for r in np.flatnonzero(got.delivered == 0):
        rows[r + 1] = lost_row_fill
    return GatherReport(got.delivered, int(n - got.delivered.sum()), n, got.elapsed, list(got.complete),
                        got.rejected)


class ReliableServer:
    """Server-side behaviour every reliable baseline shares: every worker is always there."""

    capabilities: frozenset[Capability] = frozenset()

    def missing_workers(self) -> list[int]:
        """Always empty: a baseline does not track crashed workers (it waits for them, or loses their rows)."""
        return []

    def fault_counters(self) -> FaultCounters:
        """All zero: no elastic control channel, no rejoin."""
        return FaultCounters()


class NoHonestGradients:
    """A worker side without :attr:`Capability.HONEST_GRADIENTS`: asking for them is a clear error."""

    async def honest_gradients(self) -> np.ndarray:
        raise RuntimeError(f"{type(self).__name__} has no side channel to the honest gradients "
                           f"({Capability.HONEST_GRADIENTS} is for the simulated backend)")


class ReliableWorker(NoHonestGradients):
    """Worker-side behaviour every reliable baseline shares."""

    capabilities: frozenset[Capability] = frozenset()


class StarServer(ReliableServer):
    """Rank 0's side of a baseline with a control star (tcp, grpc): step messages over ``root.control``, gathers
    of the current round; the subclass sends the parameters (and counts the rounds).

    Parameters
    ----------
    root : lossympi.baselines.tcp.TCPRoot or lossympi.baselines.grpc.GrpcRoot
        The baseline's root end, built on this rank's world (addresses, pair keys, the control listener).
    lost_row_fill : float
        Value of the row of a gradient that missed the deadline (NaN marks it lost for NaN-robust rules).
    """

    def __init__(self, root: Any, *, lost_row_fill: float) -> None:
        self.root = root
        self.size = root.size
        self.lost_row_fill = lost_row_fill
        self._round = -1

    async def announce(self, meta: dict[str, Any]) -> None:
        await self.root.connect()
        await self.root.control.bcast_bytes(encode_meta(meta))

    async def gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        return report_of(await self.root.gather(rows, self._round, deadline), rows, self.lost_row_fill)

    def close(self) -> None:
        self.root.close()


class StarWorker(ReliableWorker):
    """A worker's side of a baseline with a control star (tcp, grpc): step messages from ``sender.control``."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender
        self.rank = sender.rank
        self.size = sender.size
        self._round = -1

    async def next_message(self) -> dict[str, Any]:
        await self.sender.connect()
        return decode_meta(await self.sender.control.bcast_bytes(None))

    def close(self) -> None:
        self.sender.close()
