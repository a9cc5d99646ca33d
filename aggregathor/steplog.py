"""The server's append-only JSON-lines logs: ``steps.jsonl`` (one row per step) and ``eval.jsonl`` (one per evaluation).

Both are file formats (``tools/soak.py``, ``tools/reproduce.py``, ``aggregathor plot`` and the tests read them):
the keys of :meth:`StepRecord.row` and of :class:`aggregathor.server.ParameterServer`'s evaluation rows do not
change. A server killed mid-write leaves half a row; a server restarted on the same run directory ends that row
first (:func:`end_torn_line`), so every later row parses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["JsonLines", "StepRecord", "end_torn_line"]


def end_torn_line(path: Path) -> None:
    """End an append-only JSON-lines log with a newline when a crash left its last row half written."""
    try:
        with path.open("rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
    except FileNotFoundError:
        pass


class JsonLines:
    """An append-only JSON-lines file, flushed at most every ``flush_every`` seconds (0: after every row).

    Parameters
    ----------
    path : Path
        The file; a torn last row (a crashed writer) is ended first.
    flush_every : float
        Seconds between flushes; rows are buffered (64 KiB) in between, so a per-step log costs no syscall per step.
    """

    def __init__(self, path: Path, *, flush_every: float = 0.0) -> None:
        end_torn_line(path)
        self.flush_every = flush_every
        self._fh: IO[str] = path.open("a", buffering=1 << 16 if flush_every > 0 else -1)
        self._flushed = time.monotonic()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (a JSON object)."""
        self._fh.write(json.dumps(row) + "\n")
        now = time.monotonic()
        if now - self._flushed >= self.flush_every:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self._fh.flush()
        self._flushed = time.monotonic() if now is None else now

    def close(self) -> None:
        self._fh.close()


@dataclass
class StepRecord:
    """The timings and losses of one step, as written to ``steps.jsonl`` (:meth:`row`).

    The times are ``time.monotonic()`` readings: the step's start, after the step message, after the parameters,
    after the gather, and its end (control, parameters, gather, rule, update; no evaluation).
    """

    step: int
    start: float
    params_at: float
    gather_at: float
    gathered_at: float
    deadline: float
    lost_chunks: int = 0
    chunks: int = 0
    lost_gradients: int = 0
    missing_workers: int = 0
    params_chunks: int = 0  # datagram chunks of the parameters sent this step (0: a reliable stream)
    params_lost_chunks: int = 0  # of which the sender knows were dropped (the emulated --loss)
    update_skipped: bool = False
    aggregation: str = "full"  # "full", "reduced" (the rule rebuilt for the n' < n rows that arrived) or "skipped"
    aggregated_rows: int = 0  # the rows the rule aggregated (0: it did not run)
    events: dict[str, Any] = field(default_factory=dict)  # the step's protocol events (ProtocolEvents.observe)

    def row(self, end: float, t0: float) -> dict[str, Any]:
        """The JSON row, the step ending at ``end``, the run's clock starting at ``t0``."""
        return {"step": self.step, "wall": round(end - t0, 4), "seconds": round(end - self.start, 5),
                "deadline": round(self.deadline, 5), "gather_seconds": round(self.gathered_at - self.gather_at, 5),
                "control_seconds": round(self.params_at - self.start, 5),
                "params_seconds": round(self.gather_at - self.params_at, 5),
                "lost_chunks": int(self.lost_chunks), "chunks": int(self.chunks),
                "lost_gradients": int(self.lost_gradients), "missing_workers": int(self.missing_workers),
                "params_chunks": int(self.params_chunks), "params_lost_chunks": int(self.params_lost_chunks),
                "aggregation": self.aggregation, "aggregated_rows": int(self.aggregated_rows),
                **({"update_skipped": True} if self.update_skipped else {}), **self.events}
