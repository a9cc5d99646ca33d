/* Keyed BLAKE2b (RFC 7693) used as the datagram MAC of lossympi.
 *
 * Written from the RFC. Only what the transport needs: a keyed state prepared once per peer (the key
 * block is compressed up front, since every MAC'ed message is non-empty), then update/final per
 * datagram. Output length is configurable up to 64 bytes; lossympi uses 16.
 */
#ifndef LM_BLAKE2B_H
#define LM_BLAKE2B_H

#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t h[8];
    uint64_t t0, t1;
    uint8_t buf[128];
    size_t buflen;
    size_t outlen;
} lm_b2b_state;

static const uint64_t lm_b2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t lm_b2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t lm_rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t lm_load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only (x86_64, aarch64); checked at import */
    return v;
}

#define LM_G(a, b, c, d, x, y)            \
    do {                                  \
        a = a + b + (x);                  \
        d = lm_rotr64(d ^ a, 32);         \
        c = c + d;                        \
        b = lm_rotr64(b ^ c, 24);         \
        a = a + b + (y);                  \
        d = lm_rotr64(d ^ a, 16);         \
        c = c + d;                        \
        b = lm_rotr64(b ^ c, 63);         \
    } while (0)

static void lm_b2b_compress(lm_b2b_state *S, const uint8_t *block, int last) {
    uint64_t m[16], v[16];
    int i, r;
    for (i = 0; i < 16; i++) m[i] = lm_load64(block + 8 * i);
    for (i = 0; i < 8; i++) { v[i] = S->h[i]; v[i + 8] = lm_b2b_iv[i]; }
    v[12] ^= S->t0;
    v[13] ^= S->t1;
    if (last) v[14] = ~v[14];
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 12
#endif
    for (r = 0; r < 12; r++) {
        const uint8_t *s = lm_b2b_sigma[r];
        LM_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        LM_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        LM_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        LM_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        LM_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        LM_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        LM_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        LM_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) S->h[i] ^= v[i] ^ v[i + 8];
}

static inline void lm_b2b_count(lm_b2b_state *S, uint64_t n) {
    S->t0 += n;
    if (S->t0 < n) S->t1++;
}

/* Keyed init (keylen 1..64, outlen 1..64). */
static void lm_b2b_init_key(lm_b2b_state *S, size_t outlen, const uint8_t *key, size_t keylen) {
    int i;
    for (i = 0; i < 8; i++) S->h[i] = lm_b2b_iv[i];
    S->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    S->t0 = S->t1 = 0;
    S->outlen = outlen;
    memset(S->buf, 0, 128);
    memcpy(S->buf, key, keylen);
    S->buflen = 128;
}

/* Compress the pending key block now: valid whenever at least one message byte will follow. */
static void lm_b2b_prepare(lm_b2b_state *S) {
    if (S->buflen == 128) {
        lm_b2b_count(S, 128);
        lm_b2b_compress(S, S->buf, 0);
        S->buflen = 0;
    }
}

static void lm_b2b_update(lm_b2b_state *S, const uint8_t *in, size_t inlen) {
    if (inlen == 0) return;
    size_t fill = 128 - S->buflen;
    if (inlen > fill) {
        memcpy(S->buf + S->buflen, in, fill);
        lm_b2b_count(S, 128);
        lm_b2b_compress(S, S->buf, 0);
        S->buflen = 0;
        in += fill;
        inlen -= fill;
        while (inlen > 128) {
            lm_b2b_count(S, 128);
            lm_b2b_compress(S, in, 0);
            in += 128;
            inlen -= 128;
        }
    }
    memcpy(S->buf + S->buflen, in, inlen);
    S->buflen += inlen;
}

static void lm_b2b_final(lm_b2b_state *S, uint8_t *out) {
    uint8_t full[64];
    int i;
    lm_b2b_count(S, S->buflen);
    memset(S->buf + S->buflen, 0, 128 - S->buflen);
    lm_b2b_compress(S, S->buf, 1);
    for (i = 0; i < 8; i++) memcpy(full + 8 * i, &S->h[i], 8);
    memcpy(out, full, S->outlen);
}

/* MAC of (a || b) from a prepared keyed state; the state is copied, not modified. */
static inline void lm_mac2(const lm_b2b_state *prepared, const uint8_t *a, size_t alen, const uint8_t *b,
                           size_t blen, uint8_t *out) {
    lm_b2b_state S;
    memcpy(S.h, prepared->h, sizeof(S.h));
    S.t0 = prepared->t0;
    S.t1 = prepared->t1;
    S.outlen = prepared->outlen;
    S.buflen = 0;
    lm_b2b_update(&S, a, alen);
    lm_b2b_update(&S, b, blen);
    lm_b2b_final(&S, out);
}

/* Constant-time comparison. */
static inline int lm_ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    uint8_t d = 0;
    size_t i;
    for (i = 0; i < n; i++) d |= a[i] ^ b[i];
    return d == 0;
}


/* ---------------------------------------------------------------------------------------------------
 * Four MACs at once (AVX2). BLAKE2b processes one message serially, but a batch of datagrams holds many
 * independent messages: each 64-bit lane of the AVX2 registers runs the compression of one message, so
 * four datagrams cost about what one does in scalar code. The four messages are hdr[j] (32 bytes) ||
 * pay[j] (paylen bytes, equal for the four), each under its own prepared keyed state. The output equals
 * lm_mac2() byte for byte (tested against hashlib).
 * ------------------------------------------------------------------------------------------------- */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LM_HAVE_X4 1

static int lm_have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

#define LM_X4 __attribute__((target("avx2")))

LM_X4 static inline __m256i lm_x4_rotr32(__m256i x) { return _mm256_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)); }
LM_X4 static inline __m256i lm_x4_rotr24(__m256i x) {
    const __m256i r = _mm256_setr_epi8(3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10, 3, 4, 5, 6, 7, 0, 1,
                                       2, 11, 12, 13, 14, 15, 8, 9, 10);
    return _mm256_shuffle_epi8(x, r);
}
LM_X4 static inline __m256i lm_x4_rotr16(__m256i x) {
    const __m256i r = _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9, 2, 3, 4, 5, 6, 7, 0,
                                       1, 10, 11, 12, 13, 14, 15, 8, 9);
    return _mm256_shuffle_epi8(x, r);
}
LM_X4 static inline __m256i lm_x4_rotr63(__m256i x) {
    return _mm256_or_si256(_mm256_srli_epi64(x, 63), _mm256_add_epi64(x, x));
}

#define LM_G4(a, b, c, d, x, y)                                          \
    do {                                                                 \
        a = _mm256_add_epi64(_mm256_add_epi64(a, b), x);                 \
        d = lm_x4_rotr32(_mm256_xor_si256(d, a));                        \
        c = _mm256_add_epi64(c, d);                                      \
        b = lm_x4_rotr24(_mm256_xor_si256(b, c));                        \
        a = _mm256_add_epi64(_mm256_add_epi64(a, b), y);                 \
        d = lm_x4_rotr16(_mm256_xor_si256(d, a));                        \
        c = _mm256_add_epi64(c, d);                                      \
        b = lm_x4_rotr63(_mm256_xor_si256(b, c));                        \
    } while (0)

/* Load word i of the four blocks into one register per word (4x4 transposes of 64-bit words). */
LM_X4 static inline void lm_x4_load(const uint8_t *const blk[4], __m256i m[16]) {
    int q;
    for (q = 0; q < 4; q++) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(blk[0] + 32 * q));
        __m256i b = _mm256_loadu_si256((const __m256i *)(blk[1] + 32 * q));
        __m256i c = _mm256_loadu_si256((const __m256i *)(blk[2] + 32 * q));
        __m256i d = _mm256_loadu_si256((const __m256i *)(blk[3] + 32 * q));
        __m256i t0 = _mm256_unpacklo_epi64(a, b), t1 = _mm256_unpackhi_epi64(a, b);
        __m256i t2 = _mm256_unpacklo_epi64(c, d), t3 = _mm256_unpackhi_epi64(c, d);
        m[4 * q + 0] = _mm256_permute2x128_si256(t0, t2, 0x20);
        m[4 * q + 1] = _mm256_permute2x128_si256(t1, t3, 0x20);
        m[4 * q + 2] = _mm256_permute2x128_si256(t0, t2, 0x31);
        m[4 * q + 3] = _mm256_permute2x128_si256(t1, t3, 0x31);
    }
}

LM_X4 static void lm_x4_compress(__m256i h[8], const uint8_t *const blk[4], uint64_t t0, uint64_t t1, int last) {
    __m256i m[16], v[16];
    int i, r;
    lm_x4_load(blk, m);
    for (i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = _mm256_set1_epi64x((long long)lm_b2b_iv[i]);
    }
    v[12] = _mm256_xor_si256(v[12], _mm256_set1_epi64x((long long)t0));
    v[13] = _mm256_xor_si256(v[13], _mm256_set1_epi64x((long long)t1));
    if (last) v[14] = _mm256_xor_si256(v[14], _mm256_set1_epi64x(-1LL));
#pragma GCC unroll 12
    for (r = 0; r < 12; r++) {
        const uint8_t *s = lm_b2b_sigma[r];
        LM_G4(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        LM_G4(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        LM_G4(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        LM_G4(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        LM_G4(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        LM_G4(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        LM_G4(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        LM_G4(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) h[i] = _mm256_xor_si256(h[i], _mm256_xor_si256(v[i], v[i + 8]));
}

/* Copy bytes [off, off+128) of hdr(32) || pay(paylen) into tmp, zero-padded. */
static inline void lm_x4_gather_block(uint8_t *tmp, const uint8_t *hdr, const uint8_t *pay, size_t paylen,
                                      size_t off) {
    size_t total = 32 + paylen, end = off + 128, k;
    memset(tmp, 0, 128);
    if (end > total) end = total;
    for (k = off; k < end && k < 32; k++) tmp[k - off] = hdr[k];
    if (end > 32) {
        size_t from = off > 32 ? off : 32;
        memcpy(tmp + (from - off), pay + (from - 32), end - from);
    }
}

/* Requires states prepared with lm_b2b_prepare (t = 128, empty buffer) and outlen <= 64. */
LM_X4 static void lm_mac_x4(const lm_b2b_state *const st[4], const uint8_t *const hdr[4],
                            const uint8_t *const pay[4], size_t paylen, uint8_t *const out[4]) {
    __m256i h[8];
    uint8_t tmp[4][128];
    const uint8_t *blk[4];
    size_t total = 32 + paylen, nb = (total + 127) / 128, b, off;
    uint64_t t0 = st[0]->t0, t1 = st[0]->t1, hw[8][4];
    int i, j;
    for (i = 0; i < 8; i++)
        h[i] = _mm256_setr_epi64x((long long)st[0]->h[i], (long long)st[1]->h[i], (long long)st[2]->h[i],
                                  (long long)st[3]->h[i]);
    for (b = 0; b < nb; b++) {
        off = 128 * b;
        int last = (b + 1 == nb);
        size_t len = last ? total - off : 128;
        for (j = 0; j < 4; j++) {
            if (off >= 32 && off + 128 <= total) {
                blk[j] = pay[j] + (off - 32);
            } else {
                lm_x4_gather_block(tmp[j], hdr[j], pay[j], paylen, off);
                blk[j] = tmp[j];
            }
        }
        t0 += len;
        if (t0 < len) t1++;
        lm_x4_compress(h, blk, t0, t1, last);
    }
    for (i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)hw[i], h[i]);
    for (j = 0; j < 4; j++) {
        uint8_t full[64];
        for (i = 0; i < 8; i++) memcpy(full + 8 * i, &hw[i][j], 8);
        memcpy(out[j], full, st[j]->outlen);
    }
}
#else
#define LM_HAVE_X4 0
static int lm_have_avx2(void) { return 0; }
static void lm_mac_x4(const lm_b2b_state *const st[4], const uint8_t *const hdr[4],
                      const uint8_t *const pay[4], size_t paylen, uint8_t *const out[4]) {
    int j;
    for (j = 0; j < 4; j++) lm_mac2(st[j], hdr[j], 32, pay[j], paylen, out[j]);
}
#endif

#endif
