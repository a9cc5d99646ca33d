"""``aggregathor plot RUN_DIR...``: accuracy against wall time and against step, one line per run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_runs", "read_evals"]


def read_evals(run_dir: str | Path) -> list[dict]:
    """The evaluation log (``eval.jsonl``) of a run directory; ValueError when it has none."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no eval.jsonl: is it a run directory of `aggregathor train`?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty: the run has not evaluated yet")
    return rows


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write ``accuracy_vs_time.png`` and ``accuracy_vs_step.png`` into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {str(r): read_evals(r) for r in runs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label in (("wall", "wall time (s)"), ("step", "step")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in data.items():
            ax.plot([r[key] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3, label=Path(name).name)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_vs_{'time' if key == 'wall' else 'step'}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
