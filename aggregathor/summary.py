"""What a run counts: the server's typed counters (:class:`RunCounters`) and the JSON summary (:class:`RunSummary`).

The summary's field names are a file format: ``--json-out``, ``<run_dir>/summary.json`` of a local run,
:class:`aggregathor.launch.LocalJob` (which reads it back), ``tools/soak.py`` and ``tools/reproduce.py`` read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregathor.checkpoint import atomic_write_text
from aggregathor.transport.base import FaultCounters, GatherReport

__all__ = ["RunCounters", "RunSummary"]


@dataclass
class RunCounters:
    """The server's running totals over the steps it ran (not those of a run it resumed)."""

    lost_chunks: int = 0
    chunks: int = 0
    lost_gradients: int = 0  # gradients of which nothing arrived
    rejected: int = 0  # datagrams (or frames) refused
    missing_workers: int = 0  # worker-steps without a live worker
    max_missing_workers: int = 0
    skipped_updates: int = 0  # steps that left the model as it was (non-finite aggregate, or too few rows)
    skipped_too_few_rows: int = 0  # of which: too many gradients missing for the rule's bound
    reduced_updates: int = 0  # steps aggregated by the rule rebuilt for the n' < n rows that arrived

    def add_missing(self, missing: int) -> None:
        """Count one step's missing workers."""
        self.missing_workers += missing
        self.max_missing_workers = max(self.max_missing_workers, missing)

    def add_gather(self, report: GatherReport) -> int:
        """Count one step's gather; returns the gradients of which nothing arrived."""
        lost = int(np.sum(report.delivered == 0))
        self.lost_chunks += int(report.lost_chunks)
        self.chunks += int(report.chunks)
        self.rejected += int(report.rejected)
        self.lost_gradients += lost
        return lost

    @property
    def lost_chunk_fraction(self) -> float:
        return self.lost_chunks / self.chunks if self.chunks else 0.0


@dataclass
class RunSummary:
    """The JSON summary of a run (``--json-out``).

    The protocol counters (see :class:`aggregathor.transport.ProtocolEvents`) are keyed by worker rank:
    ``rejected_by_rank`` maps the rank that really sent refused datagrams (``"unknown"``: no rank's address)
    to counts by reason; ``incomplete_rows``, ``nonfinite_rows`` and ``huge_rows`` count steps.
    """

    accuracy: float | None  # None for a task without accuracy (regression): see ``metrics``
    loss: float
    steps: int
    wall_seconds: float
    steps_per_second: float
    lost_chunk_fraction: float
    lost_gradients: int
    rejected_datagrams: int
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_by_rank: dict[str, dict[str, int]] = field(default_factory=dict)
    incomplete_rows: dict[str, int] = field(default_factory=dict)
    nonfinite_rows: dict[str, int] = field(default_factory=dict)
    huge_rows: dict[str, int] = field(default_factory=dict)
    stale_by_rank: dict[str, int] = field(default_factory=dict)
    pool_drops_by_rank: dict[str, int] = field(default_factory=dict)
    duplicates_by_rank: dict[str, int] = field(default_factory=dict)
    # crash faults (see aggregathor.server)
    resumed_from: int = 0  # the step this server started at: that of the checkpoint it restored, else 0
    checkpoints_skipped: list[list[Any]] = field(default_factory=list)  # [step, why] of unusable checkpoints
    missing_workers: int = 0  # worker-steps without a live worker (summed over the steps of this server)
    max_missing_workers: int = 0
    skipped_updates: int = 0  # steps that left the model as it was: a non-finite aggregate, or too few rows
    skipped_too_few_rows: int = 0  # of which: too many gradients missing for the rule's bound (aggregathor.server)
    reduced_updates: int = 0  # steps aggregated by the rule rebuilt for the n' < n rows that arrived
    rejoins: int = 0  # workers that reconnected after their link died
    control_rejects: dict[str, int] = field(default_factory=dict)  # refused control connections by reason
    control_link_failures: dict[str, int] = field(default_factory=dict)  # lost worker links by reason
    rendezvous_rejects: dict[str, int] = field(default_factory=dict)  # refused rendezvous connections by reason
    # the workers' ready frames as UDP copies (lossympi.control_copies): "first" (a copy beat its TCP twin),
    # "duplicate", and refused ones by reason
    control_copies: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric of the last evaluation (loss included)

    @classmethod
    def of_run(cls, *, evaluation: dict[str, Any], counters: RunCounters, faults: FaultCounters, steps: int,
               done: int, wall: float, **fields: Any) -> RunSummary:
        """The summary of a run that reached ``steps`` (``done`` of them by this server, in ``wall`` seconds), its
        last ``evaluation`` row, the server's counters and the transport's crash-fault counters; ``fields`` gives
        the rest (config, history, the protocol events' totals, resumed_from, checkpoints_skipped)."""
        accuracy = evaluation.get("accuracy")
        return cls(accuracy=None if accuracy is None else float(accuracy), loss=float(evaluation["loss"]), steps=steps,
                   wall_seconds=wall, steps_per_second=done / wall if wall > 0 else 0.0,
                   lost_chunk_fraction=counters.lost_chunk_fraction, lost_gradients=counters.lost_gradients,
                   rejected_datagrams=counters.rejected, missing_workers=counters.missing_workers,
                   max_missing_workers=counters.max_missing_workers, skipped_updates=counters.skipped_updates,
                   skipped_too_few_rows=counters.skipped_too_few_rows, reduced_updates=counters.reduced_updates,
                   rejoins=int(faults.rejoins), control_rejects=dict(faults.control_rejects),
                   control_link_failures=dict(faults.control_link_failures),
                   rendezvous_rejects=dict(faults.rendezvous_rejects), control_copies=dict(faults.control_copies),
                   metrics={**{k: float(evaluation[k]) for k in ("loss", "accuracy") if k in evaluation},
                            **{k: float(v) for k, v in evaluation.get("metrics", {}).items()}}, **fields)

    def write(self, path: str | Path) -> None:
        """Write the summary as JSON, atomically: a reader never sees half of it."""
        atomic_write_text(path, json.dumps(self.__dict__, indent=1, default=str))
