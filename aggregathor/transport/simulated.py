"""The simulated backend: every rank in one process, the network emulated in memory.

:class:`SimNetwork` holds what the ranks of one run share; :meth:`SimNetwork.server` and :meth:`SimNetwork.worker`
give each rank its side (:class:`SimServer`, :class:`SimWorker`, on the interfaces of
:mod:`aggregathor.transport.base`). Data is lost the way lossympi loses it: every tensor is cut into the same
chunks as on the wire (:func:`lossympi.wire.stride_for` of a default datagram), each rank's seeded
:class:`lossympi.faults.FaultInjector` (seed :func:`lossympi.faults.rank_seed`, as on the wire) decides which
chunks are dropped, the missing chunks of a gradient get the fill policy, a gradient of which nothing arrived is
``cfg.lost_row_fill``, and a worker keeps the last value of the parameter chunks it missed.

Byzantine workers here are **omniscient**, as in the papers' threat model: :meth:`SimWorker.honest_gradients`
(:attr:`~aggregathor.transport.base.Capability.HONEST_GRADIENTS`) hands them the gradients the honest workers
computed in the same step (before any loss), once every honest worker has sent its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from aggregathor.config import TrainConfig
from aggregathor.transport.base import Capability, FaultCounters, GatherReport, ParamsReport

__all__ = ["SimNetwork", "SimServer", "SimWorker"]


class SimNetwork:
    """The state the simulated ranks of one run share: queues, this step's parameters and gradients, the losses.

    Parameters
    ----------
    cfg : TrainConfig
        The run: ``workers``, ``loss`` (each chunk's drop probability), ``fill``, ``seed``, ``byzantine``.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        from lossympi.faults import FaultInjector, FaultSpec, rank_seed
        from lossympi.wire import DEFAULT_DATAGRAM_BYTES, stride_for

        self.cfg = cfg
        self.n = cfg.workers
        self.lost_row_fill = cfg.lost_row_fill
        self.stride_elems = stride_for(DEFAULT_DATAGRAM_BYTES) // 4
        spec = FaultSpec(drop=cfg.loss)
        self.down = FaultInjector(spec, seed=rank_seed(cfg.seed, 0))  # the server's sends (parameters)
        self.up = {r: FaultInjector(spec, seed=rank_seed(cfg.seed, r)) for r in range(1, self.n + 1)}
        self.messages: dict[int, asyncio.Queue[dict[str, Any]]] = {r: asyncio.Queue() for r in range(1, self.n + 1)}
        self.theta: np.ndarray | None = None
        self.param_masks: dict[int, np.ndarray] = {}  # this step's parameter chunks that reach each worker
        self.theta_ready = asyncio.Event()
        self.rows: np.ndarray | None = None
        self.arrived: dict[int, tuple[float, int, int]] = {}  # rank -> (delivered fraction, lost chunks, chunks)
        self.all_arrived = asyncio.Event()
        self.honest: dict[int, np.ndarray] = {}  # this step's honest gradients, before loss (the side channel)
        self.honest_ready = asyncio.Event()
        self.rng = np.random.default_rng(cfg.seed)

    def server(self) -> SimServer:
        return SimServer(self)

    def worker(self, rank: int) -> SimWorker:
        if not 1 <= rank <= self.n:
            raise ValueError(f"worker rank {rank} is not in 1..{self.n}")
        return SimWorker(self, rank)

    def new_step(self) -> None:
        """Forget the previous step's exchanges."""
        for event in (self.theta_ready, self.all_arrived, self.honest_ready):
            event.clear()
        self.arrived.clear()
        self.honest.clear()

    def element_mask(self, injector: Any, peer: int, size: int) -> tuple[np.ndarray, int, int]:
        """Which elements of a ``size``-element message to ``peer`` arrive; its lost chunks and its chunks."""
        count = max(1, -(-size // self.stride_elems))
        chunks = injector.plan(peer, count).clean_delivered()
        mask = np.repeat(chunks, self.stride_elems)[:size]
        return mask, int(count - chunks.sum()), count


class SimServer:
    """Rank 0's side of the simulated exchanges (:class:`aggregathor.transport.base.ServerTransport`)."""

    capabilities: frozenset[Capability] = frozenset()

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self.size = net.n + 1

    async def announce(self, meta: dict[str, Any]) -> None:
        self.net.new_step()
        for q in self.net.messages.values():
            q.put_nowait(dict(meta))

    async def send_params(self, theta: np.ndarray, timeout: float) -> ParamsReport:
        net, report = self.net, ParamsReport()
        net.theta = theta.copy()
        for r in range(1, net.n + 1):  # the losses are drawn here, as lossympi's injector draws them at the send
            net.param_masks[r], lost, count = net.element_mask(net.down, r, theta.size)
            report.chunks += count
            report.lost_chunks += lost
        net.theta_ready.set()
        return report

    async def gather(self, rows: np.ndarray, deadline: float) -> GatherReport:
        net = self.net
        net.rows = rows
        await net.all_arrived.wait()
        delivered = np.array([net.arrived[r][0] for r in range(1, net.n + 1)])
        lost = sum(v[1] for v in net.arrived.values())
        chunks = sum(v[2] for v in net.arrived.values())
        return GatherReport(delivered, lost, chunks, 0.0, [0.0] * int(np.sum(delivered == 1.0)), 0)

    def missing_workers(self) -> list[int]:
        return []

    def fault_counters(self) -> FaultCounters:
        return FaultCounters()

    def close(self) -> None:
        pass


class SimWorker:
    """A worker's side of the simulated exchanges (:class:`aggregathor.transport.base.WorkerTransport`)."""

    capabilities: frozenset[Capability] = frozenset({Capability.HONEST_GRADIENTS})

    def __init__(self, net: SimNetwork, rank: int) -> None:
        self.net = net
        self.rank = rank
        self.size = net.n + 1

    async def next_message(self) -> dict[str, Any]:
        return await self.net.messages[self.rank].get()

    async def recv_params(self, theta: np.ndarray, timeout: float) -> float:
        net = self.net
        await net.theta_ready.wait()
        assert net.theta is not None
        mask = net.param_masks[self.rank]
        theta[mask] = net.theta[mask]  # what is missing keeps its last value ("last" fill)
        return float(mask.mean()) if mask.size else 1.0

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        from lossympi.fill import apply_fill

        net = self.net
        if net.rows is None:
            raise RuntimeError("a simulated worker sent its gradient before the server gathered")
        if not net.cfg.is_byzantine(self.rank):  # an honest worker: the colluders see its gradient
            net.honest[self.rank] = grad.copy()
            if len(net.honest) == net.n - net.cfg.byzantine:
                net.honest_ready.set()
        mask, lost, count = net.element_mask(net.up[self.rank], 0, grad.size)
        row = net.rows[self.rank]
        row[...] = grad
        if lost == count:
            row[...] = net.lost_row_fill
        elif lost:
            apply_fill(net.cfg.fill, row, mask, rng=net.rng)
        net.arrived[self.rank] = (float(mask.mean()) if mask.size else 1.0, lost, count)
        if len(net.arrived) == net.n:
            net.all_arrived.set()

    async def honest_gradients(self) -> np.ndarray:
        """The colluders' side channel: the ``(n - byzantine, d)`` honest gradients of the current step, once
        every honest worker has computed its own (rank order)."""
        net = self.net
        if net.n == net.cfg.byzantine:
            raise ValueError("no honest worker: there is nothing to observe")
        await net.honest_ready.wait()
        return np.stack([net.honest[r] for r in sorted(net.honest)])

    def close(self) -> None:
        pass
