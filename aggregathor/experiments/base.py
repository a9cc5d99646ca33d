"""The experiment interface (a model plus a data set) and its registry.

An :class:`Experiment` builds a deterministic Keras model from a seed, loads its data set once per process
(cached in memory, shared by every instance of the same experiment), splits the training set into disjoint
per-worker shards (:meth:`~Experiment.partition`) and streams shuffled mini-batches from a shard
(:meth:`~Experiment.batches`). Every model outputs logits; the loss is
``SparseCategoricalCrossentropy(from_logits=True)`` and the labels are ``int32`` class indices.

Each experiment lives in its own module of this package, registers itself with :func:`register`, and is
built by name with :func:`aggregathor.experiments.get`.
"""

from __future__ import annotations

import contextlib
import random
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from aggregathor._registry import Registry
from aggregathor.tracing import per_object_function

__all__ = [
    "DatasetUnavailable",
    "Experiment",
    "batch_indices",
    "partition_labels",
    "register",
    "registry",
    "seeded",
]

Arrays = tuple[np.ndarray, np.ndarray]
Seed = int | Sequence[int] | None

#: The registered classes by name; the public modules of ``aggregathor.experiments`` register theirs.
REGISTRY: Registry[type[Experiment]] = Registry("experiment", "aggregathor.experiments", ("base", "flat", "models"))
_DATA: dict[tuple[Any, ...], tuple[Arrays, Arrays]] = {}
_DATA_LOCK = threading.Lock()


class DatasetUnavailable(RuntimeError):
    """A data set is neither in the local cache nor downloadable; the message says which file to put where.

    Attributes: ``dataset`` (the experiment's name), ``missing`` (the paths looked for), ``url`` (where the
    file is downloaded from).
    """

    def __init__(self, message: str, *, dataset: str, missing: Sequence[str] = (), url: str = "") -> None:
        super().__init__(message)
        self.dataset = dataset
        self.missing = list(missing)
        self.url = url


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make ``cls`` available as ``aggregathor.experiments.get(cls.name, ...)``."""
    return REGISTRY.register(cls)


def registry() -> dict[str, type[Experiment]]:
    """A copy of the name -> class registry (what is imported so far)."""
    return REGISTRY.table()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build Keras layers deterministically: the initializers' seeds come from Python's ``random``.

    Keras 3 draws the seed of every unseeded initializer (and dropout layer) from Python's global
    ``random`` module when the layer is built, so seeding it makes the whole model a function of ``seed``.
    The previous state of ``random`` is restored on exit: nothing global changes.
    """
    state = random.getstate()
    random.seed(int(seed))
    try:
        yield
    finally:
        random.setstate(state)


# ---------------------------------------------------------------------- partitions and batches
def partition_labels(labels: np.ndarray, num_workers: int, scheme: str = "iid", alpha: float = 0.5,
                     seed: Seed = 0) -> list[np.ndarray]:
    """Split the sample indices ``0..len(labels)-1`` into ``num_workers`` disjoint, non-empty shards.

    ``"iid"``: a random permutation cut into near-equal parts (sizes differ by at most one); every
    sample lands in exactly one shard.

    ``"dirichlet"``: the label-skewed non-IID split of Hsu et al. (2019, "Measuring the effects of
    non-identical data distribution for federated visual classification"), in its per-class form: for each
    class, the class's samples are shuffled and divided among the workers in proportions drawn from
    ``Dirichlet(alpha, ..., alpha)``. Small ``alpha`` (0.1) gives each worker a few dominant classes, large
    ``alpha`` (100) approaches IID. Every sample still lands in exactly one shard. *Fix-up*: a worker may
    draw no sample at all (likely for small ``alpha`` or many workers); while some shard is empty, one
    random sample of the currently largest shard is moved into it. That keeps the shards disjoint and
    complete, changes at most ``num_workers - 1`` samples, and is deterministic given ``seed``.

    Each shard is returned sorted, as an ``int64`` array.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    k = int(num_workers)
    if k > n:
        raise ValueError(f"cannot split {n} samples into {k} non-empty shards")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = np.array_split(rng.permutation(n), k)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha!r}")
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            cuts = np.round(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for w, piece in enumerate(np.split(idx, cuts)):
                parts[w].append(piece)
        shards = [np.concatenate(p) for p in parts]
        sizes = np.array([s.size for s in shards])
        while (sizes == 0).any():  # the fix-up: see the docstring
            empty = int(np.flatnonzero(sizes == 0)[0])
            donor = int(np.argmax(sizes))
            pos = int(rng.integers(sizes[donor]))
            shards[empty] = shards[donor][pos:pos + 1].copy()
            shards[donor] = np.delete(shards[donor], pos)
            sizes[empty], sizes[donor] = 1, sizes[donor] - 1
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: dirichlet, iid")
    return [np.sort(s).astype(np.int64) for s in shards]


def batch_indices(shard: np.ndarray, batch_size: int, seed: Seed = 0, *,
                  epochs: int | None = None) -> Iterator[np.ndarray]:
    """Index batches from ``shard``: a fresh random order each epoch, consecutive ``batch_size`` chunks.

    The epochs form one stream, so every batch has exactly ``batch_size`` indices (static shapes: one trace
    of the gradient function) and no sample is dropped: a batch may straddle two epochs, and when the shard
    is smaller than ``batch_size`` a batch holds some samples twice. ``epochs=None`` streams for ever;
    otherwise the stream stops after ``epochs`` passes, the last batch possibly shorter. Deterministic given
    ``seed`` (an int or a sequence of ints such as ``(run_seed, rank)``).
    """
    idx = np.asarray(shard, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("cannot draw batches from an empty shard")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be None or >= 1, got {epochs!r}")
    rng = np.random.default_rng(seed)
    buf = np.empty(0, np.int64)
    done = 0
    while True:
        while buf.size < batch_size and (epochs is None or done < epochs):
            buf = np.concatenate([buf, rng.permutation(idx)])
            done += 1
        if buf.size == 0:
            return
        take, buf = buf[:batch_size], buf[batch_size:]
        yield take


# ---------------------------------------------------------------------- the experiment
class Experiment:
    """A model plus a data set, chosen by name. Subclasses set the class attributes and implement
    :meth:`_load` and :meth:`_make_model`; ``defaults`` lists every option with its default value.

    Options are keyword arguments; ``get_config()`` returns them with the name, and
    ``aggregathor.experiments.get(**exp.get_config())`` rebuilds an equal experiment.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: Options that change the data (part of the in-memory cache key); the rest only change the model.
    data_options: ClassVar[tuple[str, ...]] = ()
    num_classes: int = 10
    input_shape: tuple[int, ...] = ()
    #: Test samples per forward pass in :meth:`evaluate`.
    eval_batch_size: ClassVar[int] = 1000

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"experiment {self.name!r}: unknown option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(self.defaults)) or '(none)'}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self._loss: keras.losses.Loss | None = None
        self._eval_fns: weakref.WeakKeyDictionary[Any, Callable[..., Any]] = weakref.WeakKeyDictionary()
        self._validate()

    def _validate(self) -> None:
        """Check ``self.options``; raise ValueError naming the bad one."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def get_config(self) -> dict[str, Any]:
        """The name and every option: ``aggregathor.experiments.get(**cfg)`` rebuilds the experiment."""
        return {"name": self.name, **self.options}

    # ------------------------------------------------------------------ model
    def _make_model(self) -> keras.Model:
        raise NotImplementedError

    def build_model(self, seed: int = 0) -> keras.Model:
        """A fresh model with its variables created, initialized as a function of ``seed`` only."""
        with seeded(seed):
            model = self._make_model()
        if not model.built:
            model.build((None, *self.input_shape))
        return model

    @property
    def loss(self) -> keras.losses.Loss:
        """The training loss, mean over the batch: sparse categorical cross-entropy on logits."""
        if self._loss is None:
            self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return self._loss

    def metrics(self) -> list[keras.metrics.Metric]:
        """Fresh metric objects for ``model.compile``: ``[SparseCategoricalAccuracy(name="accuracy")]``."""
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def compile(self, model: keras.Model, optimizer: Any = "sgd") -> keras.Model:
        """``model.compile`` with this experiment's loss and metrics (for ``fit``/``evaluate`` baselines)."""
        model.compile(optimizer=optimizer, loss=self.loss, metrics=self.metrics())
        return model

    # ------------------------------------------------------------------ data
    def _load(self) -> tuple[Arrays, Arrays]:
        """``((x_train, y_train), (x_test, y_test))``: float32 inputs, int32 labels."""
        raise NotImplementedError

    def _data_key(self) -> tuple[Any, ...]:
        """What identifies the data in the in-memory cache: the name and the ``data_options`` values."""
        return (self.name, *(repr(self.options[k]) for k in self.data_options))

    def _data(self) -> tuple[Arrays, Arrays]:
        key = self._data_key()
        with _DATA_LOCK:
            data = _DATA.get(key)
            if data is None:
                (xtr, ytr), (xte, yte) = self._load()
                arrays = []
                for a, dtype in ((xtr, np.float32), (ytr, np.int32), (xte, np.float32), (yte, np.int32)):
                    a = np.ascontiguousarray(a, dtype=dtype)
                    a.setflags(write=False)  # shared by every instance: read-only
                    arrays.append(a)
                data = _DATA[key] = ((arrays[0], arrays[1].reshape(-1)), (arrays[2], arrays[3].reshape(-1)))
        return data

    def train_data(self) -> Arrays:
        """``(x, y)`` of the training set (read-only numpy arrays, loaded once per process)."""
        return self._data()[0]

    def test_data(self) -> Arrays:
        """``(x, y)`` of the test set (read-only numpy arrays, loaded once per process)."""
        return self._data()[1]

    def partition(self, num_workers: int, scheme: str = "iid", alpha: float = 0.5,
                  seed: Seed = 0) -> list[np.ndarray]:
        """Disjoint shards of the training set's indices, one per worker (see :func:`partition_labels`)."""
        return partition_labels(self.train_data()[1], num_workers, scheme=scheme, alpha=alpha, seed=seed)

    def batch_indices(self, shard_indices: np.ndarray, batch_size: int, seed: Seed = 0, *,
                      epochs: int | None = None) -> Iterator[np.ndarray]:
        """The index batches :meth:`batches` gathers (see :func:`batch_indices`)."""
        n = self.train_data()[1].shape[0]
        idx = np.asarray(shard_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"shard indices must lie in [0, {n}) for {self.name!r}")
        return batch_indices(idx, batch_size, seed, epochs=epochs)

    def batches(self, shard_indices: np.ndarray, batch_size: int, seed: Seed = 0, *,
                epochs: int | None = None) -> Iterator[Arrays]:
        """``(x, y)`` numpy batches drawn from this worker's shard only, reshuffled each epoch.

        Deterministic given ``seed`` (give each worker its own, e.g. ``(run_seed, rank)``); workers with
        disjoint shards never share a sample. Endless unless ``epochs`` is given (see :func:`batch_indices`).
        """
        x, y = self.train_data()
        for take in self.batch_indices(shard_indices, batch_size, seed, epochs=epochs):
            yield x[take], y[take]

    # ------------------------------------------------------------------ evaluation
    def _eval_fn(self, model: keras.Model) -> Callable[..., Any]:
        fn = self._eval_fns.get(model)
        if fn is None:
            per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
            ref = weakref.ref(model)  # a strong reference here would keep the model (the cache's key) alive

            def fn(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                logits = ref()(x, training=False)
                loss = tf.reduce_sum(tf.cast(per_sample(y, logits), tf.float64))
                pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
                return loss, tf.reduce_sum(tf.cast(tf.equal(pred, tf.cast(y, tf.int32)), tf.int64))

            fn = self._eval_fns[model] = per_object_function(fn, reduce_retracing=True)
        return fn

    def evaluate(self, model: keras.Model, max_samples: int | None = None,
                 batch_size: int | None = None) -> dict[str, float]:
        """Mean loss and accuracy of ``model`` on the test set (its first ``max_samples`` samples if given).

        Returns ``{"loss": mean cross-entropy, "accuracy": fraction correct}`` as Python floats.
        """
        batch_size = int(batch_size or self.eval_batch_size)
        x, y = self.test_data()
        if max_samples is not None:
            x, y = x[:max_samples], y[:max_samples]
        if y.shape[0] == 0:
            raise ValueError("no test samples to evaluate on")
        fn = self._eval_fn(model)
        loss = 0.0
        correct = 0
        for lo in range(0, y.shape[0], batch_size):
            l_sum, c = fn(x[lo:lo + batch_size], y[lo:lo + batch_size])
            loss += float(l_sum)
            correct += int(c)
        return {"loss": loss / y.shape[0], "accuracy": correct / y.shape[0]}
