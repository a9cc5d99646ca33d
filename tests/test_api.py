"""``aggregathor.train(experiment, **settings)``: the Python API."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import pytest

import aggregathor
from aggregathor import experiments
from aggregathor.config import ConfigError

USER = Path(__file__).parent / "user_code" / "bn_breast_cancer.py"


def _build() -> keras.Model:
    return keras.Sequential([keras.Input((30,)), keras.layers.BatchNormalization(momentum=0.9),
                             keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


def _unbound_experiment() -> aggregathor.KerasExperiment:
    """A KerasExperiment that no module binds (made in a function, as in a notebook)."""
    data = experiments.get(f"{USER}:experiment")
    return aggregathor.KerasExperiment(_build, train=data.train_data(), test=data.test_data(), name="unbound")


def test_train_runs_an_unbound_experiment_in_process_several_times_without_retracing_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three runs of a fresh experiment object in one process (server and 4 workers each: 15 models): every
    run trains, and TensorFlow never warns about retracing (each model's functions are traced once)."""
    caplog.set_level(logging.WARNING)
    accuracies = []
    for i in range(3):
        summary = aggregathor.train(_unbound_experiment(), launcher="simulate", workers=4, f=0, byzantine=0,
                                    gar="average", steps=40, eval_every=40, run_dir=str(tmp_path / f"run{i}"))
        assert isinstance(summary, aggregathor.RunSummary) and summary.steps == 40
        accuracies.append(summary.accuracy)
    assert min(accuracies) > 0.85, accuracies
    retracing = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert retracing == []


def test_train_refuses_an_unbound_experiment_with_a_launcher_that_starts_processes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot find this KerasExperiment: bind it at the top level"):
        aggregathor.train(_unbound_experiment(), launcher="local", workers=2, f=0, byzantine=0, gar="average",
                          run_dir=str(tmp_path / "r"))


def test_train_finds_a_module_level_experiment_by_reference(tmp_path: Path) -> None:
    from aggregathor.api import _reference

    exp = experiments.get(f"{USER}:experiment")
    assert _reference(exp, "local") == f"{USER}:experiment"  # what the other ranks import


def test_a_file_that_trains_at_import_is_refused_instead_of_recursing(tmp_path: Path) -> None:
    """Every rank imports the experiment's file: a train() call without the __main__ guard would start a job in
    every rank, recursively. It fails with the fix instead."""
    user = tmp_path / "unguarded.py"
    user.write_text(f"import aggregathor\nfrom aggregathor import experiments\n"
                    f"experiment = experiments.get({str(USER) + ':experiment'!r})\n"
                    "aggregathor.train(experiment, workers=2, f=0, byzantine=0, gar='average')\n")
    with pytest.raises(ValueError, match=r"put the train\(\) call under `if __name__ == \"__main__\":`"):
        experiments.get(f"{user}:experiment")


def test_train_rejects_unknown_settings() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        aggregathor.train("digits", launcher="simulate", wrokers=3)
