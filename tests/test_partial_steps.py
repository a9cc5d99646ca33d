"""Issue 14 requirement 4: a step that lost more than ``f`` whole gradients still learns.

When only ``n' < n`` rows arrived, the server aggregates them with the rule rebuilt (and cached) for ``(n', f)``
if its bound holds (``"reduced"``), else skips the update and counts it (``"skipped"``); ``steps.jsonl`` and the
summary say which (:mod:`aggregathor.server`).

- The rebuild keeps the rule's options and is cached by ``n'``; an ``n'`` out of the bound gives the reason; the
  rows that arrived are copied in order into one reused buffer.
- :meth:`ParameterServer.aggregate` on a step's rows: full, reduced (the update is the rule of the arrived rows),
  full with the missing rows filled (the reduced bound fails, at most ``f`` missing), skipped (too few rows).
- A deadline most workers miss: an in-process run over the real lossympi transport (UDP and TCP on loopback),
  where 4 of 7 workers send their gradients after the gather's deadline for some steps: those steps aggregate
  the 3 that arrived, and the model moves.
- Killed workers: a real multi-process run (:class:`aggregathor.launch.LocalJob`) where 2 of 5 workers are
  SIGKILLed (f = 1): the remaining steps aggregate 3 rows and the run ends trained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run

from aggregathor.config import TrainConfig
from aggregathor.server import ParameterServer, RowSubsetRules

WAIT = 180.0


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    base = dict(experiment="digits", gar="median", workers=5, f=1, byzantine=0, steps=40, eval_every=40,
                checkpoint_every=0, loss=0.0, deadline=0.5, batch_size=32, seed=1, optimizer="sgd", lr=0.1,
                run_dir=str(tmp_path / "run"))
    return TrainConfig.from_dict(base | kw)


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of steps.jsonl written so far (a partly written last line is left out)."""
    path = run_dir / "steps.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


# ====================================================================================== the rebuilt rules


def test_the_rule_is_rebuilt_with_its_options_and_cached_by_the_rows_that_arrived() -> None:
    rules = RowSubsetRules("multi-krum", 9, 1, {"m": 2, "pre": ["nnm"]})
    rule, why = rules.rule(7)
    assert why == "" and rule is not None
    cfg = rule.get_config()
    assert (cfg["n"], cfg["f"], cfg["m"], [w["name"] for w in cfg["pre"]]) == (7, 1, 2, ["nnm"]), cfg
    assert rules.rule(7)[0] is rule  # cached
    assert rules.rule(5)[0].get_config()["n"] == 5  # Multi-Krum needs n >= 2f + 3 = 5: still in reach
    none, why = rules.rule(4)
    assert none is None and "n >= 2f + 3" in why, why
    assert rules.rule(4) == (None, why) and sorted(rules.cache) == [4, 5, 7]
    with pytest.raises(ValueError, match="1 to 8 rows"):
        rules.rule(9)


def test_a_rule_of_positional_rows_is_never_rebuilt() -> None:
    """Draco's groups are consecutive workers: 6 of 9 rows (a multiple of 2f + 1) in arbitrary places would mix
    groups, so no n' < n is in reach (the step is full within f missing, else skipped)."""
    from aggregathor import gars
    from aggregathor.server import positional_rows

    assert positional_rows(gars.get("draco", 9, 1)) and not positional_rows(gars.get("median", 9, 1))
    assert gars.get("draco", 6, 1).n == 6  # its bound alone would allow 6 rows
    rules = RowSubsetRules("draco", 9, 1, {}, positional=True)
    none, why = rules.rule(6)
    assert none is None and "positional" in why, why


def test_the_server_does_not_rebuild_draco(tmp_path: Path) -> None:
    server = _server(tmp_path, gar="draco", workers=9)
    rows = server.rows[1:, :server.view.size]
    rows[...] = np.random.default_rng(2).normal(size=rows.shape)
    arrived = np.ones(9, bool)
    arrived[[1, 4, 8]] = False  # three workers of three groups
    assert server.aggregate(0, arrived) == ("skipped", 0, "bound")
    arrived[[1, 4]] = True  # one missing, within f: the rule for 9 on every row (its group falls back to the median)
    assert server.aggregate(1, arrived) == ("full", 9, "")


def test_the_rows_that_arrived_are_copied_in_order_into_one_reused_buffer() -> None:
    rules = RowSubsetRules("median", 5, 1, {})
    wide = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    rows = wide[:, :4]  # a strided view, as the server's gradient columns are when the model has a state
    first = rules.gather(rows, np.array([True, False, True, True, False]))
    np.testing.assert_array_equal(first, rows[[0, 2, 3]])
    second = rules.gather(rows, np.array([False, True, False, False, True]))
    np.testing.assert_array_equal(second, rows[[1, 4]])
    assert np.shares_memory(first, second) and first.flags.c_contiguous  # one buffer, reused


class _NoTransport:
    """:meth:`ParameterServer.aggregate` touches no transport."""


def _server(tmp_path: Path, **kw: Any) -> ParameterServer:
    server = ParameterServer(_cfg(tmp_path, **kw), _NoTransport(), progress=False)  # type: ignore[arg-type]
    server.update.get_concrete_function()
    return server


def test_a_step_is_full_reduced_or_skipped(tmp_path: Path) -> None:
    server = _server(tmp_path)
    n, d = 5, server.view.size
    rng = np.random.default_rng(0)
    rows = server.rows[1:, :d]
    theta = lambda: np.concatenate([v.numpy().ravel() for v in server.model.trainable_variables])  # noqa: E731

    rows[...] = rng.normal(size=(n, d))
    assert server.aggregate(0, np.ones(n, bool)) == ("full", 5, "")

    # workers 2 and 5 missed the deadline entirely: their rows are the NaN fill of a NaN-robust rule
    arrived = np.array([True, False, True, True, False])
    rows[...] = rng.normal(size=(n, d))
    rows[~arrived] = np.nan
    before = theta()
    assert server.aggregate(1, arrived) == ("reduced", 3, "")
    step = (before - theta()) / 0.1  # plain SGD: the update is lr times the aggregate
    np.testing.assert_allclose(step, np.median(rows[arrived], axis=0), rtol=1e-4, atol=1e-5)

    # only 2 rows: the median's bound n >= 2f + 1 fails, and 3 > f are missing: skipped, the model untouched
    before = theta()
    assert server.aggregate(2, np.array([True, False, False, True, False])) == ("skipped", 0, "bound")
    np.testing.assert_array_equal(before, theta())
    # nothing arrived at all
    assert server.aggregate(3, np.zeros(n, bool)) == ("skipped", 0, "bound")
    c = server.counters
    assert (c.reduced_updates, c.skipped_updates, c.skipped_too_few_rows) == (1, 2, 2)
    assert sorted(server.notices.seen) == ["updates on the rows that arrived (rule rebuilt for n' < n)",
                                           "updates skipped (too few gradients for the rule's bound)"]


def test_within_f_missing_the_full_rule_runs_when_the_reduced_one_is_out_of_reach(tmp_path: Path) -> None:
    """Multi-Krum for n = 5, f = 1 cannot be rebuilt for 4 rows (n >= 2f + 3); one missing row is within f, so the
    rule for 5 runs on all the rows, the missing one filled, as before reduced steps existed."""
    server = _server(tmp_path, gar="multi-krum")
    rows = server.rows[1:, :server.view.size]
    rows[...] = np.random.default_rng(1).normal(size=rows.shape)
    rows[2] = np.nan
    assert server.aggregate(0, np.array([True, True, False, True, True])) == ("full", 5, "")
    assert server.aggregate(1, np.array([True, False, False, True, True])) == ("skipped", 0, "bound")
    assert server.counters.reduced_updates == 0


# ====================================================================================== a deadline most workers miss


class _Late:
    """A worker's transport that sends its gradient ``delay`` seconds late during the steps in ``late``."""

    def __init__(self, inner: Any, late: range, delay: float) -> None:
        self.inner, self.late, self.delay = inner, late, delay
        self.step = -1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def next_message(self) -> dict[str, Any]:
        meta = await self.inner.next_message()
        self.step = int(meta.get("step", self.step))
        return meta

    async def send_grad(self, grad: np.ndarray, deadline: float) -> None:
        if self.step in self.late:
            await asyncio.sleep(self.delay)  # the gather of this step is over by then
        await self.inner.send_grad(grad, deadline)


def test_steps_whose_deadline_most_workers_miss_aggregate_the_rows_that_arrived(tmp_path: Path) -> None:
    from aggregathor.server import run_server
    from aggregathor.transport import ServerGone, build_transport
    from aggregathor.worker import run_worker
    from lossympi.bootstrap import local_worlds

    cfg = _cfg(tmp_path, workers=7, steps=40, eval_every=4, deadline=0.25)
    late, slow = range(4, 8), (4, 5, 6, 7)  # 4 of 7 workers miss the deadline of steps 4..7 (and skip the next ones)

    async def main() -> Any:
        worlds = local_worlds(cfg.workers + 1)
        sides = [build_transport(cfg, w, mpi=False) for w in worlds]
        workers = [_Late(t, late, 2 * cfg.deadline) if t.rank in slow else t for t in sides[1:]]
        tasks = [asyncio.ensure_future(run_worker(cfg, t)) for t in workers]  # type: ignore[arg-type]
        try:
            summary = await asyncio.wait_for(run_server(cfg, sides[0], progress=False), WAIT)  # type: ignore[arg-type]
            ends = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
            # a worker still busy when the run ends finds the server gone (the launcher's exit status 3)
            assert all(isinstance(e, int | ServerGone) for e in ends), ends
            return summary
        finally:
            for t in tasks:
                t.cancel()
            for side in sides:
                side.close()
            for w in worlds:
                w.close()

    summary = run(main())
    rows = {r["step"]: r for r in _steps(Path(cfg.run_dir))}
    evals = [json.loads(line) for line in (Path(cfg.run_dir) / "eval.jsonl").read_text().splitlines()]
    for k in late:
        assert rows[k]["lost_gradients"] == 4 and rows[k]["missing_workers"] == 0, rows[k]  # late, not dead
        assert (rows[k]["aggregation"], rows[k]["aggregated_rows"]) == ("reduced", 3), rows[k]
        assert "update_skipped" not in rows[k]
    assert summary.reduced_updates >= len(late) and summary.skipped_updates == 0, summary
    # the laggards skip the step they are too late for, and are back in step after the late window (without the
    # skip they would stay one step behind for good, every later gradient arriving after its gather)
    assert any(rows[k]["aggregation"] == "full" for k in range(late[-1] + 2, cfg.steps)), \
        [rows[k] for k in range(late[-1] + 2, cfg.steps)]
    # the model moved during the late steps: the evaluations after steps 4, 8 and 12 differ
    losses = {e["step"]: e["loss"] for e in evals}
    assert losses[8] != losses[4] and losses[12] != losses[8], losses
    # before the late steps every worker's gradient arrives (in time at least once, on a busy machine)
    assert any(rows[k]["aggregation"] == "full" for k in range(4)), [rows[k] for k in range(4)]


# ====================================================================================== killed workers


def test_steps_after_two_of_five_workers_are_killed_aggregate_the_three_left(tmp_path: Path) -> None:
    from aggregathor.launch import LocalJob

    cfg = _cfg(tmp_path, steps=160, eval_every=40)
    run_dir = Path(cfg.run_dir)
    job = LocalJob(cfg)
    try:
        job.start_all()
        deadline = time.monotonic() + WAIT
        while len(_steps(run_dir)) < 10:
            assert time.monotonic() < deadline, f"no 10 steps after {WAIT} s; logs in {job.logs}"
            assert job.procs[0].poll() is None, f"the server died; logs in {job.logs}"
            time.sleep(0.05)
        for rank in (4, 5):
            job.procs[rank].send_signal(signal.SIGKILL)
            job.procs[rank].wait()
        summary = job.wait()
    finally:
        job.close()
    rows = _steps(run_dir)
    assert [r["step"] for r in rows] == list(range(cfg.steps))
    dead = next(r["step"] for r in rows if r["missing_workers"] == 2)  # the server has seen both links die
    after = rows[dead:]
    assert len(after) > 100 and all(r["lost_gradients"] >= 2 for r in after)
    three = [r for r in after if r["lost_gradients"] == 2]  # a live worker may miss a deadline on a busy machine
    assert len(three) >= 0.8 * len(after), [r["lost_gradients"] for r in after]
    for r in three:  # the three live workers' rows, by the median rebuilt for n' = 3
        assert (r["aggregation"], r["aggregated_rows"]) == ("reduced", 3) and "update_skipped" not in r, r
    for r in after:  # two rows are out of the median's reach (n >= 2f + 1): skipped
        assert r["aggregation"] == ("reduced" if r["lost_gradients"] == 2 else "skipped"), r
    assert summary is not None and summary.max_missing_workers == 2
    assert summary.reduced_updates >= len(three) and summary.skipped_updates == summary.skipped_too_few_rows
    assert summary.accuracy > 0.8, summary.accuracy  # it kept learning


def test_the_result_line_says_how_many_steps_were_reduced_and_why_updates_were_skipped():
    from aggregathor.report import result_line
    from aggregathor.summary import RunSummary

    s = RunSummary(accuracy=0.9, loss=0.1, steps=10, wall_seconds=1.0, steps_per_second=10.0,
                   lost_chunk_fraction=0.0, lost_gradients=0, rejected_datagrams=0, skipped_updates=3,
                   skipped_too_few_rows=2, reduced_updates=4)
    line = result_line(s)
    assert "rule rebuilt for n' < n): 4" in line
    assert "updates skipped: 3 (too few rows for the rule's bound: 2, aggregate not finite: 1)" in line
