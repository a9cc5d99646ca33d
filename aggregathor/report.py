"""What ``aggregathor train`` prints at the end: what ran, how it went, where its directory is, what to look at.

Each function reads a :class:`~aggregathor.summary.RunSummary` (its ``config`` holds the run's settings, its
``run_dir`` included), so the lines describe the run that happened, not the flags that were typed.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from aggregathor.summary import RunSummary

__all__ = ["compare_table", "final_lines", "result_line", "what_ran"]


def _score(summary: RunSummary) -> str:
    if summary.accuracy is not None:
        return f"accuracy {summary.accuracy:.4f}"
    return f"loss {summary.loss:.4g}"


def result_line(summary: RunSummary) -> str:
    """The outcome: accuracy (or loss), steps, time, losses, skipped updates, missing workers, resume point."""
    text = (f"{_score(summary)} after {summary.steps} steps in {summary.wall_seconds:.1f} s "
            f"({summary.steps_per_second:.1f} steps/s); lost {100 * summary.lost_chunk_fraction:.2f}% of gradient "
            f"chunks, {summary.lost_gradients} whole gradients")
    if summary.reduced_updates:
        text += f"; steps aggregated from the rows that arrived (rule rebuilt for n' < n): {summary.reduced_updates}"
    if summary.skipped_updates:
        too_few = summary.skipped_too_few_rows
        why = ", ".join(x for x in (f"too few rows for the rule's bound: {too_few}" if too_few else "",
                                    f"aggregate not finite: {summary.skipped_updates - too_few}"
                                    if summary.skipped_updates > too_few else "") if x)
        text += f"; updates skipped: {summary.skipped_updates} ({why})"
    if summary.missing_workers:
        text += f"; worker-steps without a live worker: {summary.missing_workers}"
    if summary.resumed_from:
        text += f"; resumed from step {summary.resumed_from}"
    return text


def what_ran(summary: RunSummary) -> str:
    """One line: rule, workers, f, attack, transport, loss, experiment and launcher of the run."""
    c = summary.config
    attack = f"{c.get('byzantine')} Byzantine ({c.get('attack')})" if c.get("byzantine") else "no Byzantine worker"
    loss = f", {100 * float(c.get('loss') or 0):g}% datagram loss" if c.get("transport") == "lossympi" else ""
    return (f"{c.get('gar')} with {c.get('workers')} workers, f={c.get('f')}, {attack}, transport "
            f"{c.get('transport')}{loss}; experiment {c.get('experiment')}, launcher {c.get('launcher')}")


def final_lines(summary: RunSummary) -> list[str]:
    """The last lines of a run: what ran, its result, where its directory is and what to look at next."""
    run_dir = Path(str(summary.config.get("run_dir")))
    files = [name for name in ("eval.jsonl", "steps.jsonl", "summary.json", "logs/") if (run_dir / name).exists()]
    d = shlex.quote(str(run_dir))
    return [f"ran: {what_ran(summary)}", f"result: {result_line(summary)}",
            f"saved in {run_dir}" + (f": {', '.join(files)}" if files else ""),
            f"next: tensorboard --logdir {d}/tensorboard; aggregathor plot {d}"]


def compare_table(summaries: Sequence[RunSummary]) -> list[str]:
    """A short table, one row per run: rule, score, steps/s, lost chunks, skipped updates, run directory."""
    rows = [("rule", "result", "steps/s", "lost chunks", "skipped", "run directory")]
    for s in summaries:
        rows.append((str(s.config.get("gar")), _score(s), f"{s.steps_per_second:.1f}",
                     f"{100 * s.lost_chunk_fraction:.2f}%", str(s.skipped_updates), str(s.config.get("run_dir"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)), r[-1]]) for r in rows]
