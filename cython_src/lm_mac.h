/* The datagram MAC of lossympi (wire protocol version 2): GHASH, then AES-128.
 *
 *   K1 || K2 = BLAKE2b-256(key = pair key, "lossympi datagram mac v2")     (16 bytes each)
 *   H        = AES-128(K1, 0^128)
 *   tag      = AES-128(K2, GHASH_H(M))                                      M = header || payload
 *
 * GHASH_H(M) is GCM's hash of M taken as additional data with an empty ciphertext (NIST SP 800-38D, 6.4):
 * M zero-padded to whole 16-byte blocks, then the block [8 * len(M)]_64 || 0^64. GHASH is an
 * almost-universal hash (two messages of at most L blocks collide with probability <= (L + 1) / 2^128 over H),
 * and a hash whose outputs the attacker never sees, enciphered under an independent key, is a MAC without a
 * nonce (hash-then-encrypt): a forgery needs a GHASH collision with a message already sent. Identical
 * messages get identical tags, as with the keyed BLAKE2b of version 1.
 *
 * Written from FIPS 197 (AES) and SP 800-38D (GHASH). Two implementations with one output, checked against
 * each other and against a GCM library in the tests: portable C (byte-oriented AES; GHASH with a 4 KiB
 * table of the 256 byte multiples of H per key, Shoup's 8-bit method; used on CPUs without the instructions below),
 * and PCLMULQDQ + AES-NI (eight blocks per reduction with the precomputed powers H^1..H^8), chosen at run time.
 * Keys are prepared in portable C alone (the bit-serial multiply of the specification).
 */
#ifndef LM_MAC_H
#define LM_MAC_H

#include <stdint.h>
#include <string.h>

#include "lm_blake2b.h"

typedef struct {
    uint8_t rk[11][16];  /* AES-128 round keys of K2, FIPS 197 byte order (the order AES-NI uses too) */
    uint64_t hh, hl;     /* H as two big-endian halves */
    uint64_t mh[256], ml[256]; /* portable path: M[v] = v(x) * H for every byte v (Shoup's 8-bit table) */
    uint8_t hp[8][16];   /* H^1 .. H^8, bytes reversed (PCLMULQDQ path): hp[i] = H^(i + 1) */
} lm_mac_key;

/* ---------------------------------------------------------------- AES-128, portable (FIPS 197) */
static uint8_t lm_aes_sbox[256];

static inline uint8_t lm_xtime(uint8_t a) { return (uint8_t)((a << 1) ^ ((a >> 7) * 0x1b)); }

static uint8_t lm_gf8_mul(uint8_t a, uint8_t b) {
    uint8_t r = 0;
    while (b) {
        if (b & 1) r ^= a;
        a = lm_xtime(a);
        b >>= 1;
    }
    return r;
}

static inline uint8_t lm_rotl8(uint8_t x, int n) { return (uint8_t)((x << n) | (x >> (8 - n))); }

/* The S-box from its definition: the inverse in GF(2^8) (x^254), then the affine map. Call once. */
static void lm_aes_init_tables(void) {
    int x, i;
    for (x = 0; x < 256; x++) {
        uint8_t inv = 1, p = (uint8_t)x;
        for (i = 0; i < 8; i++) { /* x^254 = x^(2+4+...+128) */
            p = lm_gf8_mul(p, p);
            if (i < 7) inv = lm_gf8_mul(inv, p);
        }
        if (x == 0) inv = 0;
        lm_aes_sbox[x] = inv ^ lm_rotl8(inv, 1) ^ lm_rotl8(inv, 2) ^ lm_rotl8(inv, 3) ^ lm_rotl8(inv, 4) ^ 0x63;
    }
}

static void lm_aes128_expand(const uint8_t key[16], uint8_t rk[11][16]) {
    uint8_t *w = &rk[0][0], rcon = 1, t[4];
    int i;
    memcpy(w, key, 16);
    for (i = 4; i < 44; i++) {
        memcpy(t, w + 4 * (i - 1), 4);
        if (i % 4 == 0) {
            uint8_t t0 = t[0];
            t[0] = lm_aes_sbox[t[1]] ^ rcon;
            t[1] = lm_aes_sbox[t[2]];
            t[2] = lm_aes_sbox[t[3]];
            t[3] = lm_aes_sbox[t0];
            rcon = lm_xtime(rcon);
        }
        w[4 * i + 0] = w[4 * (i - 4) + 0] ^ t[0];
        w[4 * i + 1] = w[4 * (i - 4) + 1] ^ t[1];
        w[4 * i + 2] = w[4 * (i - 4) + 2] ^ t[2];
        w[4 * i + 3] = w[4 * (i - 4) + 3] ^ t[3];
    }
}

static void lm_aes128_encrypt(const uint8_t rk[11][16], const uint8_t in[16], uint8_t out[16]) {
    uint8_t s[16], t[16];
    int r, c, i;
    for (i = 0; i < 16; i++) s[i] = in[i] ^ rk[0][i];
    for (r = 1; r <= 10; r++) {
        for (i = 0; i < 16; i++) t[i] = lm_aes_sbox[s[(i + 4 * (i % 4)) % 16]]; /* SubBytes + ShiftRows */
        if (r < 10) {
            for (c = 0; c < 4; c++) { /* MixColumns */
                uint8_t *a = t + 4 * c, a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
                s[4 * c + 0] = lm_xtime(a0) ^ lm_xtime(a1) ^ a1 ^ a2 ^ a3;
                s[4 * c + 1] = a0 ^ lm_xtime(a1) ^ lm_xtime(a2) ^ a2 ^ a3;
                s[4 * c + 2] = a0 ^ a1 ^ lm_xtime(a2) ^ lm_xtime(a3) ^ a3;
                s[4 * c + 3] = lm_xtime(a0) ^ a0 ^ a1 ^ a2 ^ lm_xtime(a3);
            }
        } else {
            memcpy(s, t, 16);
        }
        for (i = 0; i < 16; i++) s[i] ^= rk[r][i];
    }
    memcpy(out, s, 16);
}

/* ---------------------------------------------------------------- GF(2^128) of GCM, portable */
static inline uint64_t lm_be64(const uint8_t *p) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static inline void lm_put_be64(uint8_t *p, uint64_t v) {
    int i;
    for (i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* X <- X * H (SP 800-38D, Algorithm 1: bit 0 is the most significant bit of byte 0). */
static void lm_gf128_mul(uint64_t *xh, uint64_t *xl, uint64_t hh, uint64_t hl) {
    uint64_t zh = 0, zl = 0, vh = hh, vl = hl;
    int i;
    for (i = 0; i < 128; i++) {
        uint64_t m = 0 - ((i < 64 ? *xh >> (63 - i) : *xl >> (127 - i)) & 1);
        uint64_t lsb = 0 - (vl & 1);
        zh ^= vh & m;
        zl ^= vl & m;
        vl = (vl >> 1) | (vh << 63);
        vh = (vh >> 1) ^ (0xe100000000000000ULL & lsb);
    }
    *xh = zh;
    *xl = zl;
}

/* Z * x^8 folds the eight coefficients shifted out (x^128 .. x^135) back in: x^(128 + j) = x^j (1 + x + x^2 + x^7),
 * i.e. 0xE1 << 120 shifted right by j, which touches only the top 16 bits. lm_gh_fold[r] is that for the eight
 * low bits r of Z (bit 7 is x^120 -> j = 0, bit 0 is x^127 -> j = 7), filled by lm_mac_setup(). */
static uint16_t lm_gh_fold[256];

static void lm_gh_init_fold(void) {
    int r, i;
    for (r = 0; r < 256; r++) {
        uint16_t f = 0;
        for (i = 0; i < 8; i++)
            if (r & (1 << i)) f ^= (uint16_t)(0xE100u >> (7 - i));
        lm_gh_fold[r] = f;
    }
}

/* X <- X * H with the key's 8-bit table (Horner over the 16 bytes, the last byte first). Table lookups depend on
 * X: the portable path is not constant-time (the PCLMULQDQ path is). */
static inline void lm_gf128_mul_table(const lm_mac_key *k, uint64_t *xh, uint64_t *xl) {
    uint64_t zh = 0, zl = 0, r;
    int i;
    for (i = 15; i >= 0; i--) {
        unsigned v = (unsigned)((i < 8 ? *xh >> (56 - 8 * i) : *xl >> (120 - 8 * i)) & 255);
        if (i < 15) { /* Z <- Z * x^8 */
            r = zl & 255;
            zl = (zl >> 8) | (zh << 56);
            zh = (zh >> 8) ^ ((uint64_t)lm_gh_fold[r] << 48);
        }
        zh ^= k->mh[v];
        zl ^= k->ml[v];
    }
    *xh = zh;
    *xl = zl;
}

/* Absorb n bytes (a multiple of 16) into the hash state y (16 bytes, GCM byte order). */
typedef void (*lm_gh_absorb_fn)(const lm_mac_key *k, uint8_t y[16], const uint8_t *p, size_t n);

static void lm_gh_absorb_portable(const lm_mac_key *k, uint8_t y[16], const uint8_t *p, size_t n) {
    uint64_t yh = lm_be64(y), yl = lm_be64(y + 8);
    for (; n >= 16; n -= 16, p += 16) {
        yh ^= lm_be64(p);
        yl ^= lm_be64(p + 8);
        lm_gf128_mul_table(k, &yh, &yl);
    }
    lm_put_be64(y, yh);
    lm_put_be64(y + 8, yl);
}

/* GHASH_H(a || b) into y: whole blocks, the block across a and b, the zero-padded tail, the length block. */
static void lm_ghash2(const lm_mac_key *k, lm_gh_absorb_fn absorb, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t y[16]) {
    uint8_t blk[16];
    size_t af = alen & ~(size_t)15, ar = alen - af, total = alen + blen, bf;
    memset(y, 0, 16);
    absorb(k, y, a, af);
    if (ar) {
        size_t take = blen < 16 - ar ? blen : 16 - ar;
        memset(blk, 0, 16);
        memcpy(blk, a + af, ar);
        if (take) memcpy(blk + ar, b, take);
        absorb(k, y, blk, 16);
        b += take;
        blen -= take;
    }
    bf = blen & ~(size_t)15;
    absorb(k, y, b, bf);
    if (blen > bf) {
        memset(blk, 0, 16);
        memcpy(blk, b + bf, blen - bf);
        absorb(k, y, blk, 16);
    }
    memset(blk, 0, 16);
    lm_put_be64(blk, (uint64_t)total * 8);
    absorb(k, y, blk, 16);
}

/* ---------------------------------------------------------------- PCLMULQDQ + AES-NI */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LM_CL __attribute__((target("pclmul,aes,ssse3,sse4.1")))

static int lm_have_clmul(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("aes") && __builtin_cpu_supports("ssse3");
}

LM_CL static inline __m128i lm_rev128(__m128i x) {
    return _mm_shuffle_epi8(x, _mm_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
}

/* Accumulate the unreduced carry-less product a * b into (lo, mid, hi). */
LM_CL static inline void lm_clmul_acc(__m128i a, __m128i b, __m128i *lo, __m128i *mid, __m128i *hi) {
    *lo = _mm_xor_si128(*lo, _mm_clmulepi64_si128(a, b, 0x00));
    *hi = _mm_xor_si128(*hi, _mm_clmulepi64_si128(a, b, 0x11));
    *mid = _mm_xor_si128(*mid, _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10), _mm_clmulepi64_si128(a, b, 0x01)));
}

/* Reduce a 256-bit carry-less product of two bit-reflected elements modulo x^128 + x^7 + x^2 + x + 1.
 * The product of reflected operands is the reflected product shifted right by one: shift it back, then
 * fold the low half in two phases (32-bit lane shifts; the bits that cross lanes are carried by whole-lane
 * byte shifts). */
LM_CL static inline __m128i lm_gf_reduce(__m128i lo, __m128i mid, __m128i hi) {
    __m128i c_lo, c_hi, top, a, t_hi, d;
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    c_lo = _mm_srli_epi32(lo, 31);
    c_hi = _mm_srli_epi32(hi, 31);
    lo = _mm_slli_epi32(lo, 1);
    hi = _mm_slli_epi32(hi, 1);
    top = _mm_srli_si128(c_lo, 12);
    lo = _mm_or_si128(lo, _mm_slli_si128(c_lo, 4));
    hi = _mm_or_si128(_mm_or_si128(hi, _mm_slli_si128(c_hi, 4)), top);
    a = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)), _mm_slli_epi32(lo, 25));
    t_hi = _mm_srli_si128(a, 4);
    lo = _mm_xor_si128(lo, _mm_slli_si128(a, 12));
    d = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)), _mm_srli_epi32(lo, 7));
    lo = _mm_xor_si128(lo, _mm_xor_si128(d, t_hi));
    return _mm_xor_si128(hi, lo);
}

LM_CL static void lm_gh_absorb_clmul(const lm_mac_key *k, uint8_t ybytes[16], const uint8_t *p, size_t n) {
    __m128i y = lm_rev128(_mm_loadu_si128((const __m128i *)ybytes)), lo, mid, hi, x;
    int j;
    for (; n >= 128; n -= 128, p += 128) {
        lo = mid = hi = _mm_setzero_si128();
        for (j = 0; j < 8; j++) {
            x = lm_rev128(_mm_loadu_si128((const __m128i *)(p + 16 * j)));
            if (j == 0) x = _mm_xor_si128(x, y);
            lm_clmul_acc(x, _mm_loadu_si128((const __m128i *)k->hp[7 - j]), &lo, &mid, &hi);
        }
        y = lm_gf_reduce(lo, mid, hi);
    }
    for (; n >= 16; n -= 16, p += 16) {
        lo = mid = hi = _mm_setzero_si128();
        x = _mm_xor_si128(y, lm_rev128(_mm_loadu_si128((const __m128i *)p)));
        lm_clmul_acc(x, _mm_loadu_si128((const __m128i *)k->hp[0]), &lo, &mid, &hi);
        y = lm_gf_reduce(lo, mid, hi);
    }
    _mm_storeu_si128((__m128i *)ybytes, lm_rev128(y));
}

LM_CL static void lm_aes128_encrypt_ni(const uint8_t rk[11][16], const uint8_t in[16], uint8_t out[16]) {
    __m128i s = _mm_xor_si128(_mm_loadu_si128((const __m128i *)in), _mm_loadu_si128((const __m128i *)rk[0]));
    int r;
    for (r = 1; r < 10; r++) s = _mm_aesenc_si128(s, _mm_loadu_si128((const __m128i *)rk[r]));
    s = _mm_aesenclast_si128(s, _mm_loadu_si128((const __m128i *)rk[10]));
    _mm_storeu_si128((__m128i *)out, s);
}
#else
static int lm_have_clmul(void) { return 0; }
#define lm_gh_absorb_clmul lm_gh_absorb_portable
#define lm_aes128_encrypt_ni lm_aes128_encrypt
#endif

/* ---------------------------------------------------------------- the MAC */
/* Constant-time comparison. */
static inline int lm_ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    uint8_t d = 0;
    size_t i;
    for (i = 0; i < n; i++) d |= a[i] ^ b[i];
    return d == 0;
}

static int lm_mac_fast = 0; /* set once at import: lm_mac_setup() */

static void lm_mac_setup(void) {
    lm_aes_init_tables();
    lm_gh_init_fold();
    lm_mac_fast = lm_have_clmul();
}

/* Prepare the MAC key of one peer from the 32-byte pair key. */
static const char LM_MAC_LABEL[] = "lossympi datagram mac v2";

static void lm_mac_init(lm_mac_key *k, const uint8_t pair_key[32]) {
    const char *label = LM_MAC_LABEL;
    lm_b2b_state S;
    uint8_t k12[32], rk1[11][16], zero[16] = {0}, h[16];
    uint64_t ph, pl, bh[8], bl[8];
    int i, j;
    lm_b2b_init_key(&S, 32, pair_key, 32);
    lm_b2b_update(&S, (const uint8_t *)label, sizeof(LM_MAC_LABEL) - 1);
    lm_b2b_final(&S, k12);
    lm_aes128_expand(k12, rk1);
    lm_aes128_expand(k12 + 16, k->rk);
    lm_aes128_encrypt(rk1, zero, h);
    k->hh = ph = lm_be64(h);
    k->hl = pl = lm_be64(h + 8);
    for (j = 0; j < 8; j++) { /* bh/bl[j] = x^(7 - j) H: the multiple of H for bit j of a byte */
        bh[j] = 1ULL << (56 + j);
        bl[j] = 0;
        lm_gf128_mul(&bh[j], &bl[j], k->hh, k->hl);
    }
    k->mh[0] = k->ml[0] = 0;
    for (i = 1; i < 256; i++) { /* M[v] = v(x) H (bit 7 of v is x^0: M[128] = H) = M[v less its lowest bit] + ... */
        j = __builtin_ctz((unsigned)i);
        k->mh[i] = k->mh[i & (i - 1)] ^ bh[j];
        k->ml[i] = k->ml[i & (i - 1)] ^ bl[j];
    }
    for (i = 0; i < 8; i++) { /* hp[i] = H^(i+1), bytes reversed */
        uint8_t be[16];
        if (i > 0) lm_gf128_mul(&ph, &pl, k->hh, k->hl);
        lm_put_be64(be, ph);
        lm_put_be64(be + 8, pl);
        for (j = 0; j < 16; j++) k->hp[i][j] = be[15 - j];
    }
    memset(k12, 0, sizeof(k12));
    memset(rk1, 0, sizeof(rk1));
}

/* MAC of (a || b) into out (16 bytes); fast = 0 forces the portable code. */
static void lm_mac2_impl(const lm_mac_key *k, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen,
                         uint8_t *out, int fast) {
    uint8_t y[16];
    if (fast) {
        lm_ghash2(k, lm_gh_absorb_clmul, a, alen, b, blen, y);
        lm_aes128_encrypt_ni(k->rk, y, out);
    } else {
        lm_ghash2(k, lm_gh_absorb_portable, a, alen, b, blen, y);
        lm_aes128_encrypt(k->rk, y, out);
    }
}

static inline void lm_mac2(const lm_mac_key *k, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen,
                           uint8_t *out) {
    lm_mac2_impl(k, a, alen, b, blen, out, lm_mac_fast);
}

#endif
