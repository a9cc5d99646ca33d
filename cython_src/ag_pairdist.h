/* Pairwise squared Euclidean distances between the rows of a float32 matrix, from the differences, in one
 * blocked pass over the columns. Used by aggregathor.gars._pairdist (see its docstring for the numerics).
 *
 * For each block of at most W columns:
 *   1. a pre-pass reads each row's block once (from memory, or from L2 where the previous block's pair loop
 *      prefetched it) and takes, per row, the largest and the smallest non-zero magnitude as integer bit
 *      patterns (a row whose largest pattern is >= that of +inf holds a NaN or an infinity: it is flagged and
 *      ignored by the scaling);
 *   2. float32 path, when the block's finite magnitudes span at most 2^95: if they exceed 2^57 or fall below
 *      2^-39, the block is copied, multiplied by a power of two s (exact), into a cache-resident buffer, so
 *      that every non-zero difference of two values squares to a normal float32 and no lane's sum of squares
 *      can overflow; otherwise the pair loop reads the block in place (s = 1; a last block whose width is
 *      not a multiple of 16 is copied and padded with zeros). Float64 path otherwise (or when forced): the block is converted into
 *      a float64 buffer;
 *   3. the pair loop: for 4 x 4 tiles of rows, per column, t = a - b, acc += t * t in vectors of 16 float32 (or
 *      8 float64), while the next block's rows are prefetched into L2; at the end of the block the lanes are
 *      summed in float64, divided by s^2 (exact) and added to the pair's total.
 * No Gram, no cancellation: each distance is a sum of non-negative terms, exact to a few float32 roundings
 * relative to itself, whatever the magnitude of the rows or their distance from each other.
 */
#ifndef AG_PAIRDIST_H
#define AG_PAIRDIST_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef float ag_vf __attribute__((vector_size(64)));
typedef float ag_vf8 __attribute__((vector_size(32)));
typedef double ag_vd __attribute__((vector_size(64)));
typedef uint32_t ag_u32a __attribute__((may_alias));

#define AG_LANES_F 16
#define AG_LANES_D 8
#define AG_TILE 4
/* the largest binary exponent a scaled value may reach: |t| < 2^58, t^2 < 2^116, a lane's block sum < 2^127 */
#define AG_TOP_EXP 57
/* the most a block's finite magnitudes may span (in binary orders) for the float32 path */
#define AG_MAX_SPAN 95

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define AG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AG_CLONES
#endif
#define AG_INLINE static inline __attribute__((always_inline))

AG_INLINE double ag_hsum_f(ag_vf v) {
    ag_vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    ag_vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    ag_vd h = __builtin_convertvector(lo, ag_vd) + __builtin_convertvector(hi, ag_vd);
    return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

AG_INLINE double ag_hsum_d(ag_vd h) {
    return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

/* Prefetch (into L2) the rows of the next block assigned to this tile: one 64-byte line per row per step. */
#define AG_PREFETCH(K, ELEM)                                                                                 \
    for (int q = 0; q < npf; q++) __builtin_prefetch((const char *)pf[q] + (K) * (ELEM), 0, 2);

/* one tile: rows a[0..3] against rows b[0..3] (16 pairs, out[4 p + q] for pair (a_p, b_q)) */
#define AG_TILE44(NAME, T, V, LANES, HSUM)                                                                   \
    AG_INLINE void NAME(const T *const *a, const T *const *b, long wp, double *out, const void *const *pf,    \
                        int npf) {                                                                           \
        V s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};              \
        V s20 = {0}, s21 = {0}, s22 = {0}, s23 = {0}, s30 = {0}, s31 = {0}, s32 = {0}, s33 = {0};              \
        const T *ra0 = a[0], *ra1 = a[1], *ra2 = a[2], *ra3 = a[3];                                            \
        const T *rb0 = b[0], *rb1 = b[1], *rb2 = b[2], *rb3 = b[3];                                            \
        for (long k = 0; k < wp; k += LANES) {                                                                 \
            AG_PREFETCH(k, 4)                                                                         \
            V a0, a1, a2, a3, b0, b1, b2, b3;                                                                  \
            memcpy(&a0, ra0 + k, sizeof(V)); memcpy(&a1, ra1 + k, sizeof(V));                                  \
            memcpy(&a2, ra2 + k, sizeof(V)); memcpy(&a3, ra3 + k, sizeof(V));                                  \
            memcpy(&b0, rb0 + k, sizeof(V)); memcpy(&b1, rb1 + k, sizeof(V));                                  \
            memcpy(&b2, rb2 + k, sizeof(V)); memcpy(&b3, rb3 + k, sizeof(V));                                  \
            V t;                                                                                               \
            t = a0 - b0; s00 += t * t; t = a0 - b1; s01 += t * t; t = a0 - b2; s02 += t * t;                   \
            t = a0 - b3; s03 += t * t; t = a1 - b0; s10 += t * t; t = a1 - b1; s11 += t * t;                   \
            t = a1 - b2; s12 += t * t; t = a1 - b3; s13 += t * t; t = a2 - b0; s20 += t * t;                   \
            t = a2 - b1; s21 += t * t; t = a2 - b2; s22 += t * t; t = a2 - b3; s23 += t * t;                   \
            t = a3 - b0; s30 += t * t; t = a3 - b1; s31 += t * t; t = a3 - b2; s32 += t * t;                   \
            t = a3 - b3; s33 += t * t;                                                                         \
        }                                                                                                      \
        out[0] = HSUM(s00); out[1] = HSUM(s01); out[2] = HSUM(s02); out[3] = HSUM(s03);                        \
        out[4] = HSUM(s10); out[5] = HSUM(s11); out[6] = HSUM(s12); out[7] = HSUM(s13);                        \
        out[8] = HSUM(s20); out[9] = HSUM(s21); out[10] = HSUM(s22); out[11] = HSUM(s23);                      \
        out[12] = HSUM(s30); out[13] = HSUM(s31); out[14] = HSUM(s32); out[15] = HSUM(s33);                    \
    }

/* the 6 pairs inside one group of 4 rows: out[0..5] = (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) */
#define AG_TILE4(NAME, T, V, LANES, HSUM)                                                                    \
    AG_INLINE void NAME(const T *const *a, long wp, double *out, const void *const *pf, int npf) {           \
        V s01 = {0}, s02 = {0}, s03 = {0}, s12 = {0}, s13 = {0}, s23 = {0};                                    \
        const T *ra0 = a[0], *ra1 = a[1], *ra2 = a[2], *ra3 = a[3];                                            \
        for (long k = 0; k < wp; k += LANES) {                                                                 \
            AG_PREFETCH(k, 4)                                                                         \
            V a0, a1, a2, a3;                                                                                  \
            memcpy(&a0, ra0 + k, sizeof(V)); memcpy(&a1, ra1 + k, sizeof(V));                                  \
            memcpy(&a2, ra2 + k, sizeof(V)); memcpy(&a3, ra3 + k, sizeof(V));                                  \
            V t;                                                                                               \
            t = a0 - a1; s01 += t * t; t = a0 - a2; s02 += t * t; t = a0 - a3; s03 += t * t;                   \
            t = a1 - a2; s12 += t * t; t = a1 - a3; s13 += t * t; t = a2 - a3; s23 += t * t;                   \
        }                                                                                                      \
        out[0] = HSUM(s01); out[1] = HSUM(s02); out[2] = HSUM(s03);                                            \
        out[3] = HSUM(s12); out[4] = HSUM(s13); out[5] = HSUM(s23);                                            \
    }

AG_TILE44(ag_tile44_f, float, ag_vf, AG_LANES_F, ag_hsum_f)
AG_TILE44(ag_tile44_d, double, ag_vd, AG_LANES_D, ag_hsum_d)
AG_TILE4(ag_tile4_f, float, ag_vf, AG_LANES_F, ag_hsum_f)
AG_TILE4(ag_tile4_d, double, ag_vd, AG_LANES_D, ag_hsum_d)

/* All pairs of the np4 (a multiple of 4) rows rp[]; acc[i * n + j] += scale * sum, for i < j < n. The rows of
 * the next block (next[0..n-1], nlines 64-byte lines each, or none) are prefetched, spread over the tiles. */
#define AG_PAIRS(NAME, T, TILE44, TILE4, LANES)                                                              \
    AG_INLINE void NAME(const T *const *rp, long n, long np4, long wp, double scale, double *acc,             \
                        const float *const *next, long nlines) {                                             \
        double out[16];                                                                                        \
        static const int pi[6] = {0, 0, 0, 1, 1, 2}, pj[6] = {1, 2, 3, 2, 3, 3};                              \
        const long groups = np4 / AG_TILE, tiles = groups * (groups + 1) / 2;                                  \
        const long steps = wp / LANES;                                                                         \
        const void *pf[64];                                                                                    \
        long tile = 0, row = 0;                                                                                \
        for (long ga = 0; ga < np4; ga += AG_TILE) {                                                           \
            for (long gb = ga; gb < np4; gb += AG_TILE, tile++) {                                              \
                /* this tile's share of the next block's rows (whole rows while steps >= nlines) */            \
                int npf = 0;                                                                                   \
                if (next && steps >= nlines)                                                                   \
                    for (; row < n && row * tiles < (tile + 1) * n && npf < 64; row++) pf[npf++] = next[row];  \
                if (gb == ga) {                                                                                \
                    TILE4(rp + ga, wp, out, pf, npf);                                                          \
                    for (int p = 0; p < 6; p++) {                                                              \
                        long i = ga + pi[p], j = ga + pj[p];                                                   \
                        if (j < n) acc[i * n + j] += scale * out[p];                                           \
                    }                                                                                          \
                } else {                                                                                       \
                    TILE44(rp + ga, rp + gb, wp, out, pf, npf);                                                \
                    for (int p = 0; p < 4; p++)                                                                \
                        for (int q = 0; q < 4; q++)                                                            \
                            if (gb + q < n) acc[(ga + p) * n + gb + q] += scale * out[4 * p + q];              \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

AG_PAIRS(ag_pairs_f, float, ag_tile44_f, ag_tile4_f, AG_LANES_F)
AG_PAIRS(ag_pairs_d, double, ag_tile44_d, ag_tile4_d, AG_LANES_D)

/* Work memory for one thread: (n rounded up to 4) x W floats and as many doubles, 64-byte aligned. */
typedef struct {
    long n, np4, width;
    float *f;
    double *d;
} ag_work;

static int ag_work_init(ag_work *w, long n, long width) {
    w->n = n;
    w->np4 = (n + AG_TILE - 1) / AG_TILE * AG_TILE;
    long rows = w->np4 + 1; /* + one zero row for the padding */
    w->width = (width + AG_LANES_F - 1) / AG_LANES_F * AG_LANES_F;
    size_t fb = (size_t)rows * (size_t)w->width * sizeof(float);
    size_t db = (size_t)rows * (size_t)w->width * sizeof(double);
    w->f = (float *)aligned_alloc(64, fb);
    w->d = (double *)aligned_alloc(64, db);
    if (!w->f || !w->d) {
        free(w->f);
        free(w->d);
        w->f = NULL;
        w->d = NULL;
        return -1;
    }
    memset(w->f, 0, fb);
    memset(w->d, 0, db);
    return 0;
}

static void ag_work_free(ag_work *w) {
    free(w->f);
    free(w->d);
    w->f = NULL;
    w->d = NULL;
}

/* Per row of the block: the largest magnitude pattern (>= 0x7f800000: NaN or infinity) and the smallest
 * non-zero one minus 1 (0xffffffff when the row's block is all zeros). */
AG_INLINE void ag_row_range(const float *src, long w, uint32_t *top, uint32_t *low) {
    const ag_u32a *u = (const ag_u32a *)src;
    uint32_t mx = 0, mn = 0xffffffffu;
    for (long k = 0; k < w; k++) {
        uint32_t b = u[k] & 0x7fffffffu;
        mx = b > mx ? b : mx;
        uint32_t c = b - 1u;
        mn = c < mn ? c : mn;
    }
    *top = mx;
    *low = mn;
}

AG_INLINE float ag_bits_to_float(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* Counters of one call: blocks that took each path; seconds spent scanning (reading each block from memory,
 * range checks, copies) and in the pair loops. */
typedef struct {
    long blocks_f32, blocks_f64;
    double scan_s, pairs_s;
} ag_stats;

static inline double ag_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Distances over columns [c0, c1) of the n rows (row stride ld) of x, added to acc (upper triangle);
 * bad[i] = 1 when row i holds a NaN or an infinity there. force64: every block in float64.
 * A block is read in place when it needs no scaling and its width is a multiple of 16, else copied (scaled)
 * into the work buffer; while one block's pairs are computed, the next block's rows are prefetched. */
AG_CLONES
static void ag_pairdist_range(const float *x, long ld, long c0, long c1, int force64, ag_work *w, double *acc,
                              unsigned char *bad, ag_stats *st) {
    const long n = w->n, np4 = w->np4, width = w->width;
    uint32_t top[n > 0 ? n : 1], low[n > 0 ? n : 1];
    const float *rf[np4 > 0 ? np4 : 1], *next[n > 0 ? n : 1];
    const double *rd[np4 > 0 ? np4 : 1];
    for (long i = n; i < np4; i++) { /* padding rows: the spare zero row */
        rf[i] = w->f + np4 * width;
        rd[i] = w->d + np4 * width;
    }
    for (long k0 = c0; k0 < c1; k0 += width) {
        long cols = c1 - k0 < width ? c1 - k0 : width;
        long wpf = (cols + AG_LANES_F - 1) / AG_LANES_F * AG_LANES_F;
        long k1 = k0 + cols, ncols = c1 - k1 < width ? c1 - k1 : width;
        long nlines = (ncols * 4 + 63) / 64;
        for (long i = 0; i < n; i++) next[i] = x + i * ld + k1;
        double t0 = ag_now();
        uint32_t mtop = 0, mlow = 0xffffffffu;
        for (long i = 0; i < n; i++) {
            ag_row_range(x + i * ld + k0, cols, &top[i], &low[i]);
            if (top[i] >= 0x7f800000u) {
                bad[i] = 1;
                continue;
            }
            mtop = top[i] > mtop ? top[i] : mtop;
            mlow = low[i] < mlow ? low[i] : mlow;
        }
        if (mtop == 0) { /* every finite row is all zeros here: no contribution */
            st->scan_s += ag_now() - t0;
            continue;
        }
        int etop, elow;
        frexpf(ag_bits_to_float(mtop), &etop);
        frexpf(ag_bits_to_float(mlow + 1u), &elow);
        /* every non-zero difference is at least 2^(elow - 25): scaled by 2^se it must square to a normal float
         * (>= 2^-126), and the largest scaled value must stay below 2^AG_TOP_EXP */
        int se = 0;
        if (etop > AG_TOP_EXP || elow - 25 < -63) {
            se = AG_TOP_EXP - etop;
            if (se > 127) se = 127;
        }
        int use32 = !force64 && (elow - 25 + se >= -63) && (etop + se <= AG_TOP_EXP);
        if (use32) {
            if (se == 0 && cols == wpf) {
                for (long i = 0; i < n; i++) rf[i] = x + i * ld + k0;
            } else {
                const float s = ldexpf(1.0f, se);
                for (long i = 0; i < n; i++) {
                    const float *src = x + i * ld + k0;
                    float *dst = w->f + i * width;
                    for (long k = 0; k < cols; k++) dst[k] = src[k] * s;
                    for (long k = cols; k < wpf; k++) dst[k] = 0.0f;
                    rf[i] = dst;
                }
            }
            double t1 = ag_now();
            ag_pairs_f(rf, n, np4, wpf, ldexp(1.0, -2 * se), acc, ncols ? next : NULL, nlines);
            st->blocks_f32++;
            st->scan_s += t1 - t0;
            st->pairs_s += ag_now() - t1;
        } else {
            long wpd = (cols + AG_LANES_D - 1) / AG_LANES_D * AG_LANES_D;
            for (long i = 0; i < n; i++) {
                const float *src = x + i * ld + k0;
                double *dst = w->d + i * width;
                for (long k = 0; k < cols; k++) dst[k] = (double)src[k];
                for (long k = cols; k < wpd; k++) dst[k] = 0.0;
                rd[i] = dst;
            }
            double t1 = ag_now();
            ag_pairs_d(rd, n, np4, wpd, 1.0, acc, ncols ? next : NULL, nlines);
            st->blocks_f64++;
            st->scan_s += t1 - t0;
            st->pairs_s += ag_now() - t1;
        }
    }
}

#endif
