"""The set-up the TCP and gRPC baselines share: rank 0's star of authenticated control links
(:class:`lossympi.control.TCPControl`), data keys derived from the pair keys, and a one-time set-up of the data
path (:meth:`Star.connect`)."""

from __future__ import annotations

import abc
import asyncio
from typing import Any

from lossympi.baselines.frames import subkey
from lossympi.control import TCPControl

__all__ = ["Star"]


class Star(abc.ABC):
    """One rank's end of a baseline: its control star, its data keys and its data path's set-up.

    Parameters
    ----------
    world : lossympi.bootstrap.World
        Addresses, pair keys and (rank 0) the control listener.
    label : bytes
        Names the baseline: its data keys are derived from the pair keys under it.
    control_timeout : float
        Seconds for the star to form and for any control operation.
    stall_timeout : float
        Seconds a reliable transfer may stall (a worker not reading its parameters, a server not sending them)
        before the connection is given up.
    """

    def __init__(self, world: Any, label: bytes, *, control_timeout: float = 120.0,
                 stall_timeout: float = 60.0) -> None:
        self.rank = world.rank
        self.size = world.size
        self.host = world.addresses[0][0]
        self.keys = {r: subkey(k, label) for r, k in world.keys.items()}
        #: the reliable, authenticated control star (step messages, commands, the data port's announcement)
        self.control = TCPControl(world.rank, world.size, world.addresses, world.keys, world.control,
                                  timeout=control_timeout)
        self.control_timeout = control_timeout
        self.stall_timeout = stall_timeout
        self._ready: asyncio.Future | None = None

    async def connect(self) -> None:
        """Form the control star and the data path (once; every exchange calls it)."""
        if self.size == 1:
            return
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._setup())
        await asyncio.shield(self._ready)

    @abc.abstractmethod
    async def _setup(self) -> None:
        """Open this rank's data path (after the control star formed)."""

    def close(self) -> None:
        self.control.close()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
