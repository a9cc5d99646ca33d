"""The simulated launcher's side channel: omniscient colluding Byzantine workers (issue 6, item 4)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from aggregathor.config import TrainConfig
from aggregathor.transport import Capability
from aggregathor.transport.simulated import SimNetwork


def _net(tmp_path, **kw) -> SimNetwork:
    base = dict(launcher="simulate", gar="median", workers=4, f=1, byzantine=1, attack="alie", loss=0.3, steps=3,
                run_dir=str(tmp_path / "run"), seed=3)
    return SimNetwork(TrainConfig.from_dict(base | kw))


def test_byzantine_worker_sees_this_steps_honest_gradients_before_loss(tmp_path) -> None:
    hub = _net(tmp_path)
    server, workers = hub.server(), [hub.worker(r) for r in range(1, hub.n + 1)]
    assert all(Capability.HONEST_GRADIENTS in w.capabilities for w in workers)
    assert Capability.HONEST_GRADIENTS not in server.capabilities
    rng = np.random.default_rng(0)
    d = 5000  # several chunks, so that a 30 % loss hits some of them

    async def step(k: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        await server.announce({"step": k})
        for w in workers:
            assert await w.next_message() == {"step": k}
        rows = np.zeros((hub.n + 1, d), np.float32)
        gather = asyncio.ensure_future(server.gather(rows, time.monotonic() + 5))
        spy = asyncio.ensure_future(workers[-1].honest_gradients())  # rank 4 is the Byzantine one
        await asyncio.sleep(0)
        honest = [rng.normal(size=d).astype(np.float32) for _ in workers[:-1]]
        for w, g in zip(workers[:-1], honest, strict=True):
            assert not spy.done()  # it waits until every honest worker has computed its gradient
            await w.send_grad(g, time.monotonic() + 5)
        seen = await spy
        await workers[-1].send_grad(np.zeros(d, np.float32), time.monotonic() + 5)
        await gather
        return seen, honest, rows

    async def main() -> None:
        for k in range(2):  # a second step sees the second step's gradients, not the first's
            seen, honest, rows = await step(k)
            np.testing.assert_array_equal(seen, np.stack(honest))
            # what the server got was hit by the loss; what the colluders saw was not
            assert any(not np.array_equal(rows[r + 1], honest[r]) for r in range(len(honest)))

    asyncio.run(main())


def test_side_channel_needs_an_honest_worker(tmp_path) -> None:
    hub = _net(tmp_path, gar="average", workers=2, f=0, byzantine=0)
    hub.cfg.byzantine = hub.n  # not a valid config (validation refuses it); the transport still says why
    with pytest.raises(ValueError, match="no honest worker"):
        asyncio.run(hub.worker(1).honest_gradients())


class _FakeWorkerSide:
    """A worker transport for one step's gradient: declares HONEST_GRADIENTS or not."""

    def __init__(self, rank: int, honest: np.ndarray | None) -> None:
        self.rank, self.size, self.honest = rank, 4, honest
        self.capabilities = frozenset({Capability.HONEST_GRADIENTS}) if honest is not None else frozenset()

    async def honest_gradients(self) -> np.ndarray:
        assert self.honest is not None, "honest_gradients() called on a transport that does not declare it"
        return self.honest


def test_a_byzantine_worker_uses_the_side_channel_only_when_declared(tmp_path) -> None:
    from aggregathor.worker import Worker, byzantine_gradient

    cfg = TrainConfig.from_dict(dict(gar="median", workers=3, f=1, byzantine=1, attack="reverse",
                                     run_dir=str(tmp_path / "run")))
    honest = np.ones((2, 4810), np.float32)
    seen = Worker(cfg, _FakeWorkerSide(3, honest))
    np.testing.assert_array_equal(asyncio.run(seen.gradient()), np.full(4810, -100.0, np.float32))  # -k * mean
    blind, twin = Worker(cfg, _FakeWorkerSide(3, None)), Worker(cfg, _FakeWorkerSide(3, None))
    for w in (blind, twin):
        w.warm_up()
    estimate = byzantine_gradient(cfg, twin.attack, twin.message, twin.batches, twin.rng)  # from n - f own batches
    got = asyncio.run(blind.gradient())
    assert np.all(np.isfinite(got)) and np.any(got != 0)
    np.testing.assert_array_equal(got, estimate)
