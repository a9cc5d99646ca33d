"""Issue 6: training runs end to end (simulated, multi-process over loopback UDP, under mpiexec)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregathor.config import ConfigError, TrainConfig
from aggregathor.launch import launch

ROOT = Path(__file__).resolve().parent.parent


def cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(steps=60, eval_every=30, checkpoint_every=30, run_dir=str(tmp_path / "run"), seed=1)
    return TrainConfig.from_dict(base | kw)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(gar="multi-krum", workers=8, f=3), "n >= 2f + 3"),
        (dict(gar="bulyan", workers=8, f=2), "n >= 4f + 3"),
        (dict(byzantine=9, workers=8), "between 0 and the number of workers"),
        (dict(byzantine=2, f=1), "exceeds the declared bound"),
        (dict(gar="no-such-rule"), "unknown aggregation rule"),
        (dict(attack="no-such-attack"), "--attack: unknown attack"),
        (dict(experiment="imagenet"), "--experiment: unknown experiment"),
        (dict(transport="carrier-pigeon"), "unknown --transport"),
        (dict(transport="mpi", loss=0), "needs the MPI launcher"),
        (dict(loss=1.5), "--loss"),
        (dict(unknown_knob=1), "unknown setting"),
    ],
)
def test_impossible_settings_fail_before_anything_starts(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(tmp_path, **settings)


def test_cli_reports_a_config_error_with_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aggregathor", "train", "--gar", "krum", "--workers", "4",
                           "--f", "1", "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "n >= 2f + 3" in proc.stderr


def test_toml_config_and_flag_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\ngar = "median"\nworkers = 5\nf = 2\nbyzantine = 0\nsteps = 7\n')
    c = TrainConfig.from_toml(path, steps=9)
    assert (c.gar, c.workers, c.f, c.steps) == ("median", 5, 2, 9)


def test_settings_are_checked_once_per_config_and_again_after_a_change(tmp_path, monkeypatch):
    """validate() builds the rule (TensorFlow): from_dict, launch and the rank's set-up share one check."""
    from aggregathor import config, gars

    built = []
    real = gars.get
    monkeypatch.setattr(gars, "get", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    config._rule_nan_robust.cache_clear()
    c = cfg(tmp_path, gar="median", workers=4, f=1, byzantine=0)
    assert c.validate() is c and c.validate() is c
    assert math.isnan(c.lost_row_fill) and built == ["median"]  # a NaN-robust rule: lost rows are NaN
    TrainConfig.from_dict(c.to_dict() | {"launcher": "simulate"})  # a copy (a rank's config): no new rule
    assert built == ["median"]
    c.gar = "average"  # a change is checked again, and lost_row_fill derived again
    assert c.lost_row_fill == 0.0 and built == ["median", "average"]
    c.workers = 0
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        c.validate()
    two = cfg(tmp_path, gar="median", workers=5, f=2, byzantine=2)  # the last two ranks attack
    assert [two.is_byzantine(r) for r in range(1, 6)] == [False, False, False, True, True]


def test_simulated_run_resists_one_byzantine_worker_where_averaging_fails(tmp_path):
    common = dict(launcher="simulate", workers=8, f=1, byzantine=1, attack="reverse", steps=120, eval_every=60,
                  loss=0.02)
    robust = launch(cfg(tmp_path / "mk", gar="multi-krum", **common), progress=False)
    broken = launch(cfg(tmp_path / "avg", gar="average", **common), progress=False)
    assert robust.accuracy > 0.85, robust
    assert broken.accuracy < 0.5, broken
    assert 0.005 < robust.lost_chunk_fraction < 0.05


def test_checkpoint_resume_continues_at_the_saved_step(tmp_path):
    c = cfg(tmp_path, launcher="simulate", gar="median", f=1, byzantine=0, steps=30, eval_every=30,
            checkpoint_every=30, loss=0.0)
    first = launch(c, progress=False)
    assert first.steps == 30
    c2 = TrainConfig.from_dict(c.to_dict() | {"steps": 45, "eval_every": 15, "resume": True})
    second = launch(c2, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [30, 45]  # resumed at 30: no step was redone
    assert second.steps == 45


def _check_summary(path: Path, steps: int) -> dict:
    summary = json.loads(path.read_text())
    for key in ("accuracy", "steps", "wall_seconds", "steps_per_second", "lost_chunk_fraction"):
        assert key in summary
    assert summary["steps"] == steps
    return summary


def test_multiprocess_training_over_loopback_udp(tmp_path):
    """A real run: 1 server + 4 workers as processes, lossympi UDP with 1% emulated loss, 1 Byzantine."""
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "aggregathor", "train", "--workers", "4", "--f", "1", "--byzantine", "1",
         "--gar", "median", "--attack", "reverse", "--steps", "80", "--eval-every", "40", "--loss", "0.01",
         "--run-dir", str(tmp_path / "run"), "--json-out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = _check_summary(out, 80)
    assert summary["accuracy"] > 0.8, summary
    assert (tmp_path / "run" / "eval.jsonl").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_training_under_mpiexec(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip(f"no mpiexec next to {sys.executable} nor on PATH")
        mpiexec = Path(found)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_", "PMIX"))}
    env |= {"HYDRA_LAUNCHER": "fork", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [str(mpiexec), "-n", "4", sys.executable, "-m", "aggregathor", "train", "--launcher", "mpi",
         "--workers", "3", "--f", "0", "--byzantine", "0", "--gar", "average", "--steps", "40", "--eval-every", "40",
         "--loss", "0", "--json-out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = _check_summary(out, 40)
    assert summary["accuracy"] > 0.7, summary
    # rank 0 decided the fresh run directory and told the others: one directory, announced once
    dirs = list((tmp_path / "runs").iterdir())
    assert len(dirs) == 1 and (dirs[0] / "eval.jsonl").is_file(), dirs
    assert proc.stdout.count("run directory: ") == 1 and summary["config"]["run_dir"] == f"runs/{dirs[0].name}"
