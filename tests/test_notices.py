"""Repeating conditions are logged once, then counted: totals at each evaluation and in the summary."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aggregathor.config import TrainConfig
from aggregathor.launch import launch


def test_a_condition_of_every_step_is_logged_once_then_totalled_per_evaluation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Averaging with a NaN-sending worker skips every update: one line when it first happens, one totals line
    per evaluation, and the summary's count; not 30 lines."""
    caplog.set_level(logging.WARNING, logger="aggregathor.server")
    cfg = TrainConfig(launcher="simulate", workers=3, f=1, byzantine=1, attack="nan", gar="average", steps=30,
                      eval_every=10, loss=0.0, run_dir=str(tmp_path / "run"))
    summary = launch(cfg, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "aggregathor.server"]
    assert summary.skipped_updates == 30
    assert sum("the aggregate is not finite" in line for line in lines) == 1, lines
    totals = [line for line in lines if "since the last report" in line]
    assert totals == [f"step {s}: since the last report: 10 updates skipped (non-finite aggregate)"
                      for s in (10, 20, 30)], lines
    assert len(lines) == 4
