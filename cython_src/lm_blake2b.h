/* Keyed BLAKE2b (RFC 7693): derives the datagram MAC's keys from a pair key (lm_mac.h).
 *
 * Written from the RFC. Only what the transport needs: keyed init, update, final. Output length is
 * configurable up to 64 bytes.
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

/* Compress the pending key block now (valid whenever at least one message byte will follow): a state prepared
 * once and copied per message, as lossympi's version 1 MAC did; kept to time that MAC (python -m lossympi.bench mac). */
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

#endif
