"""Pairwise squared Euclidean distances of the rows of an ``(n, d)`` tensor, and fused weighted sums of rows.

The distance-based rules (Krum, Multi-Krum, Bulyan, NNM, geometric median, centered clipping) need the
``(n, n)`` matrix ``D[i, j] = ||x_i - x_j||^2``. Two ways to get it:

**On the CPU, float32 rows: the compiled kernel** (:func:`kernel_distances`, ``cython_src/ag_pairdist.h``,
used by :func:`pairwise_sq_distances` where :func:`kernel_available`). Every pair's distance is the sum of its
squared differences, ``sum_k (x_ik - x_jk)^2``, in one blocked pass: each block of :data:`KERNEL_BLOCK` columns
is read from memory once (the next one prefetched meanwhile), and every pair is computed from the cached
block in 4 x 4 tiles of rows, 16 float32 lanes per vector, the lanes summed in float64 per block; the column
range is split between threads (2 on the 2-core machines measured). No Gram, no centre, no cancellation:

- each distance is exact to a few float32 roundings **relative to itself** (about ``1e-6``: one rounding of
  each difference and of each square, a lane adds at most ``KERNEL_BLOCK / 16`` terms before the float64
  sum), whatever the rows' magnitude or their distance from each other: a tight cluster far from the others
  keeps its inner distances, which the Gram below loses (issue 14);
- at any finite magnitude: a block whose finite values exceed ``2^57`` or whose non-zero values fall below
  ``2^-39`` is multiplied by a power of two (exact) so that no square overflows and every non-zero
  difference squares to a normal float32, the block's sums divided back in float64; a block whose finite
  magnitudes span more than ``2^95`` (a huge row beside ordinary ones) is computed in float64 instead, which
  holds every float32 difference and square exactly enough; a finite row is never taken for a non-finite
  one;
- bitwise-equal rows give bitwise-equal distances (the same operations in the same order), so clones tie
  exactly and ties go to the lowest index;
- the cost: ``n (n - 1) / 2`` pairs x 2 vector operations per 16 columns. Measured at n = 20, d = 1e7 on 2
  cores (AVX-512): about 60 ms with both threads, 70 ms on one, against 34-46 ms for the floor
  ``tf.reduce_mean``; the pair loops run near the cores' peak, the memory reads overlap them. A block in
  float64 costs about twice as much.

The remaining limit: distances whose relative difference is below about ``1e-6`` may be ordered differently
from an exact computation.

**Elsewhere (a GPU, float64 rows): the centred Gram.** Computing from the differences costs ``n (n - 1) / 2``
passes over the data in TensorFlow; the Gram shortcut ``||x||^2 + ||y||^2 - 2 <x, y>`` costs one matrix
product, but in float32 it cancels catastrophically when the rows are close together compared with their norm
(the NOTES measured 160% relative error for honest rows = shared gradient + 1e-3 noise). So:

1. **Centring.** Every row is centred on a robust reference ``c`` before the products: ``y_i = x_i - c``,
   ``D[i, j] = G_ii + G_jj - 2 G_ij`` with ``G = Y Y^T``. Distances are translation invariant, only the
   rounding changes: about ``eps * (||y_i||^2 + ||y_j||^2)`` instead of ``eps * (||x_i||^2 + ||x_j||^2)``.
   The reference (:func:`robust_centre`) is the coordinate-wise median of the first ``ref_rows`` rows with
   non-finite values read as 0; the rules take ``ref_rows = 2f + 1``: at most ``f`` of those rows are
   Byzantine, so per coordinate the median lies within the range of the honest values, and ``||y_i||`` is
   of the order of the honest spread whatever the Byzantine rows hold (the median of 9 rows costs a third
   of the median of 20, and precision needs nothing more).
2. **One read of the data.** The columns are processed in blocks of ``B`` (:data:`BLOCK_BYTES` of input,
   65536 columns for 20 float32 rows), by :data:`LOOPS` independent ``tf.while_loop`` s over consecutive
   ranges of blocks. Per block: an XLA call computes the centre of the block (a min/max network over the
   ``2f + 1`` rows, fused), a second XLA call writes the centred block **transposed**, ``(B, n)``, into the
   cache, and TensorFlow's matmul (oneDNN/Eigen) computes ``Y_b^T``-major ``matmul(yt, yt, transpose_a=True)``
   (about twice as fast as the ``transpose_b`` form for these thin blocks, and five times XLA's own dot on
   CPU); the block Grams are summed in float64. The data is read from memory once. (A single XLA call per
   block would re-evaluate the median network for every row it subtracts it from: XLA duplicates a fused
   producer per consumer element. ``tf.slice`` with a tensor ``begin`` would make XLA recompile per block:
   blocks and rows are taken by scalar-index ``tf.gather``, which XLA turns into a fused dynamic slice.)
3. **Non-finite rows.** A NaN or infinity in row ``i`` makes ``G_ii`` non-finite; such a row is at distance
   ``+inf`` from every row, itself included (``D[i, i] = +inf``), and every other row is at distance 0 from
   itself. (A row whose squared norm around the centre overflows the dtype counts as non-finite too.)
   Negative rounding residues are clamped to 0; rows closer than the Gram's own rounding (e.g. identical
   rows, Byzantine clones) are made exact duplicates (:func:`distances_from_gram`), so that their scores
   tie exactly and ties go to the lowest index as documented.
4. **precise=True** computes the block products in float64 (float32 values and their products are exact
   in float64), for the rules that iterate on distances to points inside the hull of the rows (geometric
   median, centered clipping), where a float32 Gram loses the distance as the iterate approaches a row.
   It costs about five times the float32 product.

The Gram path's limits: rows closer to each other than about ``1e-7`` of their distance from the robust
centre (a tight cluster far from the honest rows) are not told apart (they become exact duplicates); the
squared norms of float32 rows beyond about ``1e19`` overflow the float32 products (only ``diag_only`` rescales).

The rules run these helpers in a ``tf.function`` *without* XLA (their ``jit_compile = False``): the blocks'
elementwise work is XLA-compiled through nested ``tf.function(jit_compile=True)`` calls, the products and
the row-norm reductions are not (XLA's CPU reductions and dots are several times slower). Inside an XLA
cluster everything still works, only slower.

Weighted sums of rows (the aggregate of every selection rule) never use a gather or ``tf.stack`` of the
data, nor a matmul where ``0 * NaN = NaN`` would leak an unselected non-finite row: :func:`mean_of_rows`
adds ``m`` rows picked by index (fused dynamic slices, reading only those rows),
:func:`~aggregathor.gars._scaling.weighted_sum` and :func:`~aggregathor.gars._scaling.centred_combination` add all
rows with a weight, skipping the rows of weight 0, :func:`mix_rows`
is one ``(n', n) @ (n, d)`` matmul with non-finite rows zeroed first when there are any.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow as tf

from aggregathor.gars import _scaling, _sortnet

try:  # the compiled kernel (cython_src/_pairdist.pyx); without it every device takes the TensorFlow path
    from aggregathor.gars import _pairdist
except ImportError:  # pragma: no cover - a source checkout that was not built
    _pairdist = None

__all__ = [
    "BLOCK_BYTES",
    "KERNEL_BLOCK",
    "kernel_available",
    "kernel_distances",
    "block_columns",
    "centred_gram",
    "coordinate_median",
    "distances_from_gram",
    "first_argmin",
    "KrumDistances",
    "krum_scores",
    "mean_of_rows",
    "pairwise_sq_distances",
    "robust_centre",
    "mix_rows",
    "row_norms",
    "take_row",
]

#: Target size in bytes of one ``(n, B)`` column block of the input: 65536 columns of 20 float32 rows.
#: Measured at n = 20, d = 1e7 on 2 cores: 16384 columns 210 ms, 32768 186 ms, 65536 172 ms, 131072 about
#: the same as 65536 with more variance, 262144 and more columns slower.
BLOCK_BYTES = 5 * 2**20

#: Loop iterations the executor may overlap (the next block's XLA pass with this block's product).
PARALLEL_ITERATIONS = 2
#: Independent block loops run side by side (about one per core of the machines this was tuned on).
LOOPS = 2

_INF = float("inf")


def block_columns(n: int, d: int, itemsize: int = 4) -> int:
    """The number of columns per block for an ``(n, d)`` input: about :data:`BLOCK_BYTES`, a multiple of 512."""
    b = max(512, (BLOCK_BYTES // max(1, n * itemsize)) // 512 * 512)
    return min(d, b)


# --------------------------------------------------------------------------------- the compiled kernel
#: Columns per block of the compiled kernel: 20 rows x 4096 float32 (320 KiB) stay in L2 while every pair is
#: computed, and the next block is prefetched meanwhile. Measured at n = 20, d = 1e7 on 2 cores, one thread:
#: 1024 columns 98 ms, 2048 80 ms, 4096 70 ms, 8192 70 ms, 16384 74 ms.
KERNEL_BLOCK = 4096
#: The column range is cut into this many parts (fewer when d has fewer blocks), which the threads take one at
#: a time: under contention a slowed thread takes fewer parts, instead of the call waiting for its half.
KERNEL_PARTS = 16
#: ``None``: use the kernel for float32 inputs when TensorFlow sees no GPU; ``True``/``False``: always/never.
#: Read when a rule is traced.
USE_KERNEL: bool | None = None

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
#: What the last :func:`kernel_distances` call did: ``threads``, ``parts``, ``block`` (columns), ``blocks_float32``
#: and ``blocks_float64`` (blocks that took each path), ``scan_seconds`` (reading the blocks from memory, range
#: checks, copies) and ``pairs_seconds`` (the pair loops), measured in C, summed over the parts and divided by
#: the threads (the time per thread).
LAST_KERNEL_STATS: dict[str, Any] = {}


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: start a new pool there when needed."""
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def kernel_available(dtype: tf.DType = tf.float32) -> bool:
    """Whether :func:`pairwise_sq_distances` takes the compiled kernel for inputs of ``dtype`` here."""
    if _pairdist is None or tf.as_dtype(dtype) != tf.float32:
        return False
    if USE_KERNEL is not None:
        return bool(USE_KERNEL)
    return not tf.config.list_logical_devices("GPU")


def _kernel_input(x: np.ndarray) -> np.ndarray:
    if _pairdist is None:
        raise RuntimeError("the compiled kernel aggregathor.gars._pairdist is missing: rebuild with "
                           "`pip install -e . --no-build-isolation`")
    return np.ascontiguousarray(x, dtype=np.float32)


def _in_parallel(parts: int, fn: Callable[[int], Any], threads: int) -> None:
    """``fn(0) .. fn(parts - 1)`` on ``threads`` threads (this one and a pool; the kernels release the GIL),
    each thread taking the next part as it finishes one: a thread slowed by another process does less."""
    global _POOL, _POOL_SIZE
    threads = max(1, min(threads, parts))
    todo = itertools.count()  # next() on a count is atomic under the GIL

    def worker() -> None:
        for t in todo:
            if t >= parts:
                return
            fn(t)

    if threads > 1:
        if _POOL is None or _POOL_SIZE < threads - 1:
            _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="aggregathor-kernel")
            _POOL_SIZE = threads - 1
        futures = [_POOL.submit(worker) for _ in range(threads - 1)]
        worker()
        for fut in futures:
            fut.result()
    else:
        worker()


def kernel_distances(x: np.ndarray, *, block: int | None = None, precise: bool = False,
                     threads: int | None = None) -> np.ndarray:
    """The ``(n, n)`` float64 squared distances of the rows of a float32 ``(n, d)`` array, by the compiled kernel.

    ``D[i, j] = sum_k (x[i, k] - x[j, k])^2``, from the differences (no Gram, no centre, no cancellation), in one
    blocked pass over the columns split between ``threads`` (default: the CPUs this process may use), each
    block's lanes summed in float64. Each block is scaled by a power of two when its magnitudes need it, or
    computed in float64 when they span more than 2^95 (see ``cython_src/ag_pairdist.h``); ``precise`` computes
    every block in float64. A row holding a NaN or an infinity is at ``+inf`` from every row, itself included;
    a finite row is at 0 from itself. Bitwise-equal rows get distance 0 and bitwise-equal distances to every
    other row (the same operations in the same order), so their Krum scores tie exactly.
    """
    x = _kernel_input(x)
    n, d = x.shape
    width = max(1, min(int(block) if block else KERNEL_BLOCK, _pairdist.MAX_WIDTH))
    blocks = -(-d // width)
    # a fixed split (it does not depend on the threads, so neither does the result), taken dynamically
    parts = max(1, min(KERNEL_PARTS, blocks))
    bounds = [blocks * t // parts * width for t in range(parts)] + [d]
    accs = np.zeros((parts, n, n))
    bads = np.zeros((parts, n), np.uint8)
    stats: list[tuple[int, int, float, float]] = [(0, 0, 0.0, 0.0)] * parts

    def part(t: int) -> None:
        stats[t] = _pairdist.accumulate(x, bounds[t], bounds[t + 1], width, bool(precise), accs[t], bads[t])

    _in_parallel(parts, part, int(threads) if threads else _cpu_threads())
    used = max(1, min(parts, int(threads) if threads else _cpu_threads()))
    LAST_KERNEL_STATS.update(threads=used, parts=parts, block=width, blocks_float32=sum(s[0] for s in stats),
                             blocks_float64=sum(s[1] for s in stats),
                             scan_seconds=sum(s[2] for s in stats) / used,
                             pairs_seconds=sum(s[3] for s in stats) / used)
    acc = accs[0] if parts == 1 else np.sum(accs, axis=0)  # a fixed order: deterministic for a given split
    dist = np.triu(acc, 1)
    dist = dist + dist.T
    bad = np.any(bads, axis=0)
    dist[bad, :] = np.inf
    dist[:, bad] = np.inf
    np.fill_diagonal(dist, np.where(bad, np.inf, 0.0))
    return dist


def _kernel_op(x: tf.Tensor, block: int | None, precise: bool) -> tf.Tensor:
    n = int(x.shape[0])

    def fn(a: np.ndarray) -> np.ndarray:
        return kernel_distances(a, block=block, precise=precise)

    with tf.device("CPU:0"):
        dist = tf.numpy_function(fn, [x], tf.float64, stateful=False, name="pairwise_sq_distances")
    dist.set_shape([n, n])
    return dist


# ------------------------------------------------------------------------------------------- XLA pieces
def _column_block(x: tf.Tensor, k: tf.Tensor, width: int, rows: int | None = None) -> tf.Tensor:
    """Columns ``k*width .. (k+1)*width - 1`` of the first ``rows`` rows, as ``(rows, width)``.

    Written as a reshape to ``(n, d // width, width)`` and a scalar-index gather on the middle axis, which XLA
    turns into a dynamic slice fused into its consumer. (``tf.slice`` with a tensor ``begin`` would make XLA
    treat ``begin`` as a compile-time constant and recompile for every block.)
    """
    n = int(x.shape[0]) if rows is None else rows
    blocks = int(x.shape[1]) // width
    cube = tf.reshape(x[:n, : blocks * width], [n, blocks, width])
    return tf.gather(cube, k, axis=1)


def robust_centre(rows: list[tf.Tensor]) -> tf.Tensor:
    """Per coordinate, the median of the rows with every non-finite value replaced by 0.

    With at most ``f`` of ``2f + 1`` rows Byzantine (or non-finite), the result lies within the range of the
    honest values of each coordinate, which is all the centring needs. Cheaper than
    :func:`~aggregathor.gars._sortnet.nan_median` (no balancing of the non-finite values): one select per
    value and a pruned min/max network from :func:`~aggregathor.gars._sortnet.plan` (34 ``min``/``max`` for
    9 rows), which XLA fuses into one loop.
    """
    m = len(rows)
    regs = [tf.where(tf.math.is_finite(r), r, tf.zeros_like(r)) for r in rows]
    lo, hi = _sortnet.median_ranks(m)
    net = _sortnet.plan(m, (lo, hi))
    for a, b, need_min, need_max in net.comparators:
        u, v = regs[a], regs[b]
        if need_min:
            regs[a] = tf.minimum(u, v)
        if need_max:
            regs[b] = tf.maximum(u, v)
    low, high = regs[net.outputs[lo]], regs[net.outputs[hi]]
    return low if lo == hi else 0.5 * low + 0.5 * high


@functools.cache
def _median_block(rows: int, width: int) -> Callable[..., tf.Tensor]:
    """XLA: :func:`robust_centre` of the first ``rows`` rows over column block ``k``."""

    def fn(x: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
        block = _column_block(x, k, width, rows)
        return robust_centre([block[i] for i in range(rows)])

    return tf.function(fn, jit_compile=True, autograph=False)


@functools.cache
def _centred_block(width: int, precise: bool) -> Callable[..., tf.Tensor]:
    """XLA: column block ``k`` of ``x`` minus the centre block ``c``, **transposed**: ``(width, n)``.

    The transposed block makes the product ``matmul(yt, yt, transpose_a=True)``, which TensorFlow's CPU
    matmul runs about twice as fast as ``matmul(y, y, transpose_b=True)`` for these tall, thin blocks.
    In float64 when ``precise``.
    """

    def fn(x: tf.Tensor, k: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        block = _column_block(x, k, width)
        if precise:
            block, c = tf.cast(block, tf.float64), tf.cast(c, tf.float64)
        return tf.transpose(block - c)

    return tf.function(fn, jit_compile=True, autograph=False)


def _block_gram(yt: tf.Tensor, diag_only: bool) -> tf.Tensor:
    if diag_only:  # squared column norms of the (B, n) block, overflow-safe, summed in float64
        return tf.square(row_norms(yt, axis=0))
    return tf.cast(tf.matmul(yt, yt, transpose_a=True), tf.float64)


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

    ``c`` is ``centre`` (a ``(d,)`` tensor) when given, else :func:`robust_centre` of the first ``ref_rows``
    rows (all rows by default; the rules pass ``2f + 1``). ``precise`` computes the products in float64.
    ``block`` overrides the number of columns per block (:func:`block_columns`). Non-finite rows give a
    non-finite ``G_ii``. ``diag_only`` needs no product: TensorFlow's norm reduction per block (exact enough
    in the input dtype, no cancellation; overflow-safe), whatever ``precise``.
    """
    x = tf.convert_to_tensor(x)
    n, d = int(x.shape[0]), int(x.shape[1])
    r = n if ref_rows is None else max(1, min(n, int(ref_rows)))
    width = int(block) if block else block_columns(n, d, x.dtype.size)
    width = max(1, min(width, d))
    full, tail = divmod(d, width)
    if centre is not None:
        centre = tf.convert_to_tensor(centre, dtype=x.dtype)

    def one(xs: tf.Tensor, k: tf.Tensor, w: int, offset: int) -> tf.Tensor:
        if centre is None:
            c = _median_block(r, w)(xs, k)
        else:
            c = tf.slice(centre, tf.reshape(offset + k * w, [1]), [w])
        return _block_gram(_centred_block(w, precise and not diag_only)(xs, k, c), diag_only)

    shape = [n] if diag_only else [n, n]
    gram = tf.zeros(shape, tf.float64)
    if full == 1:
        gram = one(x, tf.constant(0, tf.int32), width, 0)
    elif full > 1:
        # LOOPS independent loops over consecutive ranges of blocks: the executor runs them side by side
        # (each block's XLA pass and product are mostly single-threaded at this size)
        loops = max(1, min(LOOPS, full))
        bounds = [full * p // loops for p in range(loops + 1)]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):

            def body(k: tf.Tensor, acc: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                return k + 1, acc + one(x, k, width, 0)

            parts.append(
                tf.while_loop(
                    lambda k, acc, hi=hi: k < hi,
                    body,
                    (tf.constant(lo, tf.int32), gram),
                    parallel_iterations=PARALLEL_ITERATIONS,
                )[1]
            )
        gram = tf.add_n(parts)
    if tail:
        gram = gram + one(x[:, full * width :], tf.constant(0, tf.int32), tail, full * width)
    return gram


def distances_from_gram(gram: tf.Tensor, eps: float = 2.0**-23) -> tuple[tf.Tensor, tf.Tensor]:
    """``(D, ok)``: squared distances ``(n, n)`` (float64) from a centred Gram, and the finite-row mask ``(n,)``.

    ``D[i, j] = max(G_ii + G_jj - 2 G_ij, 0)``; ``+inf`` when row i or row j is non-finite (``G_ii`` not
    finite) or the result is not a number; ``D[i, i]`` is 0 for a finite row, ``+inf`` for a non-finite one.

    Duplicates: ``eps`` is the rounding unit of the products (float32 by default). Rows whose distance is
    below ``8 eps (G_ii + G_jj)`` -- under the rounding error of the Gram itself, e.g. identical rows, whose
    three dot products a matmul may round differently -- are made exact duplicates: every such row takes
    the Gram row and column of the lowest-index row it is that close to, so identical rows get distance 0
    and bitwise-equal distances to every other row (hence equal Krum scores, and ties broken by index).
    """
    g = tf.linalg.diag_part(gram)
    ok = tf.math.is_finite(g)
    n = int(gram.shape[0])
    both = tf.logical_and(ok[:, None], ok[None, :])
    raw = g[:, None] + g[None, :] - 2.0 * gram
    close = tf.logical_and(both, raw <= 8.0 * eps * (g[:, None] + g[None, :]))
    close = tf.logical_or(close, tf.eye(n, dtype=tf.bool))
    rep = tf.argmax(tf.cast(close, tf.int32), axis=1, output_type=tf.int32)  # the first (lowest) close index
    gram = tf.gather(tf.gather(gram, rep, axis=0), rep, axis=1)
    g = tf.linalg.diag_part(gram)
    raw = g[:, None] + g[None, :] - 2.0 * gram
    good = tf.logical_and(both, tf.logical_not(tf.math.is_nan(raw)))
    inf = tf.constant(_INF, tf.float64)
    dist = tf.where(good, tf.maximum(raw, 0.0), inf)
    dist = tf.linalg.set_diag(dist, tf.where(ok, tf.zeros_like(g), inf))
    return dist, ok


def pairwise_sq_distances(x: tf.Tensor, **kwargs: Any) -> tf.Tensor:
    """The ``(n, n)`` float64 matrix of squared distances between the rows of ``x`` (see the module notes).

    Where :func:`kernel_available` (float32 rows, no GPU), the compiled kernel (:func:`kernel_distances`, which
    takes ``block`` and ``precise`` and needs no centre); else the centred Gram of :func:`centred_gram`, to
    which the keyword arguments go (``ref_rows``, ``centre``, ``precise``, ``block``).
    """
    x = tf.convert_to_tensor(x)
    if kernel_available(x.dtype):
        return _kernel_op(x, kwargs.get("block"), bool(kwargs.get("precise", False)))
    precise = bool(kwargs.get("precise", False))
    eps = float(np.finfo(np.float64 if precise else x.dtype.as_numpy_dtype).eps) / 2.0
    return distances_from_gram(centred_gram(x, **kwargs), eps)[0]


class KrumDistances:
    """Phase 1 of the distance-based rules (Krum, Multi-Krum, Bulyan), as a method they share: the ``(n, n)``
    float64 squared distances between the rows, ``+inf`` to and from non-finite rows; the centre, where the Gram
    needs one, is the coordinate-wise median of the first ``2f + 1`` rows (at most ``f`` of them Byzantine)."""

    f: int

    def distances(self, x: tf.Tensor) -> tf.Tensor:
        return pairwise_sq_distances(x, ref_rows=2 * self.f + 1)


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
        smallest = -tf.math.top_k(-others, k=k, sorted=True).values  # sorted: same sum order for equal rows
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
    """Row ``i`` of ``x`` (``i`` a scalar tensor) as a ``(d,)`` tensor.

    A scalar-index gather: XLA makes it a dynamic slice fused into the consumer (it reads the row, copies
    nothing), without recompiling for each index value as a ``tf.slice`` with a tensor ``begin`` would.
    """
    return tf.gather(x, tf.cast(i, tf.int32), axis=0)


@functools.cache
def _mean_of_rows_fn(scaled: bool) -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, index: tf.Tensor, count: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        def row(i: tf.Tensor) -> tf.Tensor:
            return take_row(x, i) * scale if scaled else take_row(x, i)

        total = row(index[0])
        for k in range(1, int(index.shape[0])):
            total = total + row(index[k])
        return total / count / scale if scaled else total / count

    return tf.function(fn, jit_compile=True, autograph=False)


def mean_of_rows(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """``(1/m) sum_k x[index[k]]`` for a static-length ``(m,)`` index: one fused XLA pass over those m rows.

    The rows are added in the order of ``index``, then divided by m (a true division: m reaches XLA as an
    argument, so that it is not turned into a multiplication by a rounded reciprocal). Measured at n = 20,
    d = 1e7, m = 14 on 2 cores: 20 ms against 34 ms for the floor (a mean of all 20 rows); a compiled loop over
    the same rows took 51 ms, most of it writing a fresh output buffer.

    When the result is not finite (the sum of huge rows overflowed, or a selected row is not finite), a second
    pass reruns it on the rows multiplied by :func:`~aggregathor.gars._scaling.sum_scale` ``(m)`` (an exact
    power of two, so that no partial sum exceeds the largest row) and divides the result back: finite at any
    finite magnitude; on that path, values below about ``2^-120`` in magnitude may be flushed to 0.
    """
    m = int(index.shape[0])
    index = tf.cast(index, tf.int32)
    count = tf.constant(m, x.dtype)
    scale = tf.constant(_scaling.sum_scale(m), x.dtype)
    out = _mean_of_rows_fn(False)(x, index, count, scale)
    return _scaling.finite_or(out, lambda: _mean_of_rows_fn(True)(x, index, count, scale))


@functools.cache
def _median_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor) -> tf.Tensor:
        return _sortnet.finite_or(_sortnet.nan_median(x), 0.0)

    return tf.function(fn, jit_compile=True, autograph=False)


def coordinate_median(x: tf.Tensor) -> tf.Tensor:
    """The coordinate-wise median of the finite values of the rows, 0 where none is finite (one XLA pass)."""
    return _median_fn()(x)


def row_norms(x: tf.Tensor, axis: int = 1) -> tf.Tensor:
    """``||x_i||`` per row (``axis=1``; per column with ``axis=0``), float64: NaN for a row holding a NaN,
    ``+inf`` for a row holding an infinity.

    TensorFlow's own Euclidean-norm reduction (one pass, about the cost of a mean; an XLA row reduction is
    several times slower on CPU). Rows whose float32 sum of squares overflows (finite values beyond about
    1e19) are recomputed on rows scaled by ``2**-80`` (a second pass, only when it happens).
    """
    norm = tf.math.reduce_euclidean_norm(x, axis=axis)
    if x.dtype == tf.float64:
        return norm
    scale = 2.0**-80

    def rescaled() -> tf.Tensor:
        small = tf.math.reduce_euclidean_norm(x * tf.constant(scale, x.dtype), axis=axis)
        return tf.where(tf.math.is_inf(norm), tf.cast(small, tf.float64) / scale, tf.cast(norm, tf.float64))

    return tf.cond(tf.reduce_any(tf.math.is_inf(norm)), rescaled, lambda: tf.cast(norm, tf.float64))


@functools.cache
def _zero_bad_rows_fn() -> Callable[..., tf.Tensor]:
    def fn(x: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
        return tf.where(ok[:, None], x, tf.zeros_like(x))

    return tf.function(fn, jit_compile=True, autograph=False)


def mix_rows(x: tf.Tensor, w: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
    """``w @ x`` (``(n', n) @ (n, d)``, one matmul) where the rows with ``ok[j]`` false never leak in.

    ``0 * NaN = NaN``: when some row is not finite, the product runs on a copy with those rows zeroed
    (a ``tf.cond``: the copy is only made when it is needed). Put NaN in a row of ``w`` to get a NaN row.
    """
    w = tf.cast(w, x.dtype)
    return tf.cond(
        tf.reduce_all(ok),
        lambda: tf.matmul(w, x),
        lambda: tf.matmul(w, _zero_bad_rows_fn()(x, ok)),
    )
