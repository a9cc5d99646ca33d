"""Run by tests/test_processes.py under mpiexec or with LOSSYMPI_* variables: every rank > 0 sends a
deterministic array to rank 0 over lossympi; rank 0 checks the values and writes a JSON report."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from lossympi.bootstrap import init
from lossympi.endpoint import Endpoint, new_event_loop


def payload(rank: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) * rank + rank).astype(np.float32)


async def main(ep: Endpoint, n: int, out_dir: Path) -> None:
    if ep.rank == 0:
        outs = {r: np.zeros(n, np.float32) for r in range(1, ep.size)}
        futs = {r: ep.irecv(r, outs[r], tag=7, timeout=20) for r in outs}
        # Senders may start before these receives are posted: early datagrams wait in the pool.
        results = {r: await f for r, f in futs.items()}
        report = {
            str(r): {
                "complete": res.complete,
                "delivered": res.delivered,
                "exact": bool(np.array_equal(outs[r], payload(r, n))),
                "rejected": res.rejected,
            }
            for r, res in results.items()
        }
        (out_dir / "root.json").write_text(json.dumps(report))
    else:
        await ep.send(0, payload(ep.rank, n), tag=7)


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    n = int(sys.argv[2])
    world = init("auto")
    ep = Endpoint.from_world(world)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main(ep, n, out_dir))
    finally:
        ep.close()
        loop.close()
