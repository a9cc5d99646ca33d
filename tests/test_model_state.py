"""The model's state (non-trainable variables such as BatchNormalization's moving statistics) reaches the server,
aggregated by a coordinate-wise median that Byzantine workers cannot move (aggregathor.state)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregathor import experiments
from aggregathor.config import TrainConfig
from aggregathor.launch import launch
from aggregathor.state import aggregate_state
from aggregathor.transport.base import GatherReport

USER = Path(__file__).parent / "user_code" / "bn_breast_cancer.py"
REF = f"{USER}:experiment"


def _report(n: int, delivered: list[float] | None = None, masks: dict | None = None) -> GatherReport:
    return GatherReport(np.array(delivered if delivered is not None else [1.0] * n), masks=masks or {})


def test_state_median_ignores_byzantine_and_lost_values() -> None:
    rows = np.array([[9, 1, 10], [9, 2, 20], [9, 3, 30], [9, -1e30, np.nan], [9, 5, 7]], np.float32)
    masks = {5: np.array([True, True, False])}  # worker 5's last value never arrived (it is a fill)
    got = aggregate_state(rows, _report(5, [1, 1, 1, 1, 0.5], masks), 1, np.zeros(2, np.float32), f=1)
    np.testing.assert_array_equal(got, [2.0, 20.0])  # median of (1,2,3,-1e30,5); of (10,20,30): NaN is missing


def test_state_is_kept_when_fewer_than_2f_plus_1_values_arrived() -> None:
    """One honest and one Byzantine value (three rows lost): their median would be half Byzantine; keep the
    server's value instead."""
    rows = np.array([[0, 1.0], [0, -100.0], [0, 0], [0, 0], [0, 0]], np.float32)
    got = aggregate_state(rows, _report(5, [1, 1, 0, 0, 0]), 1, np.array([0.9], np.float32), f=1)
    np.testing.assert_array_equal(got, np.float32([0.9]))
    got = aggregate_state(rows, _report(5, [1, 1, 1, 0, 0]), 1, np.array([0.9], np.float32), f=1)
    np.testing.assert_array_equal(got, [0.0])  # three values arrived: median(1, -100, 0)


def test_state_keeps_the_server_value_where_nothing_arrived() -> None:
    rows = np.full((3, 3), 7.0, np.float32)
    got = aggregate_state(rows, _report(3, [0, 0, 0]), 1, np.array([1.5, 2.5], np.float32), f=0)
    np.testing.assert_array_equal(got, [1.5, 2.5])


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 9), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38]))
def test_state_stays_within_the_honest_values(n: int, s: int, seed: int, poison: float) -> None:
    """With f < n / 2 arbitrary rows, every coordinate lies between the smallest and the largest honest value
    (the median's robustness), checked against the honest values themselves."""
    rng = np.random.default_rng(seed)
    f = (n - 1) // 2
    rows = rng.normal(size=(n, 1 + s)).astype(np.float32)
    rows[n - f:, 1:] = poison
    got = aggregate_state(rows, _report(n), 1, np.zeros(s, np.float32), f=f)
    honest = rows[:n - f, 1:]
    if np.isnan(poison) and n - f < 2 * f + 1:  # NaN is missing: too few values arrived, the state is kept
        np.testing.assert_array_equal(got, np.zeros(s, np.float32))
    else:
        assert np.all(got >= honest.min(axis=0)) and np.all(got <= honest.max(axis=0))


def test_flat_view_carries_floating_state_only() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2)])
    view = experiments.FlatView(model)
    assert view.state_size == 8 and view.wire_size == view.size + 8  # moving mean + variance; no seed state
    msg = np.arange(view.wire_size, dtype=np.float32)
    view.set_message(msg)
    out = np.zeros(view.wire_size, np.float32)
    view.get_message(out)
    np.testing.assert_array_equal(out, msg)
    np.testing.assert_array_equal(model.layers[0].moving_variance.numpy(), msg[view.size + 4:])


def _server_accuracy(tmp_path: Path, **kw) -> tuple[float, np.ndarray]:
    cfg = TrainConfig(experiment=REF, launcher="simulate", steps=150, lr=0.05, loss=0.0, eval_every=150,
                      run_dir=str(tmp_path / f"run-{kw['workers']}"), **kw)
    summary = launch(cfg, progress=False)
    model = experiments.get(REF).build_model(0)  # the server's final model, from its last checkpoint
    import tensorflow as tf

    tf.train.Checkpoint(model=model).read(str(sorted((Path(cfg.run_dir) / "checkpoints").glob("step-*"))[-1]
                                              / "ckpt")).expect_partial()
    return float(summary.accuracy), model.layers[0].moving_mean.numpy()


def test_batchnorm_statistics_are_right_at_the_server_despite_a_byzantine_worker(tmp_path: Path) -> None:
    """Raw features of very different scales (up to ~2500) are standardized by BatchNormalization: the server's
    model only classifies well with the workers' moving statistics, which a reversed (x -100) Byzantine state
    cannot drag away. Reference: the same model trained on one process."""
    one, _ = _server_accuracy(tmp_path, workers=1, f=0, byzantine=0, gar="average")
    robust, mean = _server_accuracy(tmp_path, workers=5, f=1, byzantine=1, attack="reverse", gar="multi-krum")
    assert one > 0.9
    assert robust >= one - 0.02, (robust, one)
    data_mean = experiments.get(REF).train_data()[0].mean(axis=0)
    np.testing.assert_allclose(mean, data_mean, rtol=0.25)  # the moving mean tracks the data, not 0 or -100x


def test_state_survives_datagram_loss(tmp_path: Path) -> None:
    """With 5% of the chunks lost (the state's filled like the gradient's), the median still gives usable
    statistics (what the masks leave out is tested above)."""
    cfg = TrainConfig(experiment=REF, launcher="simulate", steps=60, lr=0.05, loss=0.05, eval_every=60,
                      workers=5, f=1, byzantine=0, gar="median", run_dir=str(tmp_path / "lossy"))
    assert launch(cfg, progress=False).accuracy > 0.85
