"""KerasExperiment: the user's own Keras model and data (arrays, dicts, tf.data), classification and regression,
partitions, deterministic builds, and evaluation against a float64 numpy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_diabetes, load_iris, load_wine

from aggregathor import experiments
from aggregathor.experiments.keras_experiment import KerasExperiment


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int = 0) -> tuple[tuple, tuple]:
    order = np.random.default_rng(seed).permutation(len(y))
    tr, te = order[n_test:], order[:n_test]
    return (x[tr], y[tr]), (x[te], y[te])


@pytest.fixture(scope="module")
def iris() -> tuple[tuple, tuple]:
    x, y = load_iris(return_X_y=True)
    return _split((x - x.mean(0)) / x.std(0), y, 30)


def linear(classes: int, dims: int) -> keras.Model:
    inputs = keras.Input((dims,))
    return keras.Model(inputs, keras.layers.Dense(classes)(inputs))


def _weights_equal(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


# ---------------------------------------------------------------------- classification
def test_functional_classification_matches_float64_reference(iris) -> None:
    train, test = iris
    exp = KerasExperiment(lambda: linear(3, 4), train, test, name="iris")
    assert exp.task == "classification" and exp.classification and exp.num_classes == 3
    assert exp.get_config() == {"name": "iris", "task": "classification", "loss": "sparse_categorical_crossentropy",
                                "metrics": []}
    model = exp.build_model(3)
    got = exp.evaluate(model, batch_size=7)  # several batches, a short last one
    w, b = (v.astype(np.float64) for v in model.get_weights())
    x, y = test[0].astype(np.float32).astype(np.float64), test[1]
    logits = x @ w + b
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert set(got) == {"loss", "accuracy"}
    np.testing.assert_allclose(got["loss"], -logp[np.arange(len(y)), y].mean(), rtol=1e-5)
    assert got["accuracy"] == np.mean(logits.argmax(1) == y)
    assert exp.evaluate(model, max_samples=10)["accuracy"] == np.mean(logits[:10].argmax(1) == y[:10])


def test_sequential_build_is_deterministic_from_the_seed(iris) -> None:
    def build() -> keras.Model:  # no Input: built on the first training sample
        return keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.2),
                                 keras.layers.Dense(3)])

    exp = KerasExperiment(build, *iris)
    a, b, c = exp.build_model(1), exp.build_model(1), exp.build_model(2)
    assert a.built and [tuple(v.shape) for v in a.trainable_variables] == [(4, 8), (8,), (8, 3), (3,)]
    assert _weights_equal(a, b) and not _weights_equal(a, c)
    # dropout draws from the seed too: the same seed gives the same training-mode output
    x = iris[0][0][:5].astype(np.float32)
    np.testing.assert_array_equal(a(x, training=True).numpy(), b(x, training=True).numpy())


def test_partitions_iid_and_dirichlet(iris) -> None:
    exp = KerasExperiment(lambda: linear(3, 4), *iris)
    n = len(iris[0][1])
    for scheme, alpha in (("iid", 0.5), ("dirichlet", 0.1)):
        shards = exp.partition(4, scheme=scheme, alpha=alpha, seed=1)
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    labels = exp.train_data()[1]
    iid = [np.bincount(labels[s], minlength=3) for s in exp.partition(4, "iid", seed=1)]
    skew = [np.bincount(labels[s], minlength=3) for s in exp.partition(4, "dirichlet", alpha=0.1, seed=1)]
    # Dirichlet(0.1) concentrates each worker on few classes; IID keeps every class everywhere
    assert max(c.max() / c.sum() for c in skew) > max(c.max() / c.sum() for c in iid)
    assert all((c > 0).all() for c in iid)


def test_one_hot_labels_with_categorical_crossentropy(iris) -> None:
    (xtr, ytr), (xte, yte) = iris
    exp = KerasExperiment(lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]),
                          (xtr, np.eye(3)[ytr]), (xte, np.eye(3)[yte]), loss="categorical_crossentropy")
    assert exp.classification and exp.num_classes == 3
    model = exp.build_model(0)
    acc = np.mean(model(xte.astype(np.float32)).numpy().argmax(1) == yte)
    assert exp.evaluate(model)["accuracy"] == acc
    assert len(exp.partition(3, "dirichlet")) == 3


class Scale(keras.layers.Layer):
    """A custom layer: a learned per-feature scale."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x * self.scale


class TwoInputs(keras.Model):
    """A subclassed model over a dict of two inputs, with a custom layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.out(self.hidden(tf.concat([self.scale(x["chem"]), x["colour"]], axis=-1)))


@pytest.fixture(scope="module")
def wine_dicts() -> tuple[tuple, tuple]:
    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    (xtr, ytr), (xte, yte) = _split(x, y, 40)
    return ({"chem": xtr[:, :10], "colour": xtr[:, 10:]}, ytr), ({"chem": xte[:, :10], "colour": xte[:, 10:]}, yte)


def test_subclassed_model_with_dict_inputs_trains(wine_dicts) -> None:
    exp = KerasExperiment(TwoInputs, *wine_dicts)
    model = exp.build_model(0)
    assert _weights_equal(model, exp.build_model(0)) and exp.input_shape == ()
    assert [tuple(v.shape) for v in model.trainable_variables][0] == (10,)  # the custom layer's weight
    shards = exp.partition(2, seed=0)
    x, y = next(exp.batches(shards[0], 8, seed=0))
    assert set(x) == {"chem", "colour"} and x["chem"].shape == (8, 10) and x["colour"].shape == (8, 3)
    take = next(exp.batch_indices(shards[0], 8, seed=0))
    assert set(take) <= set(shards[0])
    np.testing.assert_array_equal(x["colour"], exp.train_data()[0]["colour"][take])
    np.testing.assert_array_equal(y, exp.train_data()[1][take])
    # it plugs into the parameter server's flat-gradient path
    grad_fn = experiments.gradient_fn(model, exp.loss)
    before = exp.evaluate(model)
    theta = experiments.get_flat(model)
    for x, y in exp.batches(np.concatenate(shards), 16, seed=1, epochs=15):
        g, _ = grad_fn(x, y)
        theta = theta - 0.1 * g.numpy()
        experiments.set_flat(model, theta)
    after = exp.evaluate(model)
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.9


# ---------------------------------------------------------------------- tf.data
def test_tf_data_callables_match_arrays(iris) -> None:
    (xtr, ytr), (xte, yte) = iris
    calls = []

    def train() -> tf.data.Dataset:
        calls.append(1)
        return tf.data.Dataset.from_tensor_slices((xtr, ytr)).batch(16)  # batched, as Keras fit takes

    def test() -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((xte, yte))  # unbatched (scalar labels): batched here

    exp = KerasExperiment(lambda: linear(3, 4), train, test)
    ref = KerasExperiment(lambda: linear(3, 4), (xtr, ytr), (xte, yte))
    for a, b in ((exp.train_data(), ref.train_data()), (exp.test_data(), ref.test_data())):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[0].dtype == np.float32 and a[1].dtype == np.int32 and not a[0].flags.writeable
    exp.train_data(), exp.partition(3)
    assert calls == [1]  # read once
    assert exp.evaluate(exp.build_model(0)) == ref.evaluate(ref.build_model(0))

    dict_ds = KerasExperiment(TwoInputs, lambda: tf.data.Dataset.from_tensor_slices(
        ({"chem": xtr[:, :3], "colour": xtr[:, 3:]}, ytr)).batch(10), (xte, yte))
    x, _ = dict_ds.train_data()
    np.testing.assert_array_equal(x["colour"], xtr[:, 3:].astype(np.float32))


# ---------------------------------------------------------------------- regression
@pytest.fixture(scope="module")
def diabetes() -> tuple[tuple, tuple]:
    x, y = load_diabetes(return_X_y=True)
    return _split(x, y, 42)


def test_regression_reports_loss_and_metrics(diabetes) -> None:
    exp = KerasExperiment(lambda: linear(1, 10), *diabetes, loss="mse",
                          metrics=["mae", keras.metrics.RootMeanSquaredError()], name="diabetes")
    assert exp.task == "regression" and not exp.classification and exp.num_classes == 0
    assert exp.get_config() == {"name": "diabetes", "task": "regression", "loss": "mean_squared_error",
                                "metrics": ["mae", "root_mean_squared_error"]}
    assert exp.train_data()[1].dtype == np.float32
    model = exp.build_model(0)
    got = exp.evaluate(model, batch_size=10)
    assert list(got) == ["loss", "mae", "root_mean_squared_error"]
    w, b = (v.astype(np.float64) for v in model.get_weights())
    x, y = diabetes[1][0].astype(np.float32).astype(np.float64), diabetes[1][1].astype(np.float32)
    err = (x @ w + b)[:, 0] - y
    np.testing.assert_allclose(got["loss"], np.mean(err ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(err)), rtol=1e-5)
    np.testing.assert_allclose(got["root_mean_squared_error"], np.sqrt(np.mean(err ** 2)), rtol=1e-5)
    assert exp.evaluate(model, batch_size=10) == got  # fresh metric state every evaluation
    assert len(exp.partition(3, "iid")) == 3
    with pytest.raises(ValueError) as err_info:
        exp.partition(3, "dirichlet")
    assert str(err_info.value) == ("the Dirichlet partition splits class labels, and 'diabetes' is a regression "
                                   "task: use --partition iid")
    # the training loss is the batch mean, like Keras's
    yb, pb = tf.constant([1.0, 3.0]), tf.constant([[0.0], [0.0]])
    np.testing.assert_allclose(float(exp.loss(yb, pb)), 5.0)
    assert [m.name for m in exp.metrics()] == ["mean_absolute_error", "root_mean_squared_error"]


def test_task_override_and_function_loss(iris, diabetes) -> None:
    def sq(y_true, y_pred):
        return tf.reduce_mean(tf.square(tf.cast(y_true, y_pred.dtype)[:, None] - y_pred), axis=-1)

    exp = KerasExperiment(lambda: linear(1, 10), *diabetes, loss=sq)
    assert exp.task == "regression" and exp.get_config()["loss"] == "sq"
    keras_mse = KerasExperiment(lambda: linear(1, 10), *diabetes, loss="mse")
    np.testing.assert_allclose(exp.evaluate(exp.build_model(0))["loss"],
                               keras_mse.evaluate(keras_mse.build_model(0))["loss"], rtol=1e-6)
    focal = KerasExperiment(lambda: linear(3, 4), *iris, task="classification",
                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, name="xent"))
    assert focal.classification and "accuracy" in focal.evaluate(focal.build_model(0))


# ---------------------------------------------------------------------- bad input: one line, names the fix
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "nope"}, "KerasExperiment: unknown loss 'nope' (keras.losses.get: "),
    ({"loss": 3}, "KerasExperiment: loss must be a Keras loss name, a keras.losses.Loss or a function"),
    ({"metrics": ["nope"]}, "KerasExperiment: unknown metric 'nope'; use a keras.metrics name"),
    ({"task": "ranking"}, "KerasExperiment: task must be 'classification' or 'regression', got 'ranking'"),
    ({"name": "a b"}, "KerasExperiment: name must be 1-64 letters, digits, '.', '_' or '-', got 'a b'"),
    ({"train": (np.zeros((3, 2)), np.zeros(4))}, "KerasExperiment: train x and y have different numbers of "
                                                 "samples ([3, 4]); give one row per sample in every array"),
    ({"test": [np.zeros((3, 2))]}, "KerasExperiment: test must be an (x, y) pair of arrays or a function"),
    ({"build_model": 3}, "KerasExperiment: build_model must be a zero-argument function"),
])
def test_bad_arguments(iris, kwargs: dict, message: str) -> None:
    args = {"build_model": lambda: linear(3, 4), "train": iris[0], "test": iris[1], **kwargs}
    with pytest.raises(ValueError) as err:
        KerasExperiment(**args)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_data_and_models_found_on_use(iris) -> None:
    (xtr, ytr), test = iris
    cases = [
        (KerasExperiment(lambda: linear(3, 4), (xtr, ytr - 1.5), test).train_data,
         "KerasExperiment: train labels must be class indices 0, 1, ... for a classification task; pass "
         "task='regression' for real-valued targets"),
        (KerasExperiment(lambda: linear(3, 4), lambda: [1, 2], test).train_data,
         "KerasExperiment: train() must return a tf.data.Dataset of (x, y), got list"),
        (KerasExperiment(lambda: linear(3, 4), lambda: tf.data.Dataset.range(3), test).train_data,
         "KerasExperiment: train() must yield (x, y) pairs, its elements are "),
        (KerasExperiment(lambda: "model", (xtr, ytr), test).build_model,
         "KerasExperiment 'keras': build_model() must return a keras.Model, got str"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError) as err:
            fn()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    one = KerasExperiment(lambda: linear(1, 4), (xtr, ytr), test, task="classification")
    with pytest.raises(ValueError) as err:
        one.build_model(0)
    assert str(err.value) == ("KerasExperiment 'keras': a classification model outputs one value per class (two "
                              "for a binary task), this one outputs shape (1,); or pass task='regression' with "
                              "metrics=['binary_accuracy']")
