"""Pairwise squared Euclidean distances of the rows of an ``(n, d)`` tensor, and fused weighted sums of rows.

The distance-based rules (Krum, Multi-Krum, Bulyan, NNM, geometric median, centered clipping) need the
``(n, n)`` matrix ``D[i, j] = ||x_i - x_j||^2``. Computing it from the differences costs ``n (n - 1) / 2``
passes over the data; the Gram shortcut ``||x||^2 + ||y||^2 - 2 <x, y>`` costs one matrix product, but in
float32 it cancels catastrophically when the rows are close together compared with their norm (the NOTES
measured 160% relative error for honest rows = shared gradient + 1e-3 noise). So:

1. **Centring.** Every row is centred on a robust reference ``c`` before the products: ``y_i = x_i - c``,
   ``D[i, j] = G_ii + G_jj - 2 G_ij`` with ``G = Y Y^T``. The distances are translation invariant, only the
   rounding changes: its error is about ``eps * k * (||y_i||^2 + ||y_j||^2)`` instead of
   ``eps * k * (||x_i||^2 + ||x_j||^2)``. The reference is the coordinate-wise median of the finite values of
   the rows (:func:`~aggregathor.gars._sortnet.nan_median`): with at most ``f < n/2`` Byzantine rows it lies,
   per coordinate, within the range of the honest values, so ``||y_i||`` is of the order of the honest
   spread whatever the Byzantine rows hold. (A coordinate where no value is finite is centred on 0.)
2. **One read of the data.** The columns are processed in blocks of ``B`` (about 2.5 MB of the ``(n, B)``
   block, so that it stays in the L2 cache): per block, the median network and the subtraction run in XLA
   (fused, vectorised), and the ``(n, B) x (B, n)`` product runs in TensorFlow's own matmul (oneDNN/Eigen,
   several times faster than XLA's dot on CPU). The block Grams are summed in float64. The data is read
   from memory once; the centred block is only ever written to the cache.
3. **Non-finite rows.** A NaN or infinity in row ``i`` makes ``G_ii`` non-finite; such a row is at distance
   ``+inf`` from every row, itself included (``D[i, i] = +inf``), and every other row is at distance 0 from
   itself. (A row whose squared norm around the centre overflows the dtype counts as non-finite too.)
   Negative rounding residues are clamped to 0.
4. **precise=True** computes the block products in float64 (the float32 values are exact in float64, and so
   are their products), for the rules that iterate on distances to points inside the convex hull of the rows
   (geometric median, centered clipping), where the relative error of a float32 Gram would grow as the
   iterate approaches a row. It costs about twice the float32 product.

The rules run these helpers in a ``tf.function`` *without* XLA (their ``jit_compile = False``): the blocks'
elementwise work is XLA-compiled through nested ``tf.function(jit_compile=True)`` calls, the products are
not. (Inside an XLA cluster everything still works, only slower.)

Weighted sums of rows (the aggregate of every selection rule) never use ``tf.gather`` or ``tf.stack`` of
the data nor a matmul (``0 * NaN = NaN`` would leak unselected non-finite rows): :func:`mean_of_rows` adds
``m`` rows picked by index with dynamic slices fused into one XLA loop (it reads only those rows), and
:func:`weighted_sum` adds all rows with a weight, skipping the rows of weight 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

from aggregathor.gars import _sortnet

__all__ = [
    "BLOCK_BYTES",
    "block_columns",
    "centred_gram",
    "distances_from_gram",
    "first_argmin",
    "krum_scores",
    "mean_of_rows",
    "pairwise_sq_distances",
    "row_sq_norms",
    "take_row",
    "weighted_sum",
]

#: Target size in bytes of one ``(n, B)`` column block of the input (about half an L2 cache).
BLOCK_BYTES = 5 * 2**19

_INF = float("inf")


def block_columns(n: int, d: int, itemsize: int = 4) -> int:
    """The number of columns per block for an ``(n, d)`` input: about :data:`BLOCK_BYTES`, a multiple of 512."""
    b = max(512, (BLOCK_BYTES // max(1, n * itemsize)) // 512 * 512)
    return min(d, b)


# ------------------------------------------------------------------------------------------- XLA pieces
@functools.lru_cache(maxsize=None)
def _median_block(rows: int, width: int) -> Callable[..., tf.Tensor]:
    """XLA: the finite-value median of rows ``0 .. rows-1``, columns ``start .. start+width-1`` (0 if none)."""

    def fn(x: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
        block = tf.slice(x, tf.stack([0, start]), [rows, width])
        return _sortnet.finite_or(_sortnet.nan_median(block), 0.0)

    return tf.function(fn, jit_compile=True, autograph=False)


@functools.lru_cache(maxsize=None)
def _centred_block(width: int, precise: bool) -> Callable[..., tf.Tensor]:
    """XLA: columns ``start .. start+width-1`` of ``x`` minus the centre block ``c`` (float64 if precise)."""

    def fn(x: tf.Tensor, start: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        block = tf.slice(x, tf.stack([0, start]), [x.shape[0], width])
        if precise:
            return tf.cast(block, tf.float64) - tf.cast(c, tf.float64)
        return block - c

    return tf.function(fn, jit_compile=True, autograph=False)


def _block_gram(y: tf.Tensor, diag_only: bool) -> tf.Tensor:
    if diag_only:
        return tf.cast(tf.reduce_sum(tf.square(y), axis=1), tf.float64)
    return tf.cast(tf.matmul(y, y, transpose_b=True), tf.float64)


def centred_gram(
    x: tf.Tensor,
    *,
    centre: tf.Tensor | None = None,
    ref_rows: int | None = None,
    precise: bool = False,
    diag_only: bool = False,
    block: int | None = None,
) -> tf.Tensor:
    """``G[i, j] = <x_i - c, x_j - c>`` in float64, ``(n, n)`` (or its diagonal ``(n,)`` if ``diag_only``).

    ``c`` is ``centre`` (a ``(d,)`` tensor) when given, else the coordinate-wise median of the finite values
    of the first ``ref_rows`` rows (all rows by default; any ``2f + 1`` rows are a robust choice too), with 0
    where none is finite. ``precise`` computes the products in float64. ``block`` overrides the number of
    columns per block (:func:`block_columns`).
    """
    x = tf.convert_to_tensor(x)
    n, d = int(x.shape[0]), int(x.shape[1])
    r = n if ref_rows is None else max(1, min(n, int(ref_rows)))
    width = int(block) if block else block_columns(n, d, x.dtype.size)
    width = max(1, min(width, d))
    full, tail = divmod(d, width)
    if centre is not None:
        centre = tf.convert_to_tensor(centre, dtype=x.dtype)

    def one(start: tf.Tensor, w: int) -> tf.Tensor:
        if centre is None:
            c = _median_block(r, w)(x, start)
        else:
            c = tf.slice(centre, tf.reshape(start, [1]), [w])
        return _block_gram(_centred_block(w, precise)(x, start, c), diag_only)

    shape = [n] if diag_only else [n, n]
    gram = tf.zeros(shape, tf.float64)
    if full == 1:
        gram = one(tf.constant(0, tf.int32), width)
    elif full > 1:

        def body(k: tf.Tensor, acc: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return k + 1, acc + one(k * width, width)

        _, gram = tf.while_loop(
            lambda k, acc: k < full, body, (tf.constant(0, tf.int32), gram), parallel_iterations=2
        )
    if tail:
        gram = gram + one(tf.constant(full * width, tf.int32), tail)
    return gram


def distances_from_gram(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(D, ok)``: squared distances ``(n, n)`` (float64) from a centred Gram, and the finite-row mask ``(n,)``.

    ``D[i, j] = max(G_ii + G_jj - 2 G_ij, 0)``; ``+inf`` when row i or row j is non-finite (``G_ii`` not
    finite) or the result is not a number; ``D[i, i]`` is 0 for a finite row, ``+inf`` for a non-finite one.
    """
    g = tf.linalg.diag_part(gram)
    ok = tf.math.is_finite(g)
    raw = g[:, None] + g[None, :] - 2.0 * gram
    both = tf.logical_and(ok[:, None], ok[None, :])
    good = tf.logical_and(both, tf.logical_not(tf.math.is_nan(raw)))
    inf = tf.constant(_INF, tf.float64)
    dist = tf.where(good, tf.maximum(raw, 0.0), inf)
    dist = tf.linalg.set_diag(dist, tf.where(ok, tf.zeros_like(g), inf))
    return dist, ok


def pairwise_sq_distances(x: tf.Tensor, **kwargs: object) -> tf.Tensor:
    """The ``(n, n)`` float64 matrix of squared distances between the rows of ``x`` (see the module notes).

    Keyword arguments go to :func:`centred_gram` (``ref_rows``, ``centre``, ``precise``, ``block``).
    """
    return distances_from_gram(centred_gram(x, **kwargs))[0]


# ------------------------------------------------------------------------------------------- selection
def krum_scores(dist: tf.Tensor, k: int, active: tf.Tensor | None = None) -> tf.Tensor:
    """Krum scores ``(n,)``: the sum of the ``k`` smallest squared distances from row i to the *other* rows.

    ``active`` (bool ``(n,)``) restricts both the scored rows and their neighbours to a subset; the scores
    of inactive rows are ``+inf``. A non-finite row (``D[i, i] = +inf``) has score ``+inf``. ``k <= 0``
    gives 0 for every finite active row (the papers' count ``n - f - 2`` can reach 0 in Bulyan's last
    rounds).
    """
    n = int(dist.shape[0])
    inf = tf.constant(_INF, dist.dtype)
    ok = tf.math.is_finite(tf.linalg.diag_part(dist))
    others = tf.linalg.set_diag(dist, tf.fill([n], inf))
    if active is not None:
        others = tf.where(active[None, :], others, inf)
        ok = tf.logical_and(ok, active)
    k = max(0, min(int(k), n - 1))
    if k == 0:
        scores = tf.zeros([n], dist.dtype)
    else:
        smallest = -tf.math.top_k(-others, k=k, sorted=False).values
        scores = tf.reduce_sum(smallest, axis=1)
    return tf.where(ok, scores, inf)


def first_argmin(values: tf.Tensor, active: tf.Tensor | None = None) -> tf.Tensor:
    """The lowest index among the minima of ``values`` (restricted to ``active``), as an int32 scalar.

    ``tf.argmin`` does not promise which of equal minima it returns; this does. All-``+inf`` values give the
    lowest (active) index.
    """
    n = int(values.shape[0])
    inf = tf.constant(_INF, values.dtype)
    if active is None:
        active = tf.ones([n], tf.bool)
    masked = tf.where(active, values, inf)
    best = tf.reduce_min(masked)
    hit = tf.logical_and(active, masked <= best)
    return tf.reduce_min(tf.where(hit, tf.range(n, dtype=tf.int32), n))


def take_row(x: tf.Tensor, i: tf.Tensor) -> tf.Tensor:
    """Row ``i`` of ``x`` (``i`` a scalar tensor) as a ``(d,)`` tensor: one dynamic slice, no gather."""
    d = int(x.shape[1])
    return tf.reshape(tf.slice(x, tf.stack([tf.cast(i, tf.int32), 0]), [1, d]), [d])


@functools.lru_cache(maxsize=None)
def _mean_of_rows_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        m = int(index.shape[0])
        total = take_row(x, index[0])
        for k in range(1, m):
            total = total + take_row(x, index[k])
        return total / tf.cast(m, x.dtype)

    return tf.function(fn, jit_compile=True, autograph=False)


def mean_of_rows(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """``(1/m) sum_k x[index[k]]`` for a static-length ``(m,)`` index: one fused XLA pass over those m rows."""
    return _mean_of_rows_fn()(x, tf.cast(index, tf.int32))


@functools.lru_cache(maxsize=None)
def _weighted_sum_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        n = int(x.shape[0])
        zero = tf.zeros([int(x.shape[1])], x.dtype)
        total = zero
        for i in range(n):
            # the select keeps a NaN/Inf row of weight 0 out (0 * NaN = NaN)
            total = total + tf.where(w[i] != 0, w[i] * x[i], zero)
        return total

    return tf.function(fn, jit_compile=True, autograph=False)


def weighted_sum(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """``sum_i w_i x_i`` over the rows with ``w_i != 0`` (rows of weight 0 are skipped, even if non-finite)."""
    return _weighted_sum_fn()(x, tf.cast(w, x.dtype))


@functools.lru_cache(maxsize=None)
def _row_sq_norms_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.square(tf.cast(x, tf.float64)), axis=1)

    return tf.function(fn, jit_compile=True, autograph=False)


def row_sq_norms(x: tf.Tensor) -> tf.Tensor:
    """``||x_i||^2`` per row, ``(n,)`` float64 (accumulated in float64; non-finite for a non-finite row)."""
    return _row_sq_norms_fn()(x)
