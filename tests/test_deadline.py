"""The adaptive gather deadline (aggregathor.deadline.Deadline) and the slow-worker attack on it."""

from __future__ import annotations

import numpy as np

from aggregathor.deadline import Deadline
from aggregathor.transport import GatherReport


def _report(times: list[float], n: int) -> GatherReport:
    return GatherReport(delivered=np.ones(n), complete_elapsed=list(times))


def _attack(f_left_out: int, steps: int = 200) -> float:
    """Honest workers answer in 10-20 ms; one Byzantine worker always answers just before the deadline."""
    rng = np.random.default_rng(0)
    d = Deadline(cap=2.0)
    d.observe(0.02)
    for _ in range(steps):
        now = d.next()
        honest = list(rng.uniform(0.01, 0.02, size=7))
        d.observe_gather(_report([*honest, 0.99 * now], 8), 8, f_left_out)
    return d.next()


def test_a_worker_answering_at_the_deadline_cannot_stretch_it() -> None:
    assert _attack(1) < 0.06  # 2 x the honest arrivals + slack
    assert _attack(0) == 2.0  # timed on the last arrival, the attacker drives it to the cap


def test_deadline_needs_enough_complete_gradients() -> None:
    d = Deadline(cap=1.0)
    d.observe_gather(_report([0.1, 0.1, 0.1], 8), 8, 1)  # fewer than half complete: nothing learned
    assert d.next() == 1.0
    d.observe_gather(_report([0.01, 0.02, 0.03, 0.04, 0.5], 8), 8, 1)  # the slowest (0.5) is left out
    assert abs(d.next() - (2 * 0.04 + 0.01)) < 1e-9
    d2 = Deadline(cap=1.0)
    d2.observe_gather(_report([0.3], 1), 1, 1)  # never leave out every arrival
    assert d2.next() == 1.0
