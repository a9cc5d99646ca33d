"""``aggregathor plot RUN_DIR...``: accuracy against wall time and against step, one line per run.

Each line is labelled by the settings that differ between the runs (their ``config.json``), e.g.
``gar=median, loss=0.05``; when no setting differs (or a run has no ``config.json``), by its directory name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "read_evals", "run_labels"]

#: Settings that never tell runs apart in a legend: where a run wrote, and whether it was resumed.
NOT_LABELS = frozenset({"run_dir", "json_out", "resume"})
#: The settings named first in a label, in this order (the others follow in TrainConfig's order).
FIRST = ("experiment", "gar", "gar_options", "attack", "attack_options", "byzantine", "f", "workers", "transport",
         "loss", "fill")


def read_evals(run_dir: str | Path) -> list[dict]:
    """The evaluation log (``eval.jsonl``) of a run directory; ValueError when it has none."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no eval.jsonl: is it a run directory of `aggregathor train`?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty: the run has not evaluated yet")
    return rows


def _settings(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """The legend label of each run: the settings that differ between ``runs`` (``gar=median, loss=0.05``), or
    the directory name when none differs or a run has no readable ``config.json``."""
    from aggregathor.config import TrainConfig

    names = [Path(r).name or str(r) for r in runs]
    settings = [_settings(Path(r)) for r in runs]
    if len(runs) < 2 or any(s is None for s in settings):
        return names
    order = [*FIRST, *(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FIRST)]
    present = {k for s in settings for k in s}  # type: ignore[union-attr]
    keys = [k for k in order + sorted(present - set(order)) if k in present and k not in NOT_LABELS]
    differ = [k for k in keys if len({_show(s.get(k)) for s in settings}) > 1]  # type: ignore[union-attr]
    if not differ:
        return names
    labels = [", ".join(f"{k}={_show(s.get(k))}" for k in differ) for s in settings]  # type: ignore[union-attr]
    return [f"{label} ({name})" if labels.count(label) > 1 else label for label, name in zip(labels, names,
                                                                                            strict=True)]


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write ``accuracy_vs_time.png`` and ``accuracy_vs_step.png`` into ``out`` (``loss_vs_...`` when a run has no
    accuracy: a regression); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_evals(r) for r in runs]
    labels = run_labels(runs)
    metric = "accuracy" if all("accuracy" in r for rows in data for r in rows) else "loss"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label in (("wall", "wall time (s)"), ("step", "step")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for rows, name in zip(data, labels, strict=True):
            ax.plot([r[key] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{metric}_vs_{'time' if key == 'wall' else 'step'}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
