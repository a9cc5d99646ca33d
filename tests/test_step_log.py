"""Issue 7 item 5: the server writes one JSON row per step to ``<run_dir>/steps.jsonl`` (read by tools/soak.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregathor.config import ConfigError, TrainConfig
from aggregathor.launch import launch

FIELDS = {"step", "wall", "seconds", "deadline", "gather_seconds", "control_seconds", "params_seconds", "lost_chunks",
          "chunks", "lost_gradients"}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(launcher="simulate", workers=4, f=1, byzantine=0, gar="median", steps=12, eval_every=5,
                checkpoint_every=0, loss=0.05, deadline=2.0, run_dir=str(tmp_path / "run"), seed=3)
    return TrainConfig.from_dict(base | kw)


@pytest.mark.parametrize("launcher", ["simulate", "local"])  # local: real ranks, lossympi's numpy counters
def test_a_short_run_writes_one_row_per_step_with_its_timings_and_losses(tmp_path, launcher):
    summary = launch(_cfg(tmp_path, launcher=launcher, workers=3), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(12))
    for r in rows:
        assert set(r) >= FIELDS, r
        assert 0 < r["gather_seconds"] <= r["seconds"]
        assert r["control_seconds"] + r["params_seconds"] + r["gather_seconds"] <= r["seconds"] + 1e-4
        assert 0 < r["deadline"] <= 2.0
        assert 0 <= r["lost_chunks"] <= r["chunks"]
        assert 0 <= r["lost_gradients"] <= 3
    walls = [r["wall"] for r in rows]
    assert walls == sorted(walls) and walls[-1] <= summary.wall_seconds
    assert sum(r["chunks"] for r in rows) > 0
    # the rows add up to the run's totals
    total_lost = sum(r["lost_chunks"] for r in rows) / sum(r["chunks"] for r in rows)
    assert total_lost == pytest.approx(summary.lost_chunk_fraction)
    assert sum(r["lost_gradients"] for r in rows) == summary.lost_gradients


def test_step_log_off_writes_no_file(tmp_path):
    launch(_cfg(tmp_path, steps=3, step_log=False), progress=False)
    assert (tmp_path / "run" / "eval.jsonl").exists()
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def test_step_log_must_be_a_boolean(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('step_log = "yes"\n')
    with pytest.raises(ConfigError, match="--step-log must be true or false"):
        TrainConfig.from_toml(path)
    path.write_text("step_log = false\n")
    assert TrainConfig.from_toml(path).step_log is False


def test_cli_has_step_log_and_no_step_log_flags():
    import argparse

    from aggregathor.__main__ import _config, _train_parser

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="cmd"))
    assert _config(parser.parse_args(["train"])).step_log is True
    assert _config(parser.parse_args(["train", "--no-step-log"])).step_log is False
    assert _config(parser.parse_args(["train", "--step-log"])).step_log is True


def test_a_non_finite_aggregate_skips_the_update_and_is_counted(tmp_path):
    """Averaging a NaN row gives NaN: the server leaves the model as it was and counts the step."""
    cfg = TrainConfig.from_dict(dict(launcher="simulate", gar="average", workers=3, f=1, byzantine=1, attack="nan",
                                     loss=0.0, steps=4, eval_every=4, checkpoint_every=0,
                                     run_dir=str(tmp_path / "run")))
    summary = launch(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert summary.skipped_updates == 4 and all(r.get("update_skipped") for r in rows)
    assert all(r["nonfinite"] == [3] for r in rows)  # and the offending rank is named


def test_the_log_ends_a_torn_row_and_flushes_on_its_period(tmp_path):
    from aggregathor.steplog import JsonLines

    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "wa')  # a server killed mid-write
    slow = JsonLines(path, flush_every=3600.0)
    slow.write({"step": 2})
    assert path.read_text().endswith('"wa\n')  # the torn row is ended; the new one waits in the buffer
    slow.flush()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0} and json.loads(lines[2]) == {"step": 2}
    slow.close()
    eager = JsonLines(path)  # flush_every=0: every row is on disk at once
    eager.write({"step": 3})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3}
    eager.close()


def test_a_step_record_is_the_documented_row():
    from aggregathor.steplog import StepRecord

    rec = StepRecord(7, start=10.0, params_at=10.001, gather_at=10.003, gathered_at=10.05, deadline=0.123456789,
                     lost_chunks=2, chunks=40, lost_gradients=1, missing_workers=1, params_chunks=40,
                     params_lost_chunks=3, events={"nonfinite": [3]})
    row = rec.row(end=10.06, t0=9.0)
    assert list(row) == ["step", "wall", "seconds", "deadline", "gather_seconds", "control_seconds", "params_seconds",
                         "lost_chunks", "chunks", "lost_gradients", "missing_workers", "params_chunks",
                         "params_lost_chunks", "aggregation", "aggregated_rows", "nonfinite"]
    assert (row["params_chunks"], row["params_lost_chunks"]) == (40, 3)
    assert row["wall"] == 1.06 and row["seconds"] == 0.06 and row["deadline"] == 0.12346
    assert (row["control_seconds"], row["params_seconds"], row["gather_seconds"]) == (0.001, 0.002, 0.047)
    rec.update_skipped = True
    assert rec.row(10.06, 9.0)["update_skipped"] is True
