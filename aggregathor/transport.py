"""How the parameter server and the workers exchange a step: one interface, several transports.

A synchronous step is three exchanges, all rooted at rank 0 (the parameter server):

1. ``control(meta)``: reliable broadcast of a small JSON message (the step number, or ``stop``);
2. ``params(theta)``: the parameters, from the server to every worker (lossy with ``last`` fill, or
   reliable);
3. ``grads(grad, rows, deadline)``: every worker's gradient into row ``rank`` of the server's
   ``(1 + n, d)`` buffer, until the deadline.

:class:`LossympiTransport` is the default (authenticated UDP, deadline-bound, what is missing is filled and
reported). The reliable baselines of the paper's comparison implement the same interface.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["GatherReport", "LossympiTransport", "StepTransport", "decode_meta", "encode_meta"]

META_LIMIT = 4096


@dataclass
class GatherReport:
    """What the server got from the workers in one step."""

    delivered: np.ndarray  # (n,) fraction of each worker's gradient that arrived
    lost_chunks: int = 0
    chunks: int = 0
    elapsed: float = 0.0
    complete_elapsed: list[float] = field(default_factory=list)  # arrival time of complete gradients
    rejected: int = 0

    @property
    def lost_fraction(self) -> float:
        return self.lost_chunks / self.chunks if self.chunks else 0.0


class StepTransport(Protocol):
    rank: int
    size: int

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]: ...

    async def params(self, theta: np.ndarray, timeout: float) -> float: ...

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        ...

    def close(self) -> None: ...


def encode_meta(meta: dict[str, Any]) -> bytes:
    data = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > META_LIMIT:
        raise ValueError(f"step metadata of {len(data)} bytes exceeds {META_LIMIT}")
    return data


def decode_meta(data: bytes) -> dict[str, Any]:
    """Parse step metadata (JSON object of scalars only; nothing is ever unpickled or executed)."""
    if len(data) > META_LIMIT:
        raise ValueError("step metadata too large")
    meta = json.loads(data.decode())
    if not isinstance(meta, dict) or not all(isinstance(v, int | float | str | bool | None) for v in meta.values()):
        raise ValueError("step metadata must be a JSON object of scalars")
    return meta


class LossympiTransport:
    """The step exchanges over a :class:`lossympi.comm.Comm`.

    Parameters
    ----------
    comm : lossympi.comm.Comm
        The communicator (rank 0 is the server).
    params_mode : {"lossy", "reliable"}
        ``lossy``: parameters travel as datagrams; a worker fills what is missing with the value it last
        received (``last``). ``reliable``: over the authenticated TCP control channel.
    fill : str
        Fill policy for the missing chunks of a gradient.
    lost_row_fill : float
        Value of a gradient that missed the deadline entirely (NaN marks it lost for NaN-robust rules).
    """

    def __init__(self, comm: Any, params_mode: str = "lossy", fill: str = "zero",
                 lost_row_fill: float = 0.0) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size
        self.params_mode = params_mode
        self.fill = fill
        self.lost_row_fill = lost_row_fill

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        data = await self.comm.aio.bcast_bytes(encode_meta(meta) if self.rank == 0 and meta is not None else None)
        return decode_meta(data)

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        if self.params_mode == "reliable":
            data = await self.comm.aio.bcast_bytes(theta.tobytes() if self.rank == 0 else None)
            if self.rank != 0:
                if len(data) != theta.nbytes:
                    raise ValueError(f"parameters of {len(data)} bytes, expected {theta.nbytes}")
                theta[...] = np.frombuffer(data, theta.dtype).reshape(theta.shape)
            return 1.0
        res = await self.comm.aio.Bcast(theta, 0, timeout=timeout, fill="last", tensor_id=1)
        return res.delivered

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        t0 = time.monotonic()
        if self.rank != 0:
            assert grad is not None
            await self.comm.aio.Gather(grad, None, 0, deadline=deadline, tensor_id=2)
            return None
        assert rows is not None
        res = await self.comm.aio.Gather(rows[0], rows, 0, deadline=deadline, fill=self.fill, tensor_id=2)
        n = self.size - 1
        delivered = np.ones(n)
        lost = chunks = rejected = 0
        complete: list[float] = []
        for r, rr in res.results.items():
            delivered[r - 1] = rr.delivered
            lost += rr.lost_chunks
            chunks += rr.chunk_mask.size
            rejected += rr.rejected
            if rr.complete:
                complete.append(rr.elapsed)
            elif rr.received == 0:
                rows[r] = self.lost_row_fill  # missed the deadline entirely: a lost gradient
        return GatherReport(delivered, lost, chunks, time.monotonic() - t0, complete, rejected)

    def close(self) -> None:
        self.comm.close()
