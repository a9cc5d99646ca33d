"""Data-space attacks: label flipping and the original's data poisoning."""

from __future__ import annotations

import numpy as np
import pytest

from aggregathor import attacks
from aggregathor.config import TrainConfig
from aggregathor.launch import launch


def test_label_flip_maps_each_label_to_its_mirror():
    a = attacks.get("label-flip", classes=10)
    x = np.ones((4, 3), np.float32)
    x2, y2 = a.poison(x, np.array([0, 1, 8, 9]), np.random.default_rng(0))
    assert x2 is x and y2.tolist() == [9, 8, 1, 0]
    with pytest.raises(ValueError, match="labels must lie"):
        a.poison(x, np.array([10]), np.random.default_rng(0))


def test_data_poisoning_scales_pixels_negatively_and_shuffles_labels():
    a = attacks.get("data-poison", scale=1e4)
    x = np.full((50, 2), 0.5, np.float32)
    y = np.arange(50)
    x2, y2 = a.poison(x, y, np.random.default_rng(1))
    assert np.all(x2 == -5000.0) and x2.dtype == np.float32
    assert sorted(y2.tolist()) == y.tolist() and not np.array_equal(y2, y)


def test_data_attacks_are_not_gradient_forgers():
    with pytest.raises(TypeError, match="data-space"):
        attacks.get("label-flip")(np.zeros((3, 2)), 1)


@pytest.mark.parametrize("attack", ["label-flip", "data-poison"])
def test_data_attack_runs_in_training_and_the_robust_rule_still_learns(tmp_path, attack):
    cfg = TrainConfig.from_dict(dict(launcher="simulate", gar="median", workers=5, f=1, byzantine=1, attack=attack,
                                     steps=80, eval_every=80, loss=0.0, run_dir=str(tmp_path / "run"), seed=3))
    assert launch(cfg, progress=False).accuracy > 0.8


def test_data_attacks_fit_the_experiment_or_refuse_it_in_one_line() -> None:
    """label-flip needs class labels (a regression experiment is refused before any process starts);
    data-poison scales every float array of a dict input and leaves integer ones alone."""
    import sys
    import types

    import keras

    import aggregathor
    from aggregathor.attacks import get
    from aggregathor.config import ConfigError, TrainConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    exp = aggregathor.KerasExperiment(lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                                      train=(x, x.sum(1)), test=(x, x.sum(1)), loss="mse", name="reg")
    sys.modules["_test_regression_module"] = module = types.ModuleType("_test_regression_module")
    module.experiment = exp
    cfg = TrainConfig(experiment="_test_regression_module:experiment", attack="label-flip", gar="median",
                      workers=3, f=1, byzantine=1)
    with pytest.raises(ConfigError, match="label-flip flips class labels, but experiment 'reg' is a regression"):
        cfg.validate()
    poisoned, _ = get("data-poison").poison({"a": x[:2], "ids": np.arange(2)}, np.zeros(2), rng)
    np.testing.assert_array_equal(poisoned["a"], x[:2] * -1e4)
    np.testing.assert_array_equal(poisoned["ids"], np.arange(2))
