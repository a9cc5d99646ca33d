"""``--launcher simulate``: the server and every worker in one process, the network emulated.

The same server and worker loops as a real run (:class:`aggregathor.server.ParameterServer`,
:func:`aggregathor.worker.run_worker`) run as asyncio tasks over the simulated backend
(:mod:`aggregathor.transport.simulated`), which loses data the way lossympi does (same chunks, seeded fault
injector, fill policy) without touching a socket, so research sweeps run fast and reproducibly. Byzantine workers
here are omniscient: they see the step's honest gradients.
"""

from __future__ import annotations

import asyncio

from aggregathor.config import TrainConfig
from aggregathor.server import run_server
from aggregathor.summary import RunSummary
from aggregathor.transport.simulated import SimNetwork
from aggregathor.worker import run_worker

__all__ = ["simulate"]


def simulate(cfg: TrainConfig, *, progress: bool = True) -> RunSummary:
    """Run ``cfg`` with every rank in this process; returns the server's summary."""

    async def main() -> RunSummary:
        net = SimNetwork(cfg)
        workers = [asyncio.ensure_future(run_worker(cfg, net.worker(r))) for r in range(1, cfg.workers + 1)]
        try:
            summary = await run_server(cfg, net.server(), progress=progress)
            await asyncio.gather(*workers)
            return summary
        finally:
            for w in workers:
                w.cancel()

    return asyncio.run(main())
