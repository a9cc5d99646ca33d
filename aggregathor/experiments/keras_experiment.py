"""KerasExperiment: your own Keras model and data set, trained like a built-in experiment.

``KerasExperiment(build_model, train, test, loss=..., metrics=...)`` wraps a zero-argument model builder and
two data sets into an :class:`~aggregathor.experiments.base.Experiment`, so it gets IID and Dirichlet shards,
per-worker batches, evaluation and every launcher. A multi-process run cannot ship the Python callables to
its ranks: each rank rebuilds the experiment from its ``path/to/file.py:attr`` (or ``package.module:attr``)
reference instead (see :func:`aggregathor.experiments.get`).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from aggregathor.experiments.base import Experiment, Seed, partition_labels, seeded
from aggregathor.tracing import per_object_function

__all__ = ["KerasExperiment"]

Inputs = np.ndarray | dict[str, np.ndarray]
Data = tuple[Any, Any] | Callable[[], tf.data.Dataset]

TASKS = ("classification", "regression")
_CLASSIFICATION_LOSSES = frozenset({"sparse_categorical_crossentropy", "categorical_crossentropy"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class FunctionLoss(keras.losses.Loss):
    """A per-sample loss function ``fn(y_true, y_pred)`` as a Keras loss, averaged over the batch."""

    def __init__(self, fn: Callable[[Any, Any], Any], name: str | None = None) -> None:
        super().__init__(name=name or getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(y_true, y_pred)


def as_loss(spec: Any) -> keras.losses.Loss:
    """``spec`` (None, a Keras loss name, a Loss or a ``fn(y_true, y_pred)``) as a batch-mean Keras Loss."""
    if spec is None:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if isinstance(spec, keras.losses.Loss):
        return spec
    if isinstance(spec, str | dict):
        try:
            spec = keras.losses.get(spec)
        except ValueError as exc:
            raise ValueError(f"KerasExperiment: unknown loss {spec!r} (keras.losses.get: "
                             f"{str(exc).splitlines()[0]})") from None
        if isinstance(spec, keras.losses.Loss):
            return spec
    if not callable(spec):
        raise ValueError(f"KerasExperiment: loss must be a Keras loss name, a keras.losses.Loss or a function "
                         f"fn(y_true, y_pred), got {type(spec).__name__}")
    return FunctionLoss(spec)


def _metric_factory(spec: Any) -> Callable[[], keras.metrics.Metric]:
    """A function returning a fresh metric object for ``spec`` (a name, a Metric or a function)."""
    if isinstance(spec, keras.metrics.Metric):
        config = spec.get_config()
        return lambda: type(spec).from_config(config)
    if isinstance(spec, str):
        try:
            keras.metrics.get(spec)
        except ValueError:
            raise ValueError(f"KerasExperiment: unknown metric {spec!r}; use a keras.metrics name "
                             "(e.g. 'mae') or a keras.metrics.Metric") from None

        def fresh() -> keras.metrics.Metric:
            m = keras.metrics.get(spec)
            return m if isinstance(m, keras.metrics.Metric) else keras.metrics.MeanMetricWrapper(m, name=spec)

        return fresh
    if callable(spec):
        return lambda: keras.metrics.MeanMetricWrapper(spec, name=getattr(spec, "__name__", "metric"))
    raise ValueError(f"KerasExperiment: a metric must be a name, a keras.metrics.Metric or a function, "
                     f"got {type(spec).__name__}")


def _count(x: Inputs, y: np.ndarray, what: str) -> int:
    """The number of samples, checking that every array of ``x`` and ``y`` agrees on it."""
    arrays = list(x.values()) if isinstance(x, dict) else [x]
    if not arrays:
        raise ValueError(f"KerasExperiment: {what} x is an empty dict; give at least one input array")
    sizes = {np.shape(a)[0] if np.ndim(a) else 0 for a in [*arrays, y]}
    if len(sizes) != 1:
        raise ValueError(f"KerasExperiment: {what} x and y have different numbers of samples ({sorted(sizes)}); "
                         "give one row per sample in every array")
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"KerasExperiment: {what} set is empty")
    return int(n)


def _input_array(a: Any) -> np.ndarray:
    """A read-only C-contiguous copy; float64 becomes float32 (Keras's default float), other dtypes stay."""
    a = np.asarray(a)
    a = np.array(a, dtype=np.float32 if a.dtype == np.float64 else a.dtype, order="C", copy=True)
    a.setflags(write=False)
    return a


def _materialize(make: Callable[[], Any], what: str) -> tuple[Inputs, np.ndarray]:
    """``make()``'s ``tf.data.Dataset`` of ``(x, y)`` read once into numpy arrays.

    The dataset yields batches, as Keras's ``fit`` takes; one whose labels are scalars is taken as
    unbatched and batched here.
    """
    ds = make()
    if not isinstance(ds, tf.data.Dataset):
        raise ValueError(f"KerasExperiment: {what}() must return a tf.data.Dataset of (x, y), "
                         f"got {type(ds).__name__}")
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"KerasExperiment: {what}() must yield (x, y) pairs, its elements are {spec}")
    if spec[1].shape.rank == 0:
        ds = ds.batch(1024)
    xs: list[Any] = []
    ys: list[np.ndarray] = []
    for x, y in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not ys:
        raise ValueError(f"KerasExperiment: {what}() returned an empty dataset")
    if isinstance(xs[0], dict):
        return {k: np.concatenate([x[k] for x in xs]) for k in xs[0]}, np.concatenate(ys)
    return np.concatenate(xs), np.concatenate(ys)


class KerasExperiment(Experiment):
    """Your own uncompiled Keras 3 model and data set, as an experiment.

    Parameters
    ----------
    build_model : callable
        ``build_model()`` returns a fresh, uncompiled Keras model (functional, Sequential or subclassed;
        custom layers allowed). It is called under a seeded random state, so the initial weights are a
        function of the run's seed only; a model without a known input shape is built by calling it on the
        first training sample.
    train, test : tuple or callable
        ``(x, y)`` numpy arrays, one row per sample (``x`` may be a dict of arrays, for a model with named
        inputs), or a zero-argument function returning a ``tf.data.Dataset`` of ``(x, y)`` batches (as
        Keras's ``fit`` takes). A dataset is read once per process, on first use, and kept in memory as
        numpy arrays: it must be finite and fit in memory.
    loss : str, keras.losses.Loss or callable, optional
        Any Keras loss (resolved by ``keras.losses.get``) or a function ``fn(y_true, y_pred)`` of per-sample
        values; averaged over the batch. Default: ``SparseCategoricalCrossentropy(from_logits=True)``.
    name : str, optional
        Shown in logs and run directories (letters, digits, ``.``, ``_``, ``-``). Default ``"keras"``.
    metrics : sequence, optional
        Extra Keras metrics reported by :meth:`evaluate`: names (``"mae"``), ``keras.metrics.Metric`` objects
        or functions ``fn(y_true, y_pred)``.
    task : {"classification", "regression"}, optional
        Default: classification when the loss is a (sparse) categorical cross-entropy, regression otherwise.
        Classification labels are class indices (or one-hot rows for a categorical cross-entropy), the model
        outputs one value per class, :meth:`evaluate` adds ``"accuracy"`` and Dirichlet shards are
        available. Regression targets are float32, kept in their shape; shards are IID only.

    Notes
    -----
    ``get_config()`` describes the experiment (name, task, loss and metric names) but cannot carry the
    callables: runs with several processes rebuild it on every rank from its ``module:attr`` reference.
    """

    name = "keras"

    def __init__(self, build_model: Callable[[], keras.Model], train: Data, test: Data, *, loss: Any = None,
                 name: str | None = None, metrics: Sequence[Any] | None = None, task: str | None = None) -> None:
        super().__init__()
        if not callable(build_model):
            raise ValueError(f"KerasExperiment: build_model must be a zero-argument function returning a Keras "
                             f"model, got {type(build_model).__name__}")
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(f"KerasExperiment: name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        self.name = name or type(self).name
        self._build = build_model
        self._loss = as_loss(loss)
        self.task = self._task(task)
        metrics = list(metrics or ())
        self._metric_factories = [_metric_factory(m) for m in metrics]
        self._metric_names = [m if isinstance(m, str) else f().name
                              for m, f in zip(metrics, self._metric_factories, strict=True)]
        self._sources = {"train": self._source(train, "train"), "test": self._source(test, "test")}
        self._arrays: dict[str, tuple[Inputs, np.ndarray]] = {}
        self._lock = threading.Lock()
        #: The ``module:attr`` reference this experiment was resolved from, if any (set by ``experiments.get``).
        self.reference: str | None = None
        self.options = {"task": self.task, "loss": self._loss.name, "metrics": list(self._metric_names)}

    def _task(self, task: str | None) -> str:
        if task is None:
            fn = getattr(self._loss, "fn", None)
            loss_names = {self._loss.name, getattr(fn, "__name__", "")}
            return "classification" if loss_names & _CLASSIFICATION_LOSSES else "regression"
        if task not in TASKS:
            raise ValueError(f"KerasExperiment: task must be 'classification' or 'regression', got {task!r}")
        return task

    def _source(self, data: Data, what: str) -> Data:
        if callable(data):
            return data
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise ValueError(f"KerasExperiment: {what} must be an (x, y) pair of arrays or a function returning a "
                             f"tf.data.Dataset, got {type(data).__name__}")
        x, y = data
        x = {str(k): np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
        _count(x, np.asarray(y), what)
        return x, np.asarray(y)

    def __repr__(self) -> str:
        return f"KerasExperiment(name={self.name!r}, task={self.task!r}, loss={self._loss.name!r})"

    @property
    def loss(self) -> keras.losses.Loss:
        """The training loss, mean over the batch."""
        return self._loss

    @property
    def classification(self) -> bool:
        """Whether the task is classification (labels, accuracy, Dirichlet shards)."""
        return self.task == "classification"

    # ------------------------------------------------------------------ data
    def _data(self) -> tuple[tuple[Inputs, np.ndarray], tuple[Inputs, np.ndarray]]:
        return self._split("train"), self._split("test")

    def _split(self, what: str) -> tuple[Inputs, np.ndarray]:
        with self._lock:
            arrays = self._arrays.get(what)
            if arrays is None:
                source = self._sources[what]
                x, y = _materialize(source, what) if callable(source) else source
                _count(x, y, what)
                x = {k: _input_array(v) for k, v in x.items()} if isinstance(x, dict) else _input_array(x)
                arrays = self._arrays[what] = (x, self._targets(np.asarray(y), what))
        return arrays

    def _targets(self, y: np.ndarray, what: str) -> np.ndarray:
        """Class indices (int32, ``(n,)``) or one-hot rows for classification; float32 targets otherwise."""
        if not self.classification:
            out = np.array(y, dtype=np.float32, order="C", copy=True)
        elif y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
            flat = y.reshape(-1)
            if not (np.issubdtype(flat.dtype, np.integer) or np.all(np.mod(flat, 1) == 0)) or flat.min() < 0:
                raise ValueError(f"KerasExperiment: {what} labels must be class indices 0, 1, ... for a "
                                 "classification task; pass task='regression' for real-valued targets")
            out = flat.astype(np.int32)
        else:
            out = np.array(y, dtype=np.float32, order="C", copy=True)
        out.setflags(write=False)
        return out

    @staticmethod
    def _labels(y: np.ndarray) -> np.ndarray:
        """Class indices of classification targets (the argmax of one-hot rows)."""
        return y if y.ndim == 1 else np.argmax(y, axis=-1).astype(np.int32)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Classes seen in the training and test labels (classification); 0 for regression."""
        if not self.classification:
            return 0
        return int(max(self._labels(self.train_data()[1]).max(), self._labels(self.test_data()[1]).max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """The shape of one training sample (``()`` for dict inputs)."""
        x = self.train_data()[0]
        return () if isinstance(x, dict) else tuple(x.shape[1:])

    def partition(self, num_workers: int, scheme: str = "iid", alpha: float = 0.5,
                  seed: Seed = 0) -> list[np.ndarray]:
        """Disjoint shards of the training set (see :func:`partition_labels`); Dirichlet needs class labels."""
        y = self.train_data()[1]
        if not self.classification:
            if scheme == "dirichlet":
                raise ValueError(f"the Dirichlet partition splits class labels, and {self.name!r} is a regression "
                                 "task: use --partition iid")
            y = np.zeros(y.shape[0], np.int32)
        return partition_labels(self._labels(y), num_workers, scheme=scheme, alpha=alpha, seed=seed)

    def batches(self, shard_indices: np.ndarray, batch_size: int, seed: Seed = 0, *,
                epochs: int | None = None) -> Iterator[tuple[Inputs, np.ndarray]]:
        """``(x, y)`` batches from one shard (``x`` a dict of arrays when the inputs are a dict)."""
        x, y = self.train_data()
        for take in self.batch_indices(shard_indices, batch_size, seed, epochs=epochs):
            yield _take(x, take), y[take]

    # ------------------------------------------------------------------ model
    def build_model(self, seed: int = 0) -> keras.Model:
        """A fresh model from ``build_model()``, its variables created and initialized from ``seed`` only."""
        with seeded(seed):
            model = self._build()
            if not isinstance(model, keras.Model):
                raise ValueError(f"KerasExperiment {self.name!r}: build_model() must return a keras.Model, "
                                 f"got {type(model).__name__}")
            out = model(_take(self.train_data()[0], slice(0, 1)), training=False)  # builds a subclassed model
        if not model.trainable_variables:
            raise ValueError(f"KerasExperiment {self.name!r}: the model has no trainable variables")
        shape = tuple(getattr(out, "shape", ()))
        if self.classification and (len(shape) != 2 or shape[-1] < 2):
            raise ValueError(f"KerasExperiment {self.name!r}: a classification model outputs one value per class "
                             f"(two for a binary task), this one outputs shape {shape[1:]}; or pass "
                             "task='regression' with metrics=['binary_accuracy']")
        return model

    def metrics(self) -> list[keras.metrics.Metric]:
        """Fresh metric objects for ``model.compile``: accuracy (classification) then the user's metrics."""
        out: list[keras.metrics.Metric] = [f() for f in self._metric_factories]
        if self.classification:
            y = self.train_data()[1]
            acc = keras.metrics.SparseCategoricalAccuracy if y.ndim == 1 else keras.metrics.CategoricalAccuracy
            out.insert(0, acc(name="accuracy"))
        return out

    # ------------------------------------------------------------------ evaluation
    def _eval_fn(self, model: keras.Model) -> Callable[..., Any]:
        fn = self._eval_fns.get(model)
        if fn is None:
            loss = self._loss
            ref = weakref.ref(model)  # a strong reference would keep the model (the cache's key) alive

            def fn(x: Any, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                out = ref()(x, training=False)
                values = tf.cast(loss.call(y, out), tf.float64)
                return tf.reduce_mean(values) * tf.cast(tf.shape(y)[0], tf.float64), out

            fn = self._eval_fns[model] = per_object_function(fn, reduce_retracing=True)
        return fn

    def evaluate(self, model: keras.Model, max_samples: int | None = None,
                 batch_size: int | None = None) -> dict[str, float]:
        """Mean loss on the test set (its first ``max_samples`` samples if given), then the metrics.

        Returns ``{"loss": ..., "accuracy": ...}`` (accuracy for classification only: the argmax of the
        outputs against the labels) followed by each metric passed as ``metrics=``, under its name.
        """
        batch_size = int(batch_size or self.eval_batch_size)
        x, y = self.test_data()
        n = y.shape[0] if max_samples is None else min(int(max_samples), y.shape[0])
        if n <= 0:
            raise ValueError("no test samples to evaluate on")
        fn = self._eval_fn(model)
        metrics = [f() for f in self._metric_factories]
        loss, correct = 0.0, 0
        for lo in range(0, n, batch_size):
            rows = slice(lo, min(lo + batch_size, n))
            yb = y[rows]
            l_sum, out = fn(_take(x, rows), yb)
            loss += float(l_sum)
            if self.classification:
                correct += _correct(out.numpy(), self._labels(yb))
            for m in metrics:
                m.update_state(yb, out)
        result = {"loss": loss / n}
        if self.classification:
            result["accuracy"] = correct / n
        result.update({name: float(m.result()) for name, m in zip(self._metric_names, metrics, strict=True)})
        return result


def _take(x: Inputs, take: np.ndarray | slice) -> Inputs:
    """Rows ``take`` of an array, or of every array of a dict."""
    return {k: v[take] for k, v in x.items()} if isinstance(x, dict) else x[take]


def _correct(out: np.ndarray, labels: np.ndarray) -> int:
    """How many rows of ``out`` (one value per class) have their largest value at the label."""
    return int(np.sum(np.argmax(out, axis=-1) == labels))
