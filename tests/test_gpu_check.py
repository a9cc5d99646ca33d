"""``tools/gpu_check.sh`` (issue 14 requirement 5), tested for everything but the GPU itself.

- On this CPU with ``--no-install --allow-cpu`` and tiny sizes: every phase runs (devices and the rules' placement,
  the gars bench, a simulated training run) and the summary it prints and writes (``gpu_check_summary.json``) holds
  the targets of the three rules, judged from the bench's JSON, and the run.
- Without ``--allow-cpu``, a machine whose TensorFlow sees no GPU stops the check with one clear line.
- The verdict on a GPU, from files shaped like the check's (tools/gpu_check_summary.py): the targets met or not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check_summary  # noqa: E402


def _check(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--no-install", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sees_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def test_the_check_runs_on_the_cpu_with_tiny_sizes_and_writes_its_summary(tmp_path: Path) -> None:
    done = _check("--allow-cpu", "--out", str(tmp_path), "--d", "100000", "--steps", "5", "--workers", "5",
                  "--f", "1", "--rules", "median,trimmed-mean,multi-krum", "--train-rules", "median")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["ok"] and summary["problems"] == [], summary
    assert set(summary["phases"]) == {"devices", "bench", "train"}  # no install with --no-install
    bench = json.loads((tmp_path / "gars.json").read_text())
    ratios = {(r["rule"], r["d"]): r["ratio_vs_floor"] for r in bench["records"]}
    got = {(t["rule"], t["d"]): t for t in summary["targets"]}
    assert set(got) == {("median", 100000), ("trimmed-mean", 100000), ("multi-krum", 100000)}
    for key, t in got.items():  # judged from the bench's JSON
        assert t["ratio_vs_floor"] == ratios[key] and t["met"] == (ratios[key] <= 2.0), t
    if not _sees_gpu():
        assert summary["gpus"] == [] and summary["device"] == "CPU:0"
        assert "ran on the CPU" in summary["verdict"] and "not a GPU measurement" in done.stdout
    (run,) = summary["training"]
    assert run["rule"] == "median" and run["steps"] == 5 and 0.0 <= run["accuracy"] <= 1.0, run
    assert run["aggregate_device"].endswith(("CPU:0", "GPU:0")), run
    assert json.loads((tmp_path / "train-median.json").read_text())["steps"] == 5
    # the printed summary: one line per (n, d) with each rule's ratio and whether it is met
    line = next(x for x in done.stdout.splitlines() if x.strip().startswith("n=20 d=100000"))
    for rule in ("median", "trimmed-mean", "multi-krum"):
        assert f"{rule} {got[(rule, 100000)]['ratio_vs_floor']:.2f}x" in line, line
    assert "verdict:" in done.stdout


def test_without_a_gpu_the_check_stops_with_one_clear_line(tmp_path: Path) -> None:
    if _sees_gpu():
        pytest.skip("TensorFlow sees a GPU here")
    done = _check("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "gpu_check: TensorFlow sees no GPU" in done.stderr and "--allow-cpu" in done.stderr, done.stderr
    assert not (tmp_path / "gars.json").exists()  # nothing measured on the CPU by mistake


def test_a_bad_flag_is_refused_with_its_name() -> None:
    done = _check("--d")
    assert done.returncode == 2 and "--d needs a value" in done.stderr, done.stderr
    done = _check("--steps", "many")
    assert done.returncode == 2 and "--steps must be a non-negative integer" in done.stderr, done.stderr
    done = _check("--gpu")
    assert done.returncode == 2 and "unknown flag --gpu" in done.stderr, done.stderr


def _files(out: Path, ratios: dict[tuple[str, int], float | None]) -> None:
    """Files shaped like the check's on a GPU (the numbers are the test's inputs, not measurements)."""
    (out / "devices.json").write_text(json.dumps({"tensorflow": "2.x", "cuda_build": True, "devices": [
        {"name": "/physical_device:CPU:0", "type": "CPU"}, {"name": "/physical_device:GPU:0", "type": "GPU"}]}))
    (out / "placement.json").write_text(json.dumps({"median": "/device:GPU:0"}))
    records = [{"rule": rule, "n": 20, "d": d, "device": "GPU:0", "ratio_vs_floor": ratio, "seconds": 0.002,
                "floor_seconds": 0.001, "error": None if ratio is not None else "ResourceExhaustedError: OOM"}
               for (rule, d), ratio in ratios.items()]
    (out / "gars.json").write_text(json.dumps({"device": "GPU:0", "device_description": "a GPU", "records": records}))
    (out / "train-median.json").write_text(json.dumps({"steps": 100, "accuracy": 0.9, "steps_per_second": 50.0,
                                                      "skipped_updates": 0}))
    (out / "phases.tsv").write_text("devices\t0\t4000\nbench\t0\t60000\ntrain\t0\t30000\n")


def test_the_verdict_on_a_gpu_names_the_targets_not_met(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ratios = {("median", 10**7): 1.2, ("trimmed-mean", 10**7): 2.0, ("multi-krum", 10**7): 2.01,
              ("median", 25 * 10**6): 1.1, ("trimmed-mean", 25 * 10**6): 1.3, ("multi-krum", 25 * 10**6): 1.9,
              ("bulyan", 10**7): 9.0}  # bulyan has no GPU target
    _files(tmp_path, ratios)
    assert gpu_check_summary.main([str(tmp_path), "--train-rules", "median"]) == 0
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["verdict"] == "1 of 6 GPU targets NOT met: multi-krum at d=1e7", summary["verdict"]
    assert summary["training"][0]["aggregate_device"] == "/device:GPU:0"
    out = capsys.readouterr().out
    assert "n=20 d=1e7 (floor 1.00 ms): median 1.20x met | trimmed-mean 2.00x met | multi-krum 2.01x NOT met" in out
    assert "n=20 d=2.5e7" in out

    ratios = {k: v for k, v in ratios.items() if k[0] != "multi-krum"} | {("multi-krum", 10**7): None}
    _files(tmp_path, ratios)
    assert gpu_check_summary.main([str(tmp_path), "--train-rules", "median"]) == 0
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["verdict"].startswith("1 of 5 GPU targets NOT met: multi-krum at d=1e7")
    assert "multi-krum failed (ResourceExhaustedError: OOM)" in capsys.readouterr().out

    (tmp_path / "train-median.json").unlink()  # a run that did not finish: incomplete, exit status 1
    assert gpu_check_summary.main([str(tmp_path), "--train-rules", "median"]) == 1
    assert json.loads((tmp_path / "gpu_check_summary.json").read_text())["verdict"].startswith("INCOMPLETE")
