"""``--transport tcp``: raw TCP sockets, a star at rank 0 (:mod:`lossympi.baselines.tcp`, the code that
``python -m lossympi.bench gather`` measures).

Step messages go over the baseline's authenticated control star (:class:`lossympi.control.TCPControl`, the same
reliable channel as lossympi's, so the comparison measures the data path); parameters and gradients over the
authenticated data connections. A gradient that misses the deadline is lost (its row is the lost fill).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregathor.transport._shared import StarServer, StarWorker
from aggregathor.transport.base import ParamsReport
from lossympi.baselines.tcp import TCPRoot, TCPSender

__all__ = ["TCPServer", "TCPWorker"]


class TCPServer(StarServer):
    """Rank 0's side over :class:`lossympi.baselines.tcp.TCPRoot` (``world``, ``lost_row_fill``: see
    :class:`~aggregathor.transport._shared.StarServer`; ``**kwargs``: the TCPRoot's settings)."""

    root: TCPRoot

    def __init__(self, world: Any, *, lost_row_fill: float = 0.0, **kwargs: Any) -> None:
        super().__init__(TCPRoot(world, **kwargs), lost_row_fill=lost_row_fill)

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        """Reliable: every worker gets every byte (``timeout`` is not used; ``stall_timeout`` bounds a stall)."""
        self._round += 1
        await self.root.bcast(theta, self._round)
        return ParamsReport()  # a reliable stream: no datagrams


class TCPWorker(StarWorker):
    """A worker's side over :class:`lossympi.baselines.tcp.TCPSender` (``**kwargs`` are its settings)."""

    sender: TCPSender

    def __init__(self, world: Any, **kwargs: Any) -> None:
        super().__init__(TCPSender(world, **kwargs))

    async def next_message(self) -> dict[str, Any]:
        meta = await super().next_message()
        if meta.get("stop"):
            await self.sender.cancel_send()  # a last gradient that nobody will read
        return meta

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        """Reliable: every byte arrives (``timeout`` is not used; ``stall_timeout`` bounds a stall)."""
        self._round += 1
        await self.sender.recv(theta, self._round)
        return 1.0

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        """Starts the gradient on its way (a late one leaves when rank 0 reads again; it is then discarded)."""
        await self.sender.send(grad, self._round)
