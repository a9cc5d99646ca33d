"""The adaptive deadline of a step's exchanges: the server's gather deadline, a worker's parameter timeout."""

from __future__ import annotations

from collections import deque

import numpy as np

from aggregathor.transport.base import GatherReport

__all__ = ["Deadline"]


class Deadline:
    """Adaptive gather deadline.

    A step waits at most ``cap`` seconds. Once a step has completed, it waits ``factor`` times the median
    (over the last ``window`` steps) of the time by which the complete gradients had arrived, the ``f`` slowest
    left out, plus ``slack``: a step with a lost datagram then costs a little more than a lossless one, not the
    cap. Leaving the ``f`` slowest out is what keeps Byzantine workers from stretching the deadline: timed on the
    last arrival, one worker that always answers just before the deadline would raise it by ``factor`` every
    ``window / 2`` steps, up to the cap (replayed: from 0.03 s to the 2 s cap in about 55 steps).
    """

    def __init__(self, cap: float, factor: float = 2.0, slack: float = 0.01, window: int = 20) -> None:
        self.cap = cap
        self.factor = factor
        self.slack = slack
        self.history: deque[float] = deque(maxlen=window)

    def next(self) -> float:
        """The next exchange's deadline, in seconds from its start."""
        if not self.history:
            return self.cap
        return min(self.cap, self.factor * float(np.median(self.history)) + self.slack)

    def observe(self, seconds: float) -> None:
        """Record how long a complete exchange took."""
        self.history.append(float(seconds))

    def observe_gather(self, report: GatherReport, workers: int, f: int = 0) -> None:
        """Record when the complete gradients had arrived, the ``f`` slowest left out, when at least half of the
        ``workers`` gradients (and more than ``f``) were complete."""
        times = sorted(report.complete_elapsed)
        if times and len(times) >= max(1, workers // 2, f + 1):
            self.observe(times[len(times) - 1 - f])
