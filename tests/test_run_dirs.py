"""Issue 11 requirements 5 and 6: runs never reuse the wrong state; quiet, honest output.

- Each run gets a fresh ``runs/<UTC time>-<experiment>-<gar>`` (suffix ``-2`` in the same second); repeating a
  command trains again, into a new directory (the real CLI, local launcher).
- ``--run-dir`` on a directory that holds a run is refused naming ``--resume``; ``--resume`` is refused naming every
  differing setting; with raised ``--steps`` it continues from the checkpoint. The parameter server refuses too
  (a job started without the launcher's decision, e.g. a restarted LocalJob).
- ``aggregathor plot`` labels curves by the settings that differ.
- The CLI's output has no TensorFlow banner (nor the rank logs) and no line repeated per step; its last lines say
  what ran, where the directory is and what to look at; ``--verbose`` shows the banners.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aggregathor import banners, rundir
from aggregathor.__main__ import main
from aggregathor.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
STAMP = r"\d{8}T\d{6}Z"
#: A tiny simulated run (a few seconds).
SIM = ["--launcher", "simulate", "--workers", "3", "--f", "1", "--byzantine", "0", "--gar", "median", "--steps", "4",
       "--eval-every", "4", "--checkpoint-every", "4", "--quiet"]


def _evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_fresh_directory_names_are_stamped_sanitized_and_unique(tmp_path, monkeypatch):
    cfg = TrainConfig(experiment="aggregathor.experiments.digits:Digits", gar="my pkg/rules:Robust Rule")
    assert re.fullmatch(STAMP + r"-digits-my_pkg_rules_Robust_Rule", rundir.fresh_name(cfg))  # the object's .name
    assert rundir.fresh_name(cfg, when=0).startswith("19700101T000000Z-")
    monkeypatch.setattr(rundir.time, "time", lambda: 1_800_000_000.0)  # two runs in the same second
    plain = TrainConfig(gar="multi-krum")
    first, second, third = (rundir.prepare(plain, root=tmp_path / "runs") for _ in range(3))
    assert first.name == "20270115T080000Z-digits-multi-krum"
    assert (second.name, third.name) == (first.name + "-2", first.name + "-3")
    assert all(p.is_dir() for p in (first, second, third))


def test_run_dir_holding_a_run_is_refused_and_resume_checks_every_setting(tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["train", *SIM, "--run-dir", str(d)]) == 0
    assert [r["step"] for r in _evals(d)] == [4]
    capsys.readouterr()

    def refused(*extra: str) -> str:
        assert main(["train", *SIM, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err  # one line
        return err

    assert "--resume" in refused("--run-dir", str(d))
    err = refused("--run-dir", str(d), "--resume", "--gar", "average", "--lr", "0.05")
    assert "gar (median -> average)" in err and "lr (0.1 -> 0.05)" in err and "steps may be raised" in err
    assert "steps (4 -> 2)" in refused("--run-dir", str(d), "--resume", "--steps", "2")  # lowered: refused
    assert "--resume needs --run-dir" in refused("--resume")
    assert "holds no run" in refused("--run-dir", str(tmp_path / "empty"), "--resume")
    assert [r["step"] for r in _evals(d)] == [4]  # nothing of that touched the run
    # raised steps (and a different evaluation period, which does not change the training) continue the run
    out = tmp_path / "summary.json"
    assert main(["train", *SIM, "--run-dir", str(d), "--resume", "--steps", "8", "--eval-every", "2",
                 "--json-out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    assert [r["step"] for r in _evals(d)] == [4, 6, 8]  # resumed at 4: no step redone
    assert "resumed from step 4" in capsys.readouterr().out


def test_the_server_refuses_a_run_it_was_not_told_to_resume(tmp_path):
    """A job started without the launcher's decision (here the simulation itself, as a restarted LocalJob)."""
    from aggregathor.simulate import simulate

    cfg = TrainConfig.from_dict(dict(launcher="simulate", workers=3, f=1, byzantine=0, gar="median", steps=4,
                                     eval_every=4, checkpoint_every=4, run_dir=str(tmp_path / "run")))
    assert simulate(cfg, progress=False).steps == 4
    with pytest.raises(ConfigError, match="already holds a run: continue it with --resume"):
        simulate(cfg, progress=False)
    other = TrainConfig.from_dict(cfg.to_dict() | {"resume": True, "seed": 5})
    with pytest.raises(ConfigError, match=re.escape("seed (0 -> 5)")):
        simulate(other, progress=False)
    again = TrainConfig.from_dict(cfg.to_dict() | {"resume": True, "steps": 6, "eval_every": 2})
    assert simulate(again, progress=False).resumed_from == 4


def test_compare_trains_both_rules_into_fresh_directories_every_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", *SIM, "--byzantine", "1", "--attack", "reverse", "--compare"]
    assert main(args) == 0 and main(args) == 0
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(dirs) == 4 and sum(d.endswith("-digits-average") for d in dirs) == 2, dirs
    assert all([r["step"] for r in _evals(tmp_path / "runs" / d)] == [4] for d in dirs)
    out = capsys.readouterr().out
    table = out[out.rindex("rule "):].splitlines()
    assert table[1].startswith("median ") and table[2].startswith("average ") and len(table) == 4, table
    assert table[3].startswith("compare the curves: aggregathor plot runs/")


def _fake_run(path: Path, **settings) -> Path:
    path.mkdir(parents=True)
    cfg = TrainConfig(**settings).to_dict() | {"run_dir": str(path)}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "eval.jsonl").write_text(json.dumps({"wall": 1.0, "step": 10, "loss": 1.0, "accuracy": 0.5}) + "\n")
    return path


def test_plot_labels_curves_by_the_settings_that_differ(tmp_path, monkeypatch):
    import matplotlib.figure

    from aggregathor.plot import plot_runs, run_labels

    a = _fake_run(tmp_path / "a", gar="median", loss=0.05, run_dir="x")
    b = _fake_run(tmp_path / "b", gar="multi-krum", loss=0.05)
    c = _fake_run(tmp_path / "c", gar="median", loss=0.0, transport="lossympi", json_out="elsewhere.json")
    assert run_labels([a, b, c]) == ["gar=median, loss=0.05", "gar=multi-krum, loss=0.05", "gar=median, loss=0"]
    twin = _fake_run(tmp_path / "twin", gar="median", loss=0.05)
    assert run_labels([a, twin, b]) == ["gar=median (a)", "gar=median (twin)", "gar=multi-krum"]  # same settings
    assert run_labels([a, twin]) == ["a", "twin"]  # nothing differs: the directory names
    (twin / "config.json").unlink()
    assert run_labels([a, twin]) == ["a", "twin"]
    legends = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: legends.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    plot_runs([a, b], tmp_path / "plots")
    assert legends == [["gar=median", "gar=multi-krum"]] * 2


def test_banners_are_recognised_and_kept_off_stderr_at_import():
    """The mechanism, in a fresh interpreter that loads aggregathor/banners.py by path (so the package's own
    import of TensorFlow does not come first)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {str(ROOT / 'aggregathor' / 'banners.py')!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            "b.import_tensorflow()\n"
            "print(len(b.captured), all(b.is_banner(line) for line in b.captured))\n")
    env = {k: v for k, v in os.environ.items() if k != "AGGREGATHOR_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not any(banners.is_banner(line) for line in proc.stderr.splitlines()), proc.stderr
    count, ok = proc.stdout.split()
    assert int(count) >= 1 and ok == "True"  # TensorFlow did print them: kept for --verbose
    assert banners.is_banner("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert not banners.is_banner("aggregathor train: --f must be >= 0, got -1")


def _lines(text: str) -> list[str]:
    """Lines as a terminal shows them at the end: of a progress bar redrawn with \\r, its last state."""
    return [line.split("\r")[-1].strip() for line in text.split("\n") if line.split("\r")[-1].strip()]


def test_verbose_shows_the_banners(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aggregathor", "train", *SIM, "--verbose"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "oneDNN custom operations are on" in proc.stderr or "absl::InitializeLog()" in proc.stderr


def test_repeated_cli_command_trains_again_quietly_into_a_new_directory(tmp_path):
    """The default output of the real CLI (local launcher; averaging under the nan attack, so that every step has a
    non-finite aggregate): no banner, no line repeated per step; twice the same command, two trained runs."""
    cmd = [sys.executable, "-m", "aggregathor", "train", "--workers", "3", "--f", "1", "--byzantine", "1",
           "--attack", "nan", "--gar", "average", "--steps", "12", "--eval-every", "6", "--checkpoint-every", "6"]
    outputs = []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append((proc.stdout, proc.stderr))
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(re.fullmatch(STAMP + r"-digits-average(-2)?", d.name) for d in dirs), dirs
    for d, (out, err) in zip(dirs, outputs, strict=True):
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == 12 and summary["resumed_from"] == 0  # trained, not resumed
        assert [r["step"] for r in _evals(d)] == [6, 12]
        lines = _lines(out) + _lines(err)
        assert not [line for line in lines if banners.is_banner(line)], err
        for log in (d / "logs").glob("rank*.log"):
            assert not [line for line in _lines(log.read_text()) if banners.is_banner(line)], log
        # a line printed at every step differs by its numbers only (step, time): compare them without the numbers;
        # the progress bar's redraws (n/N [elapsed<left]) are not printed lines
        shapes = [re.sub(r"\d+", "#", line) for line in lines if not re.search(r"\d+/\d+ \[", line)]
        repeated = {shape: n for shape, n in collections.Counter(shapes).items() if n > 1}
        assert not repeated, repeated
        lines = _lines(out)
        assert lines[0] == f"run directory: runs/{d.name}"
        assert lines[-4].startswith("ran: average with 3 workers, f=1, 1 Byzantine (nan), transport lossympi")
        assert lines[-3].startswith("result: accuracy ")
        assert lines[-2].startswith(f"saved in runs/{d.name}: eval.jsonl, steps.jsonl, summary.json, logs/")
        assert lines[-1] == f"next: tensorboard --logdir runs/{d.name}/tensorboard; aggregathor plot runs/{d.name}"
