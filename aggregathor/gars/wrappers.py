"""Pre-aggregation wrappers: ``(n, d) -> (n', d)`` transformations composed with any rule.

``aggregathor.gars.get("krum", n, f, pre=["nnm"])`` builds Krum behind nearest-neighbour mixing; ``pre`` is a
list of wrapper names or dicts ``{"name": ..., **arguments}``, applied in order. A wrapper may change the
``(n, f)`` the next stage sees (bucketing turns ``n`` rows into ``ceil(n/s)`` buckets); the rule is built,
and its bound checked, for the ``(n', f')`` that reaches it. The result is one GAR whose ``aggregate`` runs
the wrappers and the rule in a single traced function: one XLA cluster when every part is XLA-compiled,
otherwise a plain ``tf.function`` calling each part's own compiled function -- and when the last wrapper
only scales rows (clipping, ARC) and the rule is XLA-compiled, the scaling runs inside the rule's cluster
(the norms are computed before it), so the clipped rows are never written to memory.

============  ===========================================  ==================  ===========
name          what                                         (n', f')            XLA
============  ===========================================  ==================  ===========
nnm           row i -> mean of its n - f nearest rows      (n, f)              no (Gram, matmul)
bucketing     random buckets of s rows -> their means      (ceil(n/s), f)      yes
clipping      x_i * min(1, c / ||x_i||)                    (n, f)              scaling only
arc           clip to the (k+1)-th largest norm            (n, f)              scaling only
============  ===========================================  ==================  ===========

Non-finite rows: every wrapper maps a row holding a NaN or an infinity to a row of NaN (or, for bucketing,
to a NaN bucket), and never lets it into a finite output row while at most ``f`` rows are non-finite. So
at most ``f'`` output rows are non-finite and the composition is ``nan_robust`` when the rule is.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from aggregathor._registry import Registry
from aggregathor.gars import _distances, _scaling
from aggregathor.gars.base import GAR, registry
from aggregathor.tracing import per_object_function

__all__ = ["ARC", "NNM", "Bucketing", "Clipping", "Composed", "Wrapper", "compose", "names", "register_wrapper"]

#: The wrappers by name (all defined in this module).
WRAPPERS: Registry[type[Wrapper]] = Registry("pre-aggregation wrapper")


def register_wrapper(cls: type[Wrapper]) -> type[Wrapper]:
    """Class decorator: make ``cls`` usable as ``pre=[cls.name]``."""
    return WRAPPERS.register(cls)


def names() -> list[str]:
    """The registered wrapper names, sorted."""
    return WRAPPERS.names()


class Wrapper:
    """Base class of the pre-aggregation wrappers.

    ``transform(x)`` is pure TensorFlow from ``(n, d)`` to ``(n', d)`` of the same dtype; :meth:`output_nf`
    gives ``(n', f')``; ``check()`` raises ValueError naming the violated bound; ``get_config()`` returns
    the ``{"name": ..., **arguments}`` dict that rebuilds it in ``pre=[...]``.

    A ``fusable`` wrapper splits ``transform`` into ``prepare(x)`` (small results, e.g. per-row scales,
    computed outside XLA) and ``apply(x, aux)`` (elementwise, cheap to fuse): when it is the last wrapper
    before an XLA-compiled rule, ``apply`` runs inside the rule's XLA cluster and its ``(n, d)`` output is
    never written to memory.
    """

    name: ClassVar[str] = ""
    jit_compile: ClassVar[bool] = True
    fusable: ClassVar[bool] = False

    def __init__(self, n: int, f: int, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected arguments {sorted(kwargs)}")
        self.n, self.f = int(n), int(f)
        self._fn: Callable[[tf.Tensor], tf.Tensor] | None = None

    def output_nf(self) -> tuple[int, int]:
        return self.n, self.f

    def check(self) -> None:
        """Raise ValueError when the wrapper cannot run for ``(n, f)``."""

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def transform(self, x: tf.Tensor) -> tf.Tensor:
        return self.apply(x, self.prepare(x))

    def prepare(self, x: tf.Tensor) -> tf.Tensor | None:
        """The non-elementwise part of a ``fusable`` wrapper (runs outside XLA)."""
        return None

    def apply(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        """The elementwise part of a ``fusable`` wrapper, given :meth:`prepare`'s result."""
        raise NotImplementedError

    def apply_fused(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        """:meth:`apply` as written inside the rule's XLA cluster (same values)."""
        return self.apply(x, aux)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """``transform`` through its own ``tf.function`` (XLA-compiled when ``jit_compile``)."""
        if self._fn is None:
            self._fn = per_object_function(self.transform, jit_compile=self.jit_compile, autograph=False)
        return self._fn(x)

    def _require(self, cond: bool, bound: str) -> None:
        if not cond:
            raise ValueError(f"{self.name} needs {bound}; got n={self.n}, f={self.f}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}(n={self.n}, f={self.f}{', ' if args else ''}{args})"


# ----------------------------------------------------------------------------------------------- NNM
def _sq_distances_any_magnitude(x: tf.Tensor, ref_rows: int) -> tf.Tensor:
    """:func:`~aggregathor.gars._distances.pairwise_sq_distances`, recomputed with float64 products when a
    squared norm overflowed (``G_ii = +inf``; a row holding a NaN gives NaN and does not trigger it)."""
    gram = _distances.centred_gram(x, ref_rows=ref_rows)

    def fast() -> tf.Tensor:
        return _distances.distances_from_gram(gram, float(np.finfo(x.dtype.as_numpy_dtype).eps) / 2)[0]

    def precise() -> tf.Tensor:
        wide = _distances.centred_gram(x, ref_rows=ref_rows, precise=True)
        return _distances.distances_from_gram(wide, float(np.finfo(np.float64).eps) / 2)[0]

    return tf.cond(tf.reduce_any(tf.math.is_inf(tf.linalg.diag_part(gram))), precise, fast)


@register_wrapper
class NNM(Wrapper):
    r"""Nearest-neighbour mixing: row :math:`i` becomes the mean of its :math:`n - f` nearest rows (itself
    included, at distance 0), in squared Euclidean distance; ties go to the lowest index.

    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023, Algorithm 1. Keeps ``(n, f)``. Needs ``n > f``.

    Distances: the centred blocked Gram of :mod:`~aggregathor.gars._distances`; the mixing is one
    ``(n, n) @ (n, d)`` matmul (:func:`~aggregathor.gars._distances.mix_rows`). A non-finite row is at distance
    :math:`+\infty` from all, never a finite row's neighbour while at most ``f`` rows are non-finite, and
    becomes a row of NaN.

    Any finite magnitude: a finite row whose squared norm around the centre overflows the float32 product
    (norm above about 1.8e19) would read as non-finite; when some ``G_ii`` is ``+inf`` the Gram is recomputed
    with float64 products (exact, no overflow: a second pass, only then; also when a row holds an
    infinity). The mixing weighs each row by :math:`1/(n-f)` before adding: no overflow. Limit: the
    float32 Gram's rounding (see :mod:`~aggregathor.gars._distances`) still decides near ties.
    """

    name = "nnm"
    jit_compile = False

    def check(self) -> None:
        self._require(self.n > self.f, "n > f")

    def transform(self, x: tf.Tensor) -> tf.Tensor:
        dist = _sq_distances_any_magnitude(x, 2 * self.f + 1)
        ok = tf.math.is_finite(tf.linalg.diag_part(dist))
        k = self.n - self.f
        nearest = tf.math.top_k(-dist, k=k, sorted=True).indices  # stable: ties -> lowest index
        w = tf.reduce_sum(tf.one_hot(nearest, self.n, dtype=tf.float64), axis=1) / k
        w = tf.where(ok[:, None], w, tf.constant(float("nan"), tf.float64))
        return _distances.mix_rows(x, w, ok)


# ----------------------------------------------------------------------------------------- bucketing
@register_wrapper
class Bucketing(Wrapper):
    r"""Bucketing: permute the rows at random, cut them into :math:`\lceil n/s \rceil` consecutive buckets of
    ``s`` (the last one possibly smaller) and output each bucket's mean.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022,
    Algorithm 1. The rule after it sees :math:`n' = \lceil n/s \rceil` rows and the **same** ``f``: in the
    worst case every Byzantine row lands in a different bucket, so at most ``f`` buckets are contaminated
    (the paper's :math:`\delta' = s\delta`). The rule's own bound must hold for ``(n', f)``.

    ``seed`` seeds a ``tf.random.Generator`` (a new permutation on every call, reproducible from the seed);
    ``permutation`` fixes the permutation instead (for tests and replays). One fused XLA pass: the buckets
    are sums of dynamic row slices, the only write is the ``(n', d)`` output. The rows are summed at the
    exact scale :math:`2^{-\lceil \log_2 s \rceil}` (:func:`~aggregathor.gars._scaling.sum_scale`): finite
    at any finite magnitude; values below about 1e-37 in magnitude may be flushed to 0.
    """

    name = "bucketing"

    def __init__(
        self,
        n: int,
        f: int,
        s: int = 2,
        seed: int | None = None,
        permutation: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(n, f, **kwargs)
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1:
            raise ValueError(f"{self.name}: s must be an int >= 1, got {s!r}")
        self.s = int(s)
        self.seed = None if seed is None else int(seed)
        self.permutation = None if permutation is None else [int(p) for p in permutation]
        if self.permutation is not None and sorted(self.permutation) != list(range(self.n)):
            raise ValueError(f"{self.name}: not a permutation of range({self.n}): {self.permutation}")
        if self.permutation is None:
            # without a seed, one from the OS: as unpredictable as a non-deterministic state, and still allowed
            # when TensorFlow's op determinism is on (Draco's workers turn it on, in-process under simulate)
            with tf.init_scope():
                self._gen = tf.random.Generator.from_seed(secrets.randbits(63) if self.seed is None else self.seed)

    def output_nf(self) -> tuple[int, int]:
        return math.ceil(self.n / self.s), self.f

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"name": self.name, "s": self.s}
        if self.seed is not None:
            cfg["seed"] = self.seed
        if self.permutation is not None:
            cfg["permutation"] = list(self.permutation)
        return cfg

    def transform(self, x: tf.Tensor) -> tf.Tensor:
        n = self.n
        if self.permutation is not None:
            perm = tf.constant(self.permutation, tf.int32)
        else:
            perm = tf.cast(tf.argsort(self._gen.uniform([n], dtype=tf.float32)), tf.int32)
        # the rows are summed at the exact scale 2^-ceil(log2 s): a bucket of huge rows cannot overflow
        scale = _scaling.sum_scale(self.s)

        def row(j: int) -> tf.Tensor:
            r = _distances.take_row(x, perm[j])
            return r if scale == 1.0 else r * tf.constant(scale, x.dtype)

        out = []
        for start in range(0, self.n, self.s):
            members = range(start, min(start + self.s, self.n))
            total = row(members[0])
            for j in members[1:]:
                total = total + row(j)
            mean = total / tf.cast(len(members), x.dtype)
            out.append(mean if scale == 1.0 else mean / tf.constant(scale, x.dtype))
        return tf.stack(out)


# ------------------------------------------------------------------------------------------ clipping
def _clip_scales(norm: tf.Tensor, bound: tf.Tensor) -> tf.Tensor:
    """Per-row factors ``min(1, bound / ||x_i||)`` (float64); NaN for a non-finite row (or norm)."""
    ok = tf.math.is_finite(norm)
    scale = tf.where(norm <= bound, tf.ones_like(norm), bound / norm)
    return tf.where(ok, scale, tf.constant(float("nan"), tf.float64))


@register_wrapper
class Clipping(Wrapper):
    r"""Static clipping: :math:`x_i \min\{1, c / \|x_i\|\}` (every row to norm at most ``c``, default 1).

    As used before NNM and robust rules by Allouah et al. (AISTATS 2023; ICLR 2025). Keeps ``(n, f)``. A
    non-finite row becomes a row of NaN. Two passes: the norms (:func:`~aggregathor.gars._distances.row_norms`,
    TensorFlow's reduction: an XLA row reduction is several times slower on CPU), then the scaling.
    """

    name = "clipping"
    jit_compile = False
    fusable = True

    def __init__(self, n: int, f: int, c: float = 1.0, **kwargs: Any) -> None:
        super().__init__(n, f, **kwargs)
        if not float(c) > 0.0:
            raise ValueError(f"{self.name}: c must be > 0, got {c!r}")
        self.c = float(c)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "c": self.c}

    def prepare(self, x: tf.Tensor) -> tf.Tensor:
        return _clip_scales(_distances.row_norms(x), tf.constant(self.c, tf.float64))

    def apply(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        return _scaling.scale_rows(x, aux)

    def apply_fused(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        return _scaling.scale_rows_fused(x, aux)


@register_wrapper
class ARC(Wrapper):
    r"""Adaptive Robust Clipping: with :math:`k = \lfloor 2 (f/n) (n - f) \rfloor`, clip the :math:`k` rows of
    largest norm to the :math:`(k+1)`-th largest norm :math:`C` (every row to norm at most :math:`C`).

    Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive Gradient Clipping for Robust Federated
    Learning", ICLR 2025 (arXiv 2405.14432, 2024), Algorithm 1. Keeps ``(n, f)``; ``k = 0`` (``f = 0``) is
    the identity. A non-finite row has norm :math:`+\infty` (one of the largest) and becomes a row of NaN.
    Two passes, as :class:`Clipping`.
    """

    name = "arc"
    jit_compile = False
    fusable = True

    def check(self) -> None:
        self._require(self.n > self.f, "n > f")

    @property
    def k(self) -> int:
        return (2 * self.f * (self.n - self.f)) // self.n

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def prepare(self, x: tf.Tensor) -> tf.Tensor:
        norm = _distances.row_norms(x)
        key = tf.where(tf.math.is_finite(norm), norm, tf.constant(float("inf"), tf.float64))
        bound = tf.math.top_k(key, k=min(self.k, self.n - 1) + 1, sorted=True).values[-1]
        return _clip_scales(norm, bound)

    def apply(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        return _scaling.scale_rows(x, aux)

    def apply_fused(self, x: tf.Tensor, aux: tf.Tensor | None) -> tf.Tensor:
        return _scaling.scale_rows_fused(x, aux)


# ----------------------------------------------------------------------------------------- composition
class Composed(GAR):
    """A rule behind a chain of wrappers, as built by :func:`compose` (a subclass per composition).

    ``n``/``f`` are those the caller gave; ``inner`` is the rule built for the ``(n', f')`` reaching it.
    """

    def __init__(self, inner: GAR, wrappers: Sequence[Wrapper], n: int, f: int) -> None:
        super().__init__(n, f)
        self.inner = inner
        self.wrappers = list(wrappers)
        last = self.wrappers[-1] if self.wrappers else None
        # a fusable last wrapper runs its elementwise part inside the rule's XLA cluster
        self._fused = last is not None and last.fusable and inner.jit_compile and not self.jit_compile
        self._fused_fn: Callable[..., tf.Tensor] | None = None

    def check(self) -> None:
        for w in self.wrappers:
            w.check()
        self.inner.check()

    def get_config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.inner.get_config().items() if k not in ("name", "n", "f")}
        return {
            "name": self.inner.name,
            "n": self.n,
            "f": self.f,
            "pre": [w.get_config() for w in self.wrappers],
            **cfg,
        }

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        if self.jit_compile:  # one XLA cluster for the whole chain
            for w in self.wrappers:
                x = w.transform(x)
            return self.inner.aggregate(x)
        head = self.wrappers[:-1] if self._fused else self.wrappers
        for w in head:
            x = w(x)
        if not self._fused:
            return self.inner.function(int(x.shape[1]), x.dtype)(x)
        last = self.wrappers[-1]
        if self._fused_fn is None:
            self._fused_fn = per_object_function(
                lambda x, aux: self.inner.aggregate(last.apply_fused(x, aux)), jit_compile=True, autograph=False
            )
        return self._fused_fn(x, last.prepare(x))

    def __repr__(self) -> str:
        return f"{self.wrappers!r} -> {self.inner!r}"


def _spec(item: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and "name" in item:
        args = dict(item)
        return str(args.pop("name")), args
    raise ValueError(f"a wrapper is a name or a dict with a 'name', got {item!r}")


def compose(name: str, n: int, f: int, pre: Sequence[str | dict[str, Any]], **kwargs: Any) -> GAR:
    """The rule ``name`` behind the wrappers ``pre``; each stage is built for the ``(n, f)`` reaching it."""
    if isinstance(pre, str | dict):
        pre = [pre]
    stages: list[Wrapper] = []
    n_cur, f_cur = int(n), int(f)
    for item in pre:
        wname, args = _spec(item)
        w = WRAPPERS.get(wname)(n_cur, f_cur, **args)
        w.check()
        stages.append(w)
        n_cur, f_cur = w.output_nf()
    inner = registry()[name](n_cur, f_cur, **kwargs)
    inner.check()
    jit = inner.jit_compile and all(w.jit_compile for w in stages)
    cls_ = type(
        f"Composed{type(inner).__name__}",
        (Composed,),
        {"name": inner.name, "nan_robust": inner.nan_robust, "jit_compile": jit, "__doc__": Composed.__doc__},
    )
    return cls_(inner, stages, n, f)
