"""The gradient aggregation rule (GAR) interface and its registry.

A GAR maps the n workers' gradients, an ``(n, d)`` tensor, to one ``(d,)`` update, such that up to ``f``
Byzantine rows cannot move it arbitrarily far. Each rule lives in its own module of this package, registers
itself with :func:`register`, and is built by name with :func:`aggregathor.gars.get`.

Conventions every rule follows:

- ``aggregate(x)`` is pure TensorFlow on an ``(n, d)`` tensor, traced once per ``(d, dtype)`` into a
  ``tf.function`` (``jit_compile=cls.jit_compile``) with static shapes. No per-coordinate Python, no
  ``tf.stack``/``tf.gather`` of the whole ``(n, d)`` where a weighted sum does the job.
- ``check()`` raises ``ValueError`` naming the bound that ``(n, f)`` violates.
- ``nan_robust = True`` documents that the rule never returns NaN while at most ``f`` rows are non-finite.
- ``positional_rows = True`` (Draco's groups of consecutive workers) says row ``i`` must be worker ``i + 1``'s: the
  server never rebuilds such a rule for the rows that arrived in a step (:class:`aggregathor.server.RowSubsetRules`).
- A numpy reference written straight from the paper lives in :mod:`aggregathor.gars.reference`, apart
  from the fast path; the tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from aggregathor._registry import Registry
from aggregathor.tracing import per_object_function

__all__ = ["GAR", "register", "registry", "as_matrix"]

#: The registered classes by name; the public modules of ``aggregathor.gars`` register theirs.
REGISTRY: Registry[type[GAR]] = Registry("aggregation rule", "aggregathor.gars", ("base", "reference"))


def register(cls: type[GAR]) -> type[GAR]:
    """Class decorator: make ``cls`` available as ``aggregathor.gars.get(cls.name, ...)``."""
    return REGISTRY.register(cls)


def registry() -> dict[str, type[GAR]]:
    """A copy of the name -> class registry (what is imported so far)."""
    return REGISTRY.table()


def as_matrix(grads: Any, dtype: tf.DType | None = None) -> tf.Tensor:
    """An ``(n, d)`` tensor from an ``(n, d)`` tensor/array, or from a list of n tensors of one shape.

    A list is flattened and stacked (one copy): callers on a hot path should pass the ``(n, d)`` buffer the
    gradients were received into.
    """
    if isinstance(grads, list | tuple):
        if not grads:
            raise ValueError("no gradients to aggregate")
        grads = tf.stack([tf.reshape(tf.convert_to_tensor(g, dtype=dtype), [-1]) for g in grads])
    x = tf.convert_to_tensor(grads, dtype=dtype)
    if x.shape.rank != 2:
        raise ValueError(f"gradients must be an (n, d) matrix or a list of n tensors, got shape {x.shape}")
    if not x.dtype.is_floating:
        raise ValueError(f"gradients must be floating point, got {x.dtype.name}")
    return x


class GAR:
    """Base class of the aggregation rules.

    Parameters
    ----------
    n : int
        Number of gradients aggregated per step.
    f : int
        Number of Byzantine gradients tolerated.
    """

    name: ClassVar[str] = ""
    nan_robust: ClassVar[bool] = False
    positional_rows: ClassVar[bool] = False
    jit_compile: ClassVar[bool] = True

    def __init__(self, n: int, f: int, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected arguments {sorted(kwargs)}")
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"{self.name}: n must be a positive int, got {n!r}")
        if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
            raise ValueError(f"{self.name}: f must be a non-negative int, got {f!r}")
        self.n = int(n)
        self.f = int(f)
        self._fns: dict[tuple[int, str], Callable[[tf.Tensor], tf.Tensor]] = {}

    # ------------------------------------------------------------------ contract
    def check(self) -> None:
        """Raise ValueError naming the violated bound when this rule cannot tolerate ``f`` of ``n``."""

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        """Aggregate an ``(n, d)`` tensor into a ``(d,)`` tensor (pure TensorFlow; traced)."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """Keras-style configuration: ``get(**cfg)`` rebuilds the rule."""
        return {"name": self.name, "n": self.n, "f": self.f}

    # ------------------------------------------------------------------ calling
    def _require(self, cond: bool, bound: str) -> None:
        if not cond:
            raise ValueError(f"{self.name} needs {bound}; got n={self.n}, f={self.f}")

    def function(self, d: int, dtype: tf.DType = tf.float32) -> Callable[[tf.Tensor], tf.Tensor]:
        """The compiled ``tf.function`` for ``(n, d)`` inputs of ``dtype`` (cached)."""
        key = (int(d), tf.as_dtype(dtype).name)
        fn = self._fns.get(key)
        if fn is None:
            spec = tf.TensorSpec([self.n, int(d)], tf.as_dtype(dtype))
            fn = per_object_function(self.aggregate, input_signature=[spec], jit_compile=self.jit_compile,
                                     reduce_retracing=True)
            self._fns[key] = fn
        return fn

    def __call__(self, grads: tf.Tensor | np.ndarray | Sequence[Any]) -> tf.Tensor:
        """Aggregate ``grads`` (an ``(n, d)`` tensor/array or a list of n tensors) into ``(d,)``."""
        x = as_matrix(grads)
        if x.shape[0] != self.n:
            raise ValueError(f"{self.name} was built for n={self.n} gradients, got {x.shape[0]}")
        return self.function(x.shape[1], x.dtype)(x)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"
