"""Bulyan: iterated Krum selection, then a coordinate-wise mean around the median (El Mhamdi et al. 2018)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from aggregathor.gars import _distances, _scaling, _sortnet
from aggregathor.gars.base import GAR, register

_VARIANTS = ("krum", "multi-krum")


#: Squared distance above which a difference of two float32 values may exceed half of float32's maximum, so that
#: a distance to the median, or a sum, may overflow: the coordinate phase then runs on rows scaled by a power
#: of two (:func:`_scaled_or_not`).
_FLOAT32_SAFE_SQ = (float(tf.float32.max) / 2.0) ** 2


@functools.cache
def _selected_mean_around_median(beta: int, scaled: bool) -> Callable[..., tf.Tensor]:
    """XLA: per coordinate, the mean of the ``beta`` values of rows ``index`` closest to their median.

    ``scaled``: the rows are multiplied by ``scale`` (a power of two) as they are read and the result divided
    by it; a separate function, so that the unscaled one has no product (XLA would repeat it at every use of
    a row in the sorting network)."""

    def fn(x: tf.Tensor, index: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        rows = [_distances.take_row(x, index[k]) for k in range(int(index.shape[0]))]
        if scaled:
            rows = [r * scale for r in rows]
            return _sortnet.mean_around_median(rows, beta) / scale
        return _sortnet.mean_around_median(rows, beta)

    return tf.function(fn, jit_compile=True, autograph=False)


def _scaled_or_not(dist: tf.Tensor, used: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Whether the coordinate phase must scale its rows: some two of the ``used`` rows (bool ``(n,)``) are
    so far apart (a finite squared distance above :data:`_FLOAT32_SAFE_SQ`, float32 rows only) that a
    difference of their values may overflow. (An overflowing *sum* is caught afterwards: the output is not
    finite, and the phase reruns scaled.)"""
    if dtype != tf.float32:
        return tf.constant(False)
    pair = tf.logical_and(used[:, None], used[None, :])
    far = tf.logical_and(pair, tf.logical_and(tf.math.is_finite(dist), dist > _FLOAT32_SAFE_SQ))
    return tf.reduce_any(far)


def _mean_closest(values: list[tf.Tensor], count: int, centre_rank: int, divisor: tf.Tensor) -> tf.Tensor:
    """Per coordinate, the mean of the ``count`` values closest to the rank-``centre_rank`` value.

    Ties in distance go to the smaller value: the leftmost window of ``count`` consecutive sorted values
    with the smallest sum of distances (same rule, same exact slide test as
    :func:`~aggregathor.gars._sortnet.mean_around_median`). ``divisor`` is ``count`` as a tensor argument.
    """
    v = _sortnet.sorted_rows(values)
    t = len(v)
    c = v[centre_rank]
    start = tf.zeros_like(c, dtype=tf.int32)
    for a in range(t - count):
        start = tf.where(tf.abs(v[a + count] - c) < tf.abs(v[a] - c), a + 1, start)
    zero = tf.zeros_like(c)
    total = zero
    for i in range(t):
        total = total + tf.where((start <= i) & (i < start + count), v[i], zero)
    return total / divisor


@functools.cache
def _aggregathor_coordinate_phase(sizes: tuple[int, ...], beta: int, scaled: bool) -> Callable[..., tf.Tensor]:
    """XLA: the AggregaThor variant's second stage, from the rows averaged in each round.

    ``order`` is ``(t, n)``: round k averages rows ``order[k, :sizes[k]]`` (a sum of dynamic row slices, no
    gather, no stack, divided by ``divisors[k]``, a true division as in the original); the ``t`` round means
    are then sorted per coordinate by a network and the ``beta`` closest to the upper median (rank
    ``t // 2``, as ``std::nth_element`` at ``t / 2`` in the original) are averaged.
    """

    def fn(x: tf.Tensor, order: tf.Tensor, divisors: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        def row(i: tf.Tensor) -> tf.Tensor:
            r = _distances.take_row(x, i)
            return r * scale if scaled else r

        inter = []
        for k, size in enumerate(sizes):
            total = row(order[k, 0])
            for j in range(1, size):
                total = total + row(order[k, j])
            inter.append(total / divisors[k])
        out = _mean_closest(inter, beta, len(sizes) // 2, divisors[-1])
        return out / scale if scaled else out

    return tf.function(fn, jit_compile=True, autograph=False)


@register
class Bulyan(_distances.KrumDistances, GAR):
    r"""Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
    ICML 2018, §4). Needs :math:`n \ge 4f + 3`.

    ``variant="krum"`` (default), the paper's algorithm:

    1. Selection: :math:`\theta = n - 2f` rounds of Krum. Round :math:`r` scores the :math:`n_r = n - r`
       remaining rows on the remaining set only, :math:`s(i) = \sum` of the squared distances to its
       :math:`\max(n_r - f - 2, 0)` closest remaining peers (recomputed every round from the distance matrix,
       not patched), moves the argmin (ties: lowest index) to the selection :math:`S`.
    2. Per coordinate :math:`j`, with :math:`m_j` the median of :math:`\{G_{ij}\}_{i \in S}` (the mean of the
       two middle values when :math:`\theta` is even), average the :math:`\beta = \theta - 2f` values closest
       to :math:`m_j`: :math:`\mathrm{Bulyan}_j = \frac1\beta \sum_{i \in M_j} G_{ij}`,
       :math:`M_j = \arg\min_{|M| = \beta} \sum_{i \in M} |G_{ij} - m_j|`. Ties in distance go to the smaller
       value (the leftmost window of :math:`\beta` sorted values with the smallest sum of distances).

    ``variant="multi-krum"``, the original AggregaThor kernel ("Bulyan over Multi-Krum",
    ``native/op_bulyan/cpu.cpp`` of LPD-EPFL/AggregaThor), reproduced as it is, which differs from the paper:

    - :math:`t = n - 2f - 2` rounds and :math:`b = t - 2f` (not :math:`\theta = n - 2f`,
      :math:`\beta = \theta - 2f`);
    - the Krum scores (:math:`n - f - 2` neighbours) are computed once; the distances from each row to the
      rows outside its :math:`n - f - 2` nearest are zeroed ("pruned");
    - round :math:`k = 0 .. t-1` ranks the rows by score (removed rows after every finite score, non-finite
      scores last), outputs the **mean of the** :math:`m - k` best rows (:math:`m = n - f - 2`), removes the
      best one and subtracts from every other row's score its pruned distance to it (so a row only loses a
      neighbour that was among its original :math:`n - f - 2`; the neighbour sets are not recomputed);
    - per coordinate over the :math:`t` round means, the :math:`b` values closest to the **upper** median
      (sorted index :math:`t/2`, no averaging of the two middle values) are averaged (ties there are left
      to ``std::nth_element`` in the original; here, the smaller value).

    Ties in the original are left to ``std::sort``; here, the lowest index.

    ``nan_robust``: non-finite rows have distance :math:`+\infty`, hence score :math:`+\infty`, and are never
    selected while at most ``f`` rows are non-finite (:math:`n - f \ge \theta` finite rows remain).

    Cost, in three phases (:meth:`distances`, :meth:`select`, :meth:`combine`; ``python -m aggregathor.bench
    gars`` times each): the squared distances, computed once (on the CPU one blocked pass of the compiled
    kernel of :mod:`~aggregathor.gars._distances`; every round reuses them), the selection on the ``(n, n)``
    matrix, then one fused XLA pass that reads only the :math:`\theta` selected rows (scalar-index gathers,
    which XLA fuses as dynamic slices: no copy, no stack) and runs the sorting network of :math:`\theta` values
    on them
    (:func:`~aggregathor.gars._sortnet.mean_around_median`). That is cheaper than masking the :math:`2f`
    unselected rows of all :math:`n` with :math:`\pm\infty` and sorting :math:`n` values: it reads
    :math:`\theta/n` of the data and its network is smaller (about 40 compare-exchanges for
    :math:`\theta = 12` against 97 for :math:`n = 20`).

    Numeric limits: the selection has those of :class:`~aggregathor.gars.krum.Krum`. On the CPU (float32 rows)
    the distances are sums of squared differences, exact to a few float32 roundings relative to themselves, so
    the later rounds, which compare distances inside a cluster, order a tight cluster far from the others as
    an exact computation does, at any finite magnitude. On a GPU or for float64 rows, the centred Gram cannot
    tell apart rows closer than about ``1e-7`` of their distance from the robust centre. The coordinate phase
    works in the rows' dtype: the AggregaThor variant's round means overflow to ``inf`` when the summed
    entries exceed about ``max / m``, and the mean of the :math:`\beta` closest values likewise.
    """

    name = "bulyan"
    nan_robust = True
    jit_compile = False

    def __init__(self, n: int, f: int, variant: str = "krum", **kwargs: Any) -> None:
        super().__init__(n, f, **kwargs)
        if variant not in _VARIANTS:
            raise ValueError(f"{self.name}: variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant = variant

    def check(self) -> None:
        self._require(self.n >= 4 * self.f + 3, "n >= 4f + 3")

    def get_config(self) -> dict[str, Any]:
        cfg = super().get_config()
        if self.variant != "krum":
            cfg["variant"] = self.variant
        return cfg

    # ------------------------------------------------------------------------------------ selection
    def selection(self, dist: tf.Tensor) -> tf.Tensor:
        """The ``theta = n - 2f`` indices selected by iterated Krum from the distances, in order (int32)."""
        n, f = self.n, self.f
        ids = tf.range(n, dtype=tf.int32)
        active = tf.ones([n], tf.bool)
        chosen = []
        for r in range(n - 2 * f):
            scores = _distances.krum_scores(dist, n - r - f - 2, active)
            best = _distances.first_argmin(scores, active)
            chosen.append(best)
            active = tf.logical_and(active, tf.not_equal(ids, best))
        return tf.stack(chosen)

    def _aggregathor_rounds(self, dist: tf.Tensor) -> tf.Tensor:
        """The ``(t, n)`` row rankings of the AggregaThor variant's rounds (see the class notes)."""
        n, f = self.n, self.f
        t, m = n - 2 * f - 2, n - f - 2
        inf = tf.constant(float("inf"), tf.float64)
        big = tf.constant(tf.float64.max, tf.float64)
        others = tf.linalg.set_diag(dist, tf.fill([n], inf))
        scores = _distances.krum_scores(dist, m)
        near = tf.math.top_k(-others, k=m, sorted=True).indices  # each row's n - f - 2 nearest
        member = tf.reduce_sum(tf.one_hot(near, n, dtype=tf.float64), axis=1) > 0
        pruned = tf.where(member, others, tf.zeros_like(others))
        removed = tf.zeros([n], tf.bool)
        ids = tf.range(n, dtype=tf.int32)
        orders = []
        for _ in range(t):
            key = tf.where(removed, big, tf.where(tf.math.is_finite(scores), scores, inf))
            order = tf.cast(tf.argsort(key, stable=True), tf.int32)
            orders.append(order)
            best = order[0]
            removed = tf.logical_or(removed, tf.equal(ids, best))
            drop = tf.gather(pruned, best, axis=1)
            scores = tf.where(tf.math.is_finite(scores) & tf.math.is_finite(drop), scores - drop, scores)
        return tf.stack(orders)

    # ------------------------------------------------------------------------------------ aggregate
    def select(self, dist: tf.Tensor, dtype: tf.DType = tf.float32) -> tuple[tf.Tensor, tf.Tensor]:
        """Phase 2: ``(selected, far)``: :meth:`selection` (``variant="krum"``) or the AggregaThor variant's
        ``(t, n)`` rankings, and whether the coordinate phase must scale its rows (rows of ``dtype`` used by it
        so far apart that their differences may overflow)."""
        n = self.n
        if self.variant == "krum":
            selected = self.selection(dist)
            used = tf.reduce_any(tf.equal(selected[:, None], tf.range(n, dtype=tf.int32)[None, :]), axis=0)
        else:
            selected = self._aggregathor_rounds(dist)
            m = n - self.f - 2
            mask = tf.range(m)[None, :] < (m - tf.range(int(selected.shape[0])))[:, None]  # round k: m - k rows
            rows = tf.boolean_mask(selected[:, :m], mask)
            used = tf.reduce_any(tf.equal(rows[:, None], tf.range(n, dtype=tf.int32)[None, :]), axis=0)
        return selected, _scaled_or_not(dist, used, dtype)

    def combine(self, x: tf.Tensor, selection: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        """Phase 3: the coordinate-wise phase on the rows :meth:`select` chose (one fused XLA pass).

        Run unscaled unless ``far``; when the output is not finite (a sum overflowed), rerun on rows scaled by
        :func:`~aggregathor.gars._scaling.sum_scale` of the largest count summed (exact powers of two)."""
        selected, far = selection
        if self.variant == "krum":
            beta = self.n - 4 * self.f
            scale = tf.constant(_scaling.sum_scale(max(2, self.n - 2 * self.f)), x.dtype)

            def run(scaled: bool) -> tf.Tensor:
                return _selected_mean_around_median(beta, scaled)(x, selected, scale)
        else:
            t, m = self.n - 2 * self.f - 2, self.n - self.f - 2
            sizes = tuple(m - k for k in range(t))
            beta = t - 2 * self.f
            divisors = tf.constant([*sizes, beta], x.dtype)
            scale = tf.constant(_scaling.sum_scale(max(2, m)), x.dtype)

            def run(scaled: bool) -> tf.Tensor:
                return _aggregathor_coordinate_phase(sizes, beta, scaled)(x, selected, divisors, scale)

        out = tf.cond(far, lambda: run(True), lambda: run(False))
        return _scaling.finite_or(out, lambda: run(True))

    def aggregate(self, x: tf.Tensor) -> tf.Tensor:
        self.check()
        return self.combine(x, self.select(self.distances(x), x.dtype))
