"""Which directory a run writes to: a fresh one by default, an existing one only to continue it (``--resume``).

One decision per job, on the process that decides (the CLI or :func:`aggregathor.launch.launch`; under
``--launcher mpi`` rank 0, which tells the other ranks): :func:`prepare`.

- No ``--run-dir``: a fresh directory ``runs/<UTC time>-<experiment>-<gar>`` (e.g.
  ``runs/20261204T061500Z-digits-multi-krum``; a second run started in the same second gets ``-2``, ``-3`` ...).
  Created atomically, so two processes never share one.
- ``--run-dir DIR``: DIR must not hold a run yet (:func:`holds_run`); a finished run is never silently continued
  nor overwritten.
- ``--run-dir DIR --resume``: DIR must hold a run whose stored settings (``DIR/config.json``) are those of this
  run, except the settings in :data:`MAY_DIFFER` (they change where and how a run reports, not what it trains)
  and ``steps``, which may be raised. Every other difference is named in the refusal.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from aggregathor.config import ConfigError, TrainConfig

__all__ = ["MAY_DIFFER", "RUNS_ROOT", "check_reuse", "differences", "fresh_name", "holds_run", "prepare",
           "stored_config"]

#: Where fresh run directories are created (relative to the working directory).
RUNS_ROOT = Path("runs")

#: Settings a resumed run may change: where it writes, which launcher starts its ranks, what it logs and when it
#: evaluates and checkpoints. ``steps`` may be raised (not lowered). Everything else must match the stored run.
MAY_DIFFER = frozenset({"run_dir", "json_out", "resume", "launcher", "step_log", "eval_every", "checkpoint_every"})

_RUN_FILES = ("config.json", "eval.jsonl", "steps.jsonl", "summary.json")
_ODD = re.compile(r"[^A-Za-z0-9._+-]+")


def _clean(name: str) -> str:
    """``name`` as part of a directory name: odd characters (``/``, ``:``, spaces ...) become ``_``."""
    return _ODD.sub("_", name).strip("._-")[:48] or "run"


def fresh_name(cfg: TrainConfig, when: float | None = None) -> str:
    """``<UTC time>-<experiment>-<gar>`` of ``cfg`` (a ``module:attr`` experiment is named by its ``.name``)."""
    experiment = cfg.experiment
    if ":" in experiment:
        from aggregathor import experiments

        experiment = experiments.get(experiment).name or experiment
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))
    return f"{stamp}-{_clean(experiment)}-{_clean(cfg.gar)}"


def _create_fresh(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = root / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()  # atomic: of two runs started in the same second, one gets -2
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{root} already holds 9999 runs named {name}*; choose --run-dir")


def holds_run(path: Path) -> bool:
    """True when ``path`` holds (part of) a run: its settings, logs, summary or a checkpoint."""
    if any((path / name).exists() for name in _RUN_FILES):
        return True
    ckpts = path / "checkpoints"
    return ckpts.is_dir() and any(ckpts.iterdir())


def stored_config(path: Path) -> dict[str, Any]:
    """The settings a run stored in ``path/config.json``; ConfigError (naming the path) when unreadable."""
    try:
        data = json.loads((path / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"--resume: {path} holds no run (no config.json); drop --resume to start one") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {path}/config.json is unreadable ({type(exc).__name__}); "
                          "it cannot be continued") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--resume: {path}/config.json is not a settings table; it cannot be continued")
    return data


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # as stored: tuples become lists, odd objects strings


def differences(cfg: TrainConfig, stored: dict[str, Any]) -> list[str]:
    """The settings of ``cfg`` that a resume of the run stored as ``stored`` may not have, as ``name (old -> new)``.

    ``steps`` may be raised; the settings of :data:`MAY_DIFFER` are ignored; a setting the stored run lacks is
    compared with its default.
    """
    defaults = TrainConfig().to_dict()
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in MAY_DIFFER:
            continue
        old, new = _plain(stored.get(f.name, defaults[f.name])), _plain(getattr(cfg, f.name))
        if f.name == "steps" and isinstance(old, int) and new >= old:
            continue
        if old != new:
            out.append(f"{f.name} ({old} -> {new})")
    return out


def _check_resume(cfg: TrainConfig, path: Path) -> None:
    if not path.is_dir() or not holds_run(path):
        raise ConfigError(f"--resume: {path} holds no run to continue; drop --resume to start a fresh one")
    stored_config(path)  # a run without its settings cannot be compared: refused
    check_reuse(cfg, path)


def check_reuse(cfg: TrainConfig, path: Path) -> None:
    """What the parameter server checks before it writes to ``path``: a run there is continued only with
    ``cfg.resume`` and the same settings (:func:`differences`). Unlike :func:`prepare`, ``cfg.resume`` on a
    directory without a run is allowed (a job configured to resume, restarted before its server wrote anything).
    Raises ConfigError otherwise."""
    if not (path.is_dir() and holds_run(path)):
        return
    if not cfg.resume:
        raise ConfigError(f"--run-dir {path} already holds a run: continue it with --resume, or give a new "
                          "directory (without --run-dir each run gets a fresh one)")
    if (path / "config.json").exists():
        differ = differences(cfg, stored_config(path))
        if differ:
            raise ConfigError(f"--resume: the settings differ from the stored run in {path}: {', '.join(differ)}; "
                              "steps may be raised (start a fresh run to change the others)")


def prepare(cfg: TrainConfig, root: Path | None = None) -> Path:
    """Decide and create the run directory of ``cfg`` (see the module notes); returns it.

    Parameters
    ----------
    cfg : TrainConfig
        The run; ``cfg.run_dir`` None means a fresh directory under ``root``.
    root : Path, optional
        Where fresh directories go (default :data:`RUNS_ROOT`, relative to the working directory).

    Raises
    ------
    ConfigError
        ``--run-dir`` names a directory that already holds a run (without ``--resume``); ``--resume`` without
        ``--run-dir``, on a directory without a run, or with settings that differ from the stored run's.
    """
    if cfg.run_dir is None:
        if cfg.resume:
            raise ConfigError("--resume needs --run-dir DIR, the directory of the run to continue")
        return _create_fresh(RUNS_ROOT if root is None else root, fresh_name(cfg))
    path = Path(cfg.run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} is a file, not a directory")
    if cfg.resume:
        _check_resume(cfg, path)
    else:
        check_reuse(cfg, path)
    path.mkdir(parents=True, exist_ok=True)
    return path
