"""``--transport grpc``: ``grpcio``, a server on rank 0 with two streaming RPCs of raw bytes
(:mod:`lossympi.baselines.grpc`, the code that ``python -m lossympi.bench gather`` measures).

Workers pull the parameters (a stream of replies) and push their gradients (a stream of requests), in chunks of
1 MiB; every message is authenticated under a key derived from the pair key. Step messages go over the
baseline's authenticated control star, as for ``tcp``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.transport._shared import StarServer, StarWorker
from aggregathor.transport.base import ParamsReport
from lossympi.baselines.grpc import GrpcRoot, GrpcSender

__all__ = ["GrpcServer", "GrpcWorker"]


class GrpcServer(StarServer):
    """Rank 0's side over :class:`lossympi.baselines.grpc.GrpcRoot` (``world``, ``lost_row_fill``: see
    :class:`~aggregathor.transport._shared.StarServer`; ``**kwargs``: the GrpcRoot's settings)."""

    root: GrpcRoot

    def __init__(self, world: Any, *, lost_row_fill: float = 0.0, **kwargs: Any) -> None:
        super().__init__(GrpcRoot(world, **kwargs), lost_row_fill=lost_row_fill)

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        """Publishes the parameters; every worker pulls every byte (``timeout`` is not used)."""
        self._round += 1
        await self.root.publish(theta, self._round)
        return ParamsReport()  # a reliable stream: no datagrams


class GrpcWorker(StarWorker):
    """A worker's side over :class:`lossympi.baselines.grpc.GrpcSender` (``**kwargs`` are its settings)."""

    sender: GrpcSender

    def __init__(self, world: Any, **kwargs: Any) -> None:
        super().__init__(GrpcSender(world, **kwargs))

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        """Reliable: every byte arrives (``timeout`` is not used; ``stall_timeout`` bounds the call)."""
        self._round += 1
        await self.sender.pull(theta, self._round)
        return 1.0

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        await self.sender.push(grad, self._round)
