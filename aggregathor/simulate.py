"""``--simulate``: the server and every worker in one process, the network emulated.

The same server and worker loops as a real run (:mod:`aggregathor.runtime`) run as asyncio tasks over
:class:`SimTransport`, an in-memory transport that loses data the way lossympi does: every tensor is cut
into the same chunks as on the wire (1424-byte payloads), lossympi's seeded fault injector decides which
chunks are dropped, the missing chunks of a gradient get the fill policy, and a worker keeps the last value
of the parameter chunks it missed. Nothing touches a socket, so research sweeps run fast and reproducibly.

Byzantine workers here are **omniscient**, as in the papers' threat model: :meth:`SimTransport.honest_gradients`
is their side channel, which hands them the gradients the honest workers computed in the same step (before any
loss), and they wait for those before they attack. In multi-process runs they estimate them instead (see
:func:`aggregathor.runtime.run_worker`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from aggregathor.config import TrainConfig
from aggregathor.runtime import RunSummary, run_server, run_worker, worker_role
from aggregathor.transport import GatherReport

__all__ = ["SimTransport", "simulate"]


class _Hub:
    """State shared by the simulated ranks of one run."""

    def __init__(self, cfg: TrainConfig) -> None:
        from lossympi import _core
        from lossympi.faults import FaultInjector, FaultSpec
        from lossympi.wire import DEFAULT_DATAGRAM_BYTES

        self.cfg = cfg
        self.n = cfg.workers
        self.stride_elems = _core.stride_for(DEFAULT_DATAGRAM_BYTES) // 4
        spec = FaultSpec(drop=cfg.loss)
        self.down = FaultInjector(spec, seed=cfg.seed * 7919)  # the server's sends (parameters)
        self.up = {r: FaultInjector(spec, seed=cfg.seed * 7919 + r) for r in range(1, self.n + 1)}
        self.control: dict[int, asyncio.Queue] = {r: asyncio.Queue() for r in range(1, self.n + 1)}
        self.theta: np.ndarray | None = None
        self.theta_ready = asyncio.Event()
        self.rows: np.ndarray | None = None
        self.arrived: dict[int, tuple[float, int, int]] = {}
        self.all_arrived = asyncio.Event()
        self.honest: dict[int, np.ndarray] = {}  # this step's honest gradients, before loss (the side channel)
        self.honest_ready = asyncio.Event()
        self.rng = np.random.default_rng(cfg.seed)

    def element_mask(self, injector: Any, peer: int, size: int) -> tuple[np.ndarray, int, int]:
        count = max(1, -(-size // self.stride_elems))
        plan = injector.plan(peer, count)
        chunks = plan.clean_delivered()
        mask = np.repeat(chunks, self.stride_elems)[:size]
        return mask, int(count - chunks.sum()), count


class SimTransport:
    """One simulated rank's side of the step exchanges (see :class:`aggregathor.transport.StepTransport`)."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.size = hub.n + 1

    async def control(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        hub = self.hub
        if self.rank == 0:
            assert meta is not None
            hub.theta_ready.clear()
            hub.arrived.clear()
            hub.all_arrived.clear()
            hub.honest.clear()
            hub.honest_ready.clear()
            for q in hub.control.values():
                q.put_nowait(dict(meta))
            return meta
        return await hub.control[self.rank].get()

    async def params(self, theta: np.ndarray, timeout: float) -> float:
        hub = self.hub
        if self.rank == 0:
            hub.theta = theta.copy()
            hub.theta_ready.set()
            return 1.0
        await hub.theta_ready.wait()
        assert hub.theta is not None
        mask, _, _ = hub.element_mask(hub.down, self.rank, theta.size)
        theta[mask] = hub.theta[mask]  # what is missing keeps its last value ("last" fill)
        return float(mask.mean()) if mask.size else 1.0

    async def grads(self, grad: np.ndarray | None, rows: np.ndarray | None, deadline: float) -> GatherReport | None:
        from lossympi.fill import apply_fill

        hub = self.hub
        if self.rank != 0:
            assert grad is not None and hub.rows is not None
            if not worker_role(hub.cfg, self.rank):
                hub.honest[self.rank] = grad.copy()
                if len(hub.honest) == hub.n - hub.cfg.byzantine:
                    hub.honest_ready.set()
            mask, lost, count = hub.element_mask(hub.up[self.rank], 0, grad.size)
            row = hub.rows[self.rank]
            row[...] = grad
            if lost == count:
                row[...] = self.lost_row_fill
            elif lost:
                apply_fill(hub.cfg.fill, row, mask, rng=hub.rng)
            hub.arrived[self.rank] = (float(mask.mean()) if mask.size else 1.0, lost, count)
            if len(hub.arrived) == hub.n:
                hub.all_arrived.set()
            return None
        assert rows is not None
        hub.rows = rows
        await hub.all_arrived.wait()
        delivered = np.array([hub.arrived[r][0] for r in range(1, hub.n + 1)])
        lost = sum(v[1] for v in hub.arrived.values())
        chunks = sum(v[2] for v in hub.arrived.values())
        return GatherReport(delivered, lost, chunks, 0.0, [0.0] * int(np.sum(delivered == 1.0)), 0)

    async def honest_gradients(self) -> np.ndarray:
        """The colluders' side channel: the ``(n - byzantine, d)`` honest gradients of the current step, once
        every honest worker has computed its own (rank order)."""
        hub = self.hub
        if hub.n == hub.cfg.byzantine:
            raise ValueError("no honest worker: there is nothing to observe")
        await hub.honest_ready.wait()
        return np.stack([hub.honest[r] for r in sorted(hub.honest)])

    @property
    def lost_row_fill(self) -> float:
        from aggregathor import gars

        rule = gars.get(self.hub.cfg.gar, self.hub.n, self.hub.cfg.f, **self.hub.cfg.gar_options)
        return float("nan") if rule.nan_robust else 0.0

    def close(self) -> None:
        pass


def simulate(cfg: TrainConfig, *, progress: bool = True) -> RunSummary:
    """Run ``cfg`` with every rank in this process; returns the server's summary."""

    async def main() -> RunSummary:
        hub = _Hub(cfg)
        workers = [asyncio.ensure_future(run_worker(cfg, SimTransport(hub, r))) for r in range(1, cfg.workers + 1)]
        try:
            summary = await run_server(cfg, SimTransport(hub, 0), progress=progress)
            await asyncio.gather(*workers)
            return summary
        finally:
            for w in workers:
                w.cancel()

    return asyncio.run(main())
