"""Conditions that can repeat every step, reported without flooding the output.

A condition (an update skipped for a non-finite aggregate or too few gradients, a step aggregated on the rows that
arrived, gradients lost, workers missing) is logged once, when it first happens; then it is only counted, and
:meth:`Notices.totals` gives one line of the counts since the previous totals, which the server logs at each
evaluation (the summary holds the run's totals). Never one line per step.
"""

from __future__ import annotations

import logging
from collections import Counter

__all__ = ["Notices"]


class Notices:
    """Counts of repeating conditions, logged on their first occurrence on ``logger``.

    Examples
    --------
    >>> notices = Notices(logging.getLogger("demo"))
    >>> for step in range(3):
    ...     notices.note("updates skipped (non-finite aggregate)", step, "the aggregate is not finite")
    >>> notices.totals()
    'since the last report: 3 updates skipped (non-finite aggregate)'
    >>> notices.totals() is None
    True
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.seen: set[str] = set()
        self.since: Counter[str] = Counter()  # counts since the last totals()

    def note(self, kind: str, step: int, text: str, count: int = 1) -> None:
        """Count ``count`` cases of ``kind`` at ``step``; the first case of a kind is logged with ``text``."""
        if count <= 0:
            return
        if kind not in self.seen:
            self.seen.add(kind)
            self.logger.warning("step %d: %s (counted from now on: totals at each evaluation and in the summary)",
                                step, text)
        self.since[kind] += count

    def totals(self) -> str | None:
        """One line of the counts since the previous call (None when nothing happened); resets them."""
        if not self.since:
            return None
        line = "since the last report: " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.since.items()))
        self.since.clear()
        return line
