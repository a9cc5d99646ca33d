# cython: language_level=3
"""Pairwise squared distances of float32 rows from their differences, without the GIL (C code: ag_pairdist.h).

:func:`accumulate` adds the distances over a range of columns into an ``(n, n)`` float64 accumulator (upper
triangle) and flags the rows that hold a NaN or an infinity there. :mod:`aggregathor.gars._distances` splits
the columns between threads and finishes the matrix.
"""

from libc.stdint cimport uint32_t


cdef extern from "ag_pairdist.h" nogil:
    ctypedef struct ag_work:
        long n, np4, width
    ctypedef struct ag_stats:
        long blocks_f32, blocks_f64
        double scan_s, pairs_s
    int ag_work_init(ag_work *w, long n, long width)
    void ag_work_free(ag_work *w)
    void ag_pairdist_range(const float *x, long ld, long c0, long c1, int force64, ag_work *w, double *acc,
                           unsigned char *bad, ag_stats *st)


#: The largest column block accepted (a lane of the float32 path sums at most width / 16 squares < 2^116).
MAX_WIDTH = 16384


def accumulate(const float[:, ::1] x, long c0, long c1, long width, bint force64, double[:, ::1] acc,
               unsigned char[::1] bad):
    """Add ``sum_k (x[i, k] - x[j, k])^2`` over columns ``c0 <= k < c1`` to ``acc[i, j]`` for every ``i < j``.

    ``bad[i]`` is set to 1 when row ``i`` holds a NaN or an infinity in those columns (its entries of ``acc``
    are then meaningless). ``width`` is the column block (1 .. :data:`MAX_WIDTH`); ``force64`` computes every
    block in float64. Returns ``(float32 blocks, float64 blocks, scan seconds, pair seconds)``: the blocks that
    took each path, the time spent reading the blocks (range checks, copies) and in the pair loops, measured
    with ``CLOCK_MONOTONIC`` around each block's two steps. Releases the GIL.
    """
    cdef long n = x.shape[0], d = x.shape[1]
    if acc.shape[0] != n or acc.shape[1] != n or bad.shape[0] != n:
        raise ValueError(f"accumulate: acc must be ({n}, {n}) and bad ({n},), got ({acc.shape[0]}, {acc.shape[1]}) and "
                         f"{bad.shape[0]}")
    if not 0 <= c0 <= c1 <= d:
        raise ValueError(f"accumulate: need 0 <= c0 <= c1 <= d = {d}, got c0={c0}, c1={c1}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"accumulate: width must be in 1 .. {MAX_WIDTH}, got {width}")
    cdef ag_work w
    cdef ag_stats st
    st.blocks_f32 = 0
    st.blocks_f64 = 0
    st.scan_s = 0.0
    st.pairs_s = 0.0
    if n == 0 or c0 == c1:
        return (0, 0, 0.0, 0.0)
    if ag_work_init(&w, n, width) != 0:
        raise MemoryError("accumulate: no memory for the column block buffers")
    with nogil:
        ag_pairdist_range(&x[0, 0], d, c0, c1, force64, &w, &acc[0, 0], &bad[0], &st)
    ag_work_free(&w)
    return (st.blocks_f32, st.blocks_f64, st.scan_s, st.pairs_s)

