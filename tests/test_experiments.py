"""aggregathor.experiments: registry, digits data, partitions, batches, flat vectors, offline errors, sizes."""

from __future__ import annotations

import gzip
import io
import pickle
import random
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

from aggregathor import experiments as E
from aggregathor.experiments import _keras_data

KNOWN = ["cifar10", "digits", "fashion-mnist", "mnist", "resnet50", "synthetic"]


@pytest.fixture(scope="module")
def digits() -> E.Experiment:
    return E.get("digits")


# ---------------------------------------------------------------------- registry
def test_registry_and_unknown_name() -> None:
    assert E.names() == KNOWN
    assert E.get().name == "digits" == E.DEFAULT
    with pytest.raises(ValueError, match="unknown experiment 'imagenet'; known: cifar10, digits, fashion-mnist"):
        E.get("imagenet")
    with pytest.raises(TypeError, match="unknown option.*colour.*known: model"):
        E.get("digits", colour="red")
    with pytest.raises(ValueError, match="model must be"):
        E.get("mnist", model="transformer")
    exp = E.get("synthetic", dims=8, classes=3)
    cfg = exp.get_config()
    assert cfg["name"] == "synthetic" and cfg["dims"] == 8
    assert E.get(**cfg).get_config() == cfg


# ---------------------------------------------------------------------- digits data
def test_digits_offline_split_deterministic(digits: E.Experiment) -> None:
    (xtr, ytr), (xte, yte) = digits.train_data(), digits.test_data()
    assert xtr.shape == (1437, 64) and xte.shape == (360, 64)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    # stratified: every class holds 35-37 of the 360 test samples
    assert set(np.bincount(yte, minlength=10)) <= {35, 36, 37}
    # cached once per process, shared and read-only
    assert E.get("digits", model="cnn").train_data()[0] is xtr
    with pytest.raises(ValueError):
        xtr[0, 0] = 1.0
    # a fresh load gives the very same split
    (xtr2, ytr2), (xte2, yte2) = digits._load()
    np.testing.assert_array_equal(xtr2, xtr)
    np.testing.assert_array_equal(ytr2, ytr)
    np.testing.assert_array_equal(xte2, xte)
    np.testing.assert_array_equal(yte2, yte)


# ---------------------------------------------------------------------- partitions
def _check_disjoint_complete(shards: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(shards)
    assert allidx.size == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    assert all(s.size > 0 for s in shards)


def test_partition_iid(digits: E.Experiment) -> None:
    n = digits.train_data()[1].size
    shards = digits.partition(7, seed=3)
    assert len(shards) == 7
    _check_disjoint_complete(shards, n)
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = digits.partition(7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = digits.partition(7, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def _max_class_fraction(shards: list[np.ndarray], y: np.ndarray) -> float:
    return float(np.mean([np.bincount(y[s], minlength=10).max() / s.size for s in shards]))


def test_partition_dirichlet_skewed_and_nonempty(digits: E.Experiment) -> None:
    y = digits.train_data()[1]
    shards = digits.partition(10, scheme="dirichlet", alpha=0.1, seed=0)
    _check_disjoint_complete(shards, y.size)
    iid = digits.partition(10, scheme="iid", seed=0)
    # skewed class mixes: a dominant class per worker, unlike iid (~0.12)
    assert _max_class_fraction(shards, y) > 0.5 > 0.2 > _max_class_fraction(iid, y)
    again = digits.partition(10, scheme="dirichlet", alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    # many workers and a tiny alpha leave some workers without samples: the fix-up fills every shard
    many = digits.partition(300, scheme="dirichlet", alpha=0.01, seed=1)
    _check_disjoint_complete(many, y.size)


def test_partition_errors(digits: E.Experiment) -> None:
    with pytest.raises(ValueError, match="unknown partition scheme 'zipf'; known: dirichlet, iid"):
        digits.partition(4, scheme="zipf")
    with pytest.raises(ValueError, match="non-empty shards"):
        digits.partition(5000)
    with pytest.raises(ValueError, match="alpha > 0"):
        digits.partition(4, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="positive int"):
        digits.partition(0)


# ---------------------------------------------------------------------- batches
def test_batches_deterministic_disjoint_epochs(digits: E.Experiment) -> None:
    x, y = digits.train_data()
    shards = digits.partition(4, seed=0)
    a = [b for _, b in zip(range(30), digits.batches(shards[0], 32, seed=(0, 1)), strict=False)]
    b = [b for _, b in zip(range(30), digits.batches(shards[0], 32, seed=(0, 1)), strict=False)]
    c = [b for _, b in zip(range(30), digits.batches(shards[0], 32, seed=(0, 2)), strict=False)]
    assert all(xb.shape == (32, 64) and yb.shape == (32,) for xb, yb in a)  # static shapes, across epochs too
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    # each epoch visits every sample of the shard exactly once, in a new order
    e1 = np.concatenate(list(digits.batch_indices(shards[1], 32, seed=5, epochs=1)))
    np.testing.assert_array_equal(np.sort(e1), shards[1])
    e2 = np.concatenate(list(digits.batch_indices(shards[1], 32, seed=5, epochs=2)))
    assert e2.size == 2 * shards[1].size and not np.array_equal(e2[:e1.size], e2[e1.size:])
    # the batches gather exactly the indexed samples
    idx = next(digits.batch_indices(shards[2], 16, seed=9))
    xb, yb = next(digits.batches(shards[2], 16, seed=9))
    np.testing.assert_array_equal(xb, x[idx])
    np.testing.assert_array_equal(yb, y[idx])
    # two workers never see a common sample
    seen = [set(np.concatenate([i for _, i in zip(range(20), digits.batch_indices(s, 32, seed=(0, r)),
                                                      strict=False)]).tolist()) for r, s in enumerate(shards)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not seen[i] & seen[j]
    # a shard smaller than the batch still yields full batches
    tiny = list(zip(range(3), digits.batches(shards[3][:5], 8, seed=0), strict=False))
    assert all(xb.shape == (8, 64) for _, (xb, _) in tiny)
    with pytest.raises(ValueError, match="shard indices"):
        next(digits.batches(np.array([10**6]), 4))


# ---------------------------------------------------------------------- flat vectors and gradients
def test_flat_round_trip(digits: E.Experiment) -> None:
    model = digits.build_model(0)
    d = E.flat_size(model)
    assert d == 64 * 64 + 64 + 64 * 10 + 10 == 4810 == model.count_params()
    theta = E.get_flat(model)
    assert theta.dtype == np.float32 and theta.shape == (d,)
    np.testing.assert_array_equal(theta, np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))
    new = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    E.set_flat(model, new)
    np.testing.assert_array_equal(E.get_flat(model), new)
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(), new[:4096].reshape(64, 64))
    E.set_flat(model, tf.constant(theta))
    np.testing.assert_array_equal(E.get_flat(model), theta)
    E.set_flat(model, theta.astype(np.float64))
    np.testing.assert_array_equal(E.get_flat(model), theta)
    with pytest.raises(ValueError, match="4809 values, the model has 4810 parameters"):
        E.set_flat(model, theta[:-1])


def test_flat_update_applies_a_flat_gradient_with_the_optimizer(digits: E.Experiment) -> None:
    """The server's update: one traced call splits the flat gradient over the variables and steps the optimizer."""
    import keras

    model = digits.build_model(0)
    view = E.flat_view(model)
    update = view.update_fn(keras.optimizers.SGD(0.5))
    update.get_concrete_function()  # tracing applies nothing
    theta = E.get_flat(model)
    np.testing.assert_array_equal(view.get().numpy(), theta)
    g = np.random.default_rng(0).standard_normal(view.size).astype(np.float32)
    update(tf.constant(g))
    np.testing.assert_allclose(E.get_flat(model), theta - 0.5 * g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.trainable_variables[1].numpy(), theta[4096:4160] - 0.5 * g[4096:4160], rtol=1e-6)
    assert update.experimental_get_tracing_count() == 1


def test_build_model_deterministic(digits: E.Experiment) -> None:
    state = random.getstate()
    a, b, c = (E.get_flat(digits.build_model(s)) for s in (7, 7, 8))
    assert random.getstate() == state  # no global side effect
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gradient_fn_matches_tape(digits: E.Experiment) -> None:
    model = digits.build_model(1)
    x, y = next(digits.batches(np.arange(100), 32, seed=0))
    grad_fn = E.gradient_fn(model, digits.loss)
    flat, value = grad_fn(x, y)
    with tf.GradientTape() as tape:
        ref_loss = digits.loss(y, model(x, training=True))
    ref = tape.gradient(ref_loss, model.trainable_variables)
    ref_flat = np.concatenate([g.numpy().ravel() for g in ref])
    assert flat.dtype == tf.float32 and flat.shape == (E.flat_size(model),)
    np.testing.assert_allclose(flat.numpy(), ref_flat, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
    x2, y2 = next(digits.batches(np.arange(100, 300), 32, seed=1))
    grad_fn(x2, y2)
    assert grad_fn.experimental_get_tracing_count() == 1  # a new batch of the same shape: no retrace


def test_sgd_on_digits_learns(digits: E.Experiment) -> None:
    """150 plain SGD steps (batch 32, lr 0.1) on the flat vector: measured 0.91-0.93 test accuracy (seeds 0-2)."""
    model = digits.build_model(0)
    before = digits.evaluate(model)
    grad_fn = E.gradient_fn(model, digits.loss)
    theta = E.get_flat(model)
    batches = digits.batches(digits.partition(1)[0], 32, seed=0)
    for _ in range(150):
        g, _ = grad_fn(*next(batches))
        theta -= np.float32(0.1) * g.numpy()
        E.set_flat(model, theta)
    after = digits.evaluate(model)
    assert after["accuracy"] > 0.85, after
    assert after["loss"] < before["loss"]


def test_evaluate_matches_direct_computation(digits: E.Experiment) -> None:
    model = digits.build_model(2)
    x, y = digits.test_data()
    logits = model(x, training=False).numpy()
    acc = float(np.mean(np.argmax(logits, 1) == y))
    loss = float(digits.loss(y, logits))
    got = digits.evaluate(model, batch_size=100)  # uneven last batch
    assert got["accuracy"] == pytest.approx(acc)
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    part = digits.evaluate(model, max_samples=50)
    assert part["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits[:50], 1) == y[:50])))


# ---------------------------------------------------------------------- Keras data sets, offline
@pytest.mark.parametrize("name, missing", [("mnist", "mnist.npz"),
                                           ("fashion-mnist", "train-images-idx3-ubyte.gz"),
                                           ("cifar10", "cifar-10-python.tar.gz")])
def test_keras_sets_offline_error(name: str, missing: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("AGGREGATHOR_OFFLINE", "1")
    exp = E.get(name)
    t0 = time.monotonic()
    with pytest.raises(E.DatasetUnavailable) as info:
        exp.train_data()
    assert time.monotonic() - t0 < 2.0
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert missing in msg and str(tmp_path / "datasets") in msg
    assert "~/.keras/datasets/" in msg and "KERAS_HOME" in msg and "load_data()" in msg
    assert info.value.dataset == name and info.value.missing
    # cache_dir= wins over KERAS_HOME; download=False forbids downloads without the environment variable
    monkeypatch.delenv("AGGREGATHOR_OFFLINE")
    other = tmp_path / "elsewhere"
    with pytest.raises(E.DatasetUnavailable, match="download=False") as info:
        E.get(name, cache_dir=str(other), download=False).test_data()
    assert str(other / "datasets") in str(info.value)


def test_unreachable_server_fails_fast(tmp_path, monkeypatch) -> None:
    t0 = time.monotonic()
    assert not _keras_data.reachable("http://192.0.2.1:9/x", timeout=0.3)  # TEST-NET-1: never routed
    assert time.monotonic() - t0 < 1.5
    monkeypatch.delenv("AGGREGATHOR_OFFLINE", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(_keras_data, "reachable", lambda url, timeout: False)
    monkeypatch.setattr(_keras_data, "_get_file", no_download)
    with pytest.raises(E.DatasetUnavailable, match="cannot be reached"):
        E.get("mnist", cache_dir=str(tmp_path)).train_data()

    def broken(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(_keras_data, "reachable", lambda url, timeout: True)
    monkeypatch.setattr(_keras_data, "_get_file", broken)
    with pytest.raises(E.DatasetUnavailable, match=r"download failed \(connection reset\)"):
        E.get("cifar10", cache_dir=str(tmp_path)).train_data()


def test_keras_sets_load_from_cache(tmp_path) -> None:
    """Tiny fake files in Keras's cache layout are found, parsed and scaled (no network, no real data)."""
    rng = np.random.default_rng(0)
    ds = tmp_path / "datasets"
    ds.mkdir()
    xm = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    ym = rng.integers(0, 10, 20).astype(np.uint8)
    np.savez(ds / "mnist.npz", x_train=xm[:15], y_train=ym[:15], x_test=xm[15:], y_test=ym[15:])
    mnist = E.get("mnist", cache_dir=str(tmp_path), download=False)
    (xtr, ytr), (xte, _) = mnist.train_data(), mnist.test_data()
    assert xtr.shape == (15, 28, 28, 1) and xte.shape == (5, 28, 28, 1) and xtr.dtype == np.float32
    np.testing.assert_allclose(xtr[..., 0], xm[:15] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ytr, ym[:15])

    (ds / "fashion-mnist").mkdir()
    for stem, n in (("train", 12), ("t10k", 4)):
        (ds / "fashion-mnist" / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(b"\0" * 8 + rng.integers(0, 10, n, dtype=np.uint8).tobytes()))
        (ds / "fashion-mnist" / f"{stem}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(b"\0" * 16 + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()))
    fashion = E.get("fashion-mnist", cache_dir=str(tmp_path), download=False)
    assert fashion.train_data()[0].shape == (12, 28, 28, 1) and fashion.test_data()[1].shape == (4,)

    # CIFAR-10 as the original archive: extracted on first use
    with tarfile.open(ds / "cifar-10-python.tar.gz", "w:gz") as tar:
        for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                 b"labels": [1, 2, 3]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cifar = E.get("cifar10", cache_dir=str(tmp_path), download=False)
    (xc, yc), (xct, _) = cifar.train_data(), cifar.test_data()
    assert xc.shape == (15, 32, 32, 3) and xct.shape == (3, 32, 32, 3) and list(yc[:3]) == [1, 2, 3]
    assert (ds / "cifar-10-batches-py-target" / "cifar-10-batches-py" / "test_batch").is_file()


# ---------------------------------------------------------------------- model sizes
def test_model_parameter_counts() -> None:
    cifarnet = E.get("cifar10").build_model(0)
    # conv 5x5x3x64 + conv 5x5x64x64 + dense 4096x384 + 384x192 + 192x10, with biases
    assert E.flat_size(cifarnet) == 4864 + 102464 + 1573248 + 73920 + 1930 == 1_756_426
    assert cifarnet.output_shape == (None, 10)
    assert E.flat_size(E.get("cifar10", lrn=False).build_model(0)) == 1_756_426
    assert E.flat_size(E.get("mnist").build_model(0)) == 784 * 100 + 100 + 100 * 10 + 10 == 79_510
    assert E.flat_size(E.get("mnist", model="cnn").build_model(0)) == 421_642
    assert E.flat_size(E.get("digits", model="cnn").build_model(0)) == 13_706


def test_synthetic_params_sizing() -> None:
    lin = E.get("synthetic")
    assert E.flat_size(lin.build_model(0)) == 32 * 10 + 10
    x, y = lin.train_data()
    assert x.shape == (4096, 32) and set(np.unique(y)) <= set(range(10))
    for params in (1_756_426, 1_750_000, 100_003):
        exp = E.get("synthetic", params=params)
        model = exp.build_model(0)
        assert E.flat_size(model) == params == model.count_params()
    # the padding parameters get an exactly zero gradient, the others do not
    exp = E.get("synthetic", params=1000, dims=8, classes=3)
    model = exp.build_model(0)
    assert exp.hidden_units == (1000 - 3) // (8 + 1 + 3) and E.flat_size(model) == 1000
    g, _ = E.gradient_fn(model, exp.loss)(*next(exp.batches(np.arange(64), 16, seed=0)))
    pad = 1000 - 3 - exp.hidden_units * 12
    assert pad > 0 and not np.any(g.numpy()[-pad:]) and np.any(g.numpy()[:-pad])
    with pytest.raises(ValueError, match="sizes the 'mlp' model"):
        E.get("synthetic", params=10_000, model="linear")
    with pytest.raises(ValueError, match="params must be at least"):
        E.get("synthetic", params=20)


def test_resnet50_parameter_count() -> None:
    """The one ResNet-50 build of the suite (a few seconds on a CPU): parameter count and data shape only."""
    exp = E.get("resnet50", samples=8, test_samples=4)
    model = exp.build_model(0)
    assert E.flat_size(model) == 23_555_082
    assert model.count_params() == 23_608_202  # + batch normalization's moving statistics
    x, y = exp.train_data()
    assert x.shape == (8, 32, 32, 3) and y.shape == (8,)
