/* RAID-5/6 parity kernels: XOR, P+Q syndrome, GF(2^8) multiply, recovery.
 *
 * Techniques (re-implemented here, no code copied):
 *  - Q by Horner's rule over the data blocks from the last to the first, one
 *    "multiply by 2" per block: shift every byte left and XOR 0x1d into the
 *    bytes whose top bit was set (H. P. Anvin, "The mathematics of RAID-6",
 *    as in Linux lib/raid6).  AVX2 finds those bytes with a signed compare,
 *    AVX-512BW with a byte mask register.
 *  - multiplication by a constant c: with GFNI one GF2P8AFFINEQB per vector
 *    using the 8x8 bit matrix of "x -> c*x" (linear over GF(2), so any
 *    polynomial works, not only GFNI's built-in 0x11b); without GFNI two
 *    PSHUFB nibble lookups (low and high nibble products, XORed).
 *  - big outputs (>= NT_MIN bytes, 64-byte aligned) are written with
 *    non-temporal stores so a 256 MiB pass does not read P/Q into cache first.
 * Each vector function carries a target attribute; cpuid picks at run time,
 * so the extension itself is compiled for the baseline x86-64 ISA.
 */
#include "raid_impl.h"

#include <stdlib.h>
#include <string.h>

#define POLY 0x1d
#define NT_MIN (1u << 20)

static uint8_t gf_exp[512];
static uint8_t gf_log[256];
static uint8_t gf_mul_tab[256][256];
static int initialised;

static uint8_t gfmul(uint8_t a, uint8_t b)
{
    if (!a || !b)
        return 0;
    return gf_exp[gf_log[a] + gf_log[b]];
}

static uint8_t gfinv(uint8_t a)
{
    return gf_exp[(255 - gf_log[a]) % 255];
}

/* ------------------------------------------------------------ generic C */

static void xor_gen_generic(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest)
{
    size_t off = 0;
    for (; off + 8 <= len; off += 8) {
        uint64_t acc, v;
        memcpy(&acc, srcs[0] + off, 8);
        for (int i = 1; i < n; i++) {
            memcpy(&v, srcs[i] + off, 8);
            acc ^= v;
        }
        memcpy(dest + off, &acc, 8);
    }
    for (; off < len; off++) {
        uint8_t acc = srcs[0][off];
        for (int i = 1; i < n; i++)
            acc ^= srcs[i][off];
        dest[off] = acc;
    }
}

static inline uint64_t mul2_u64(uint64_t v)
{
    uint64_t hi = v & 0x8080808080808080ull;
    uint64_t mask = (hi >> 7) * 0xff;
    return ((v << 1) & 0xfefefefefefefefeull) ^ (mask & 0x1d1d1d1d1d1d1d1dull);
}

static void pq_gen_generic(int n, size_t len, const uint8_t *const *srcs, uint8_t *p, uint8_t *q)
{
    size_t off = 0;
    for (; off + 8 <= len; off += 8) {
        uint64_t pv, qv, d;
        memcpy(&pv, srcs[n - 1] + off, 8);
        qv = pv;
        for (int i = n - 2; i >= 0; i--) {
            memcpy(&d, srcs[i] + off, 8);
            pv ^= d;
            qv = mul2_u64(qv) ^ d;
        }
        memcpy(p + off, &pv, 8);
        memcpy(q + off, &qv, 8);
    }
    for (; off < len; off++) {
        uint8_t pv = srcs[n - 1][off], qv = pv;
        for (int i = n - 2; i >= 0; i--) {
            uint8_t d = srcs[i][off];
            pv ^= d;
            qv = (uint8_t)((qv << 1) ^ ((qv & 0x80) ? POLY : 0)) ^ d;
        }
        p[off] = pv;
        q[off] = qv;
    }
}

static void gf_mul_generic(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest, int acc)
{
    const uint8_t *t = gf_mul_tab[c];
    if (acc)
        for (size_t i = 0; i < len; i++)
            dest[i] ^= t[src[i]];
    else
        for (size_t i = 0; i < len; i++)
            dest[i] = t[src[i]];
}

/* dy = a*px ^ b*qx, dx = dy ^ px, with px = P ^ dx_in and qx = Q ^ dy_in. */
static void combine2_generic(size_t len, const uint8_t *pp, const uint8_t *qq, uint8_t *dx,
                             uint8_t *dy, uint8_t a, uint8_t b)
{
    const uint8_t *ta = gf_mul_tab[a], *tb = gf_mul_tab[b];
    for (size_t i = 0; i < len; i++) {
        uint8_t px = pp[i] ^ dx[i];
        uint8_t qx = qq[i] ^ dy[i];
        uint8_t y = ta[px] ^ tb[qx];
        dy[i] = y;
        dx[i] = y ^ px;
    }
}

/* dx = c*(Q ^ dx_in); P ^= dx */
static void combinep_generic(size_t len, const uint8_t *qq, uint8_t *dx, uint8_t *pp, uint8_t c)
{
    const uint8_t *t = gf_mul_tab[c];
    for (size_t i = 0; i < len; i++) {
        uint8_t d = t[qq[i] ^ dx[i]];
        dx[i] = d;
        pp[i] ^= d;
    }
}

/* ------------------------------------------------------------ x86 */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>

/* The GF2P8AFFINEQB matrix of x -> c*x: output bit i is the parity of
 * (row byte 7-i) AND x, so row i lists the inputs j whose product has bit i. */
static uint64_t affine_matrix(uint8_t c)
{
    uint64_t m = 0;
    for (int i = 0; i < 8; i++) {
        uint8_t row = 0;
        for (int j = 0; j < 8; j++)
            if ((gfmul(c, (uint8_t)(1u << j)) >> i) & 1)
                row |= (uint8_t)(1u << j);
        m |= (uint64_t)row << (8 * (7 - i));
    }
    return m;
}

/* ---- AVX2 ---- */
__attribute__((target("avx2")))
static void xor_gen_avx2(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest)
{
    size_t off = 0;
    for (; off + 128 <= len; off += 128) {
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(srcs[0] + off));
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(srcs[0] + off + 32));
        __m256i a2 = _mm256_loadu_si256((const __m256i *)(srcs[0] + off + 64));
        __m256i a3 = _mm256_loadu_si256((const __m256i *)(srcs[0] + off + 96));
        for (int i = 1; i < n; i++) {
            const uint8_t *s = srcs[i] + off;
            a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)s));
            a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(s + 32)));
            a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(s + 64)));
            a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(s + 96)));
        }
        _mm256_storeu_si256((__m256i *)(dest + off), a0);
        _mm256_storeu_si256((__m256i *)(dest + off + 32), a1);
        _mm256_storeu_si256((__m256i *)(dest + off + 64), a2);
        _mm256_storeu_si256((__m256i *)(dest + off + 96), a3);
    }
    if (off < len) {
        const uint8_t *tail[256];
        for (int i = 0; i < n; i++)
            tail[i] = srcs[i] + off;
        xor_gen_generic(n, len - off, tail, dest + off);
    }
}

__attribute__((target("avx2")))
static inline __m256i mul2_avx2(__m256i q, __m256i poly, __m256i zero)
{
    __m256i hi = _mm256_and_si256(_mm256_cmpgt_epi8(zero, q), poly);
    return _mm256_xor_si256(_mm256_add_epi8(q, q), hi);
}

__attribute__((target("avx2")))
static void pq_gen_avx2(int n, size_t len, const uint8_t *const *srcs, uint8_t *p, uint8_t *q)
{
    const __m256i poly = _mm256_set1_epi8(POLY), zero = _mm256_setzero_si256();
    int nt = len >= NT_MIN && !(((uintptr_t)p | (uintptr_t)q) & 31);
    size_t off = 0;
    for (; off + 64 <= len; off += 64) {
        __m256i p0 = _mm256_loadu_si256((const __m256i *)(srcs[n - 1] + off));
        __m256i p1 = _mm256_loadu_si256((const __m256i *)(srcs[n - 1] + off + 32));
        __m256i q0 = p0, q1 = p1;
        for (int i = n - 2; i >= 0; i--) {
            __m256i d0 = _mm256_loadu_si256((const __m256i *)(srcs[i] + off));
            __m256i d1 = _mm256_loadu_si256((const __m256i *)(srcs[i] + off + 32));
            p0 = _mm256_xor_si256(p0, d0);
            p1 = _mm256_xor_si256(p1, d1);
            q0 = _mm256_xor_si256(mul2_avx2(q0, poly, zero), d0);
            q1 = _mm256_xor_si256(mul2_avx2(q1, poly, zero), d1);
        }
        if (nt) {
            _mm256_stream_si256((__m256i *)(p + off), p0);
            _mm256_stream_si256((__m256i *)(p + off + 32), p1);
            _mm256_stream_si256((__m256i *)(q + off), q0);
            _mm256_stream_si256((__m256i *)(q + off + 32), q1);
        } else {
            _mm256_storeu_si256((__m256i *)(p + off), p0);
            _mm256_storeu_si256((__m256i *)(p + off + 32), p1);
            _mm256_storeu_si256((__m256i *)(q + off), q0);
            _mm256_storeu_si256((__m256i *)(q + off + 32), q1);
        }
    }
    if (nt)
        _mm_sfence();
    if (off < len) {
        const uint8_t *tail[256];
        for (int i = 0; i < n; i++)
            tail[i] = srcs[i] + off;
        pq_gen_generic(n, len - off, tail, p + off, q + off);
    }
}

/* PSHUFB multiply: lo[i] = c*i, hi[i] = c*(i<<4). */
__attribute__((target("avx2")))
static inline __m256i mul_pshufb(__m256i x, __m256i lo, __m256i hi, __m256i mask)
{
    __m256i l = _mm256_shuffle_epi8(lo, _mm256_and_si256(x, mask));
    __m256i h = _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(x, 4), mask));
    return _mm256_xor_si256(l, h);
}

static void nibble_tables(uint8_t c, uint8_t lo[32], uint8_t hi[32])
{
    for (int i = 0; i < 16; i++) {
        lo[i] = lo[i + 16] = gfmul(c, (uint8_t)i);
        hi[i] = hi[i + 16] = gfmul(c, (uint8_t)(i << 4));
    }
}

__attribute__((target("avx2")))
static void gf_mul_avx2(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest, int acc)
{
    uint8_t lt[32], ht[32];
    nibble_tables(c, lt, ht);
    const __m256i lo = _mm256_loadu_si256((const __m256i *)lt);
    const __m256i hi = _mm256_loadu_si256((const __m256i *)ht);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t off = 0;
    for (; off + 32 <= len; off += 32) {
        __m256i r = mul_pshufb(_mm256_loadu_si256((const __m256i *)(src + off)), lo, hi, mask);
        if (acc)
            r = _mm256_xor_si256(r, _mm256_loadu_si256((const __m256i *)(dest + off)));
        _mm256_storeu_si256((__m256i *)(dest + off), r);
    }
    gf_mul_generic(c, len - off, src + off, dest + off, acc);
}

__attribute__((target("avx2")))
static void combine2_avx2(size_t len, const uint8_t *pp, const uint8_t *qq, uint8_t *dx,
                          uint8_t *dy, uint8_t a, uint8_t b)
{
    uint8_t la[32], ha[32], lb[32], hb[32];
    nibble_tables(a, la, ha);
    nibble_tables(b, lb, hb);
    const __m256i mla = _mm256_loadu_si256((const __m256i *)la);
    const __m256i mha = _mm256_loadu_si256((const __m256i *)ha);
    const __m256i mlb = _mm256_loadu_si256((const __m256i *)lb);
    const __m256i mhb = _mm256_loadu_si256((const __m256i *)hb);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t off = 0;
    for (; off + 32 <= len; off += 32) {
        __m256i px = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(pp + off)),
                                      _mm256_loadu_si256((const __m256i *)(dx + off)));
        __m256i qx = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(qq + off)),
                                      _mm256_loadu_si256((const __m256i *)(dy + off)));
        __m256i y = _mm256_xor_si256(mul_pshufb(px, mla, mha, mask),
                                     mul_pshufb(qx, mlb, mhb, mask));
        _mm256_storeu_si256((__m256i *)(dy + off), y);
        _mm256_storeu_si256((__m256i *)(dx + off), _mm256_xor_si256(y, px));
    }
    combine2_generic(len - off, pp + off, qq + off, dx + off, dy + off, a, b);
}

__attribute__((target("avx2")))
static void combinep_avx2(size_t len, const uint8_t *qq, uint8_t *dx, uint8_t *pp, uint8_t c)
{
    uint8_t lt[32], ht[32];
    nibble_tables(c, lt, ht);
    const __m256i lo = _mm256_loadu_si256((const __m256i *)lt);
    const __m256i hi = _mm256_loadu_si256((const __m256i *)ht);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t off = 0;
    for (; off + 32 <= len; off += 32) {
        __m256i x = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(qq + off)),
                                     _mm256_loadu_si256((const __m256i *)(dx + off)));
        __m256i d = mul_pshufb(x, lo, hi, mask);
        _mm256_storeu_si256((__m256i *)(dx + off), d);
        _mm256_storeu_si256((__m256i *)(pp + off),
                            _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)(pp + off))));
    }
    combinep_generic(len - off, qq + off, dx + off, pp + off, c);
}

/* ---- AVX-512BW ---- */
#define T512 "avx512f,avx512bw"
__attribute__((target(T512)))
static void xor_gen_avx512(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest)
{
    int nt = len >= NT_MIN && !((uintptr_t)dest & 63);
    size_t off = 0;
    for (; off + 256 <= len; off += 256) {
        __m512i a0 = _mm512_loadu_si512(srcs[0] + off);
        __m512i a1 = _mm512_loadu_si512(srcs[0] + off + 64);
        __m512i a2 = _mm512_loadu_si512(srcs[0] + off + 128);
        __m512i a3 = _mm512_loadu_si512(srcs[0] + off + 192);
        for (int i = 1; i < n; i++) {
            const uint8_t *s = srcs[i] + off;
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(s));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(s + 64));
            a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(s + 128));
            a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(s + 192));
        }
        if (nt) {
            _mm512_stream_si512((void *)(dest + off), a0);
            _mm512_stream_si512((void *)(dest + off + 64), a1);
            _mm512_stream_si512((void *)(dest + off + 128), a2);
            _mm512_stream_si512((void *)(dest + off + 192), a3);
        } else {
            _mm512_storeu_si512(dest + off, a0);
            _mm512_storeu_si512(dest + off + 64, a1);
            _mm512_storeu_si512(dest + off + 128, a2);
            _mm512_storeu_si512(dest + off + 192, a3);
        }
    }
    if (nt)
        _mm_sfence();
    if (off < len) {
        const uint8_t *tail[256];
        for (int i = 0; i < n; i++)
            tail[i] = srcs[i] + off;
        xor_gen_avx2(n, len - off, tail, dest + off);
    }
}

__attribute__((target(T512)))
static inline __m512i mul2_512(__m512i q, __m512i poly)
{
    __mmask64 m = _mm512_movepi8_mask(q);
    return _mm512_xor_si512(_mm512_add_epi8(q, q), _mm512_maskz_mov_epi8(m, poly));
}

__attribute__((target(T512)))
static void pq_gen_avx512(int n, size_t len, const uint8_t *const *srcs, uint8_t *p, uint8_t *q)
{
    const __m512i poly = _mm512_set1_epi8(POLY);
    int nt = len >= NT_MIN && !(((uintptr_t)p | (uintptr_t)q) & 63);
    size_t off = 0;
    for (; off + 128 <= len; off += 128) {
        __m512i p0 = _mm512_loadu_si512(srcs[n - 1] + off);
        __m512i p1 = _mm512_loadu_si512(srcs[n - 1] + off + 64);
        __m512i q0 = p0, q1 = p1;
        for (int i = n - 2; i >= 0; i--) {
            __m512i d0 = _mm512_loadu_si512(srcs[i] + off);
            __m512i d1 = _mm512_loadu_si512(srcs[i] + off + 64);
            p0 = _mm512_xor_si512(p0, d0);
            p1 = _mm512_xor_si512(p1, d1);
            q0 = _mm512_xor_si512(mul2_512(q0, poly), d0);
            q1 = _mm512_xor_si512(mul2_512(q1, poly), d1);
        }
        if (nt) {
            _mm512_stream_si512((void *)(p + off), p0);
            _mm512_stream_si512((void *)(p + off + 64), p1);
            _mm512_stream_si512((void *)(q + off), q0);
            _mm512_stream_si512((void *)(q + off + 64), q1);
        } else {
            _mm512_storeu_si512(p + off, p0);
            _mm512_storeu_si512(p + off + 64, p1);
            _mm512_storeu_si512(q + off, q0);
            _mm512_storeu_si512(q + off + 64, q1);
        }
    }
    if (nt)
        _mm_sfence();
    if (off < len) {
        const uint8_t *tail[256];
        for (int i = 0; i < n; i++)
            tail[i] = srcs[i] + off;
        pq_gen_avx2(n, len - off, tail, p + off, q + off);
    }
}

/* ---- GFNI (with AVX-512 registers) for multiplications by a constant ---- */
#define TGFNI "gfni,avx512f,avx512bw"
__attribute__((target(TGFNI)))
static void gf_mul_gfni(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest, int acc)
{
    const __m512i m = _mm512_set1_epi64((long long)affine_matrix(c));
    size_t off = 0;
    for (; off + 64 <= len; off += 64) {
        __m512i r = _mm512_gf2p8affine_epi64_epi8(_mm512_loadu_si512(src + off), m, 0);
        if (acc)
            r = _mm512_xor_si512(r, _mm512_loadu_si512(dest + off));
        _mm512_storeu_si512(dest + off, r);
    }
    gf_mul_generic(c, len - off, src + off, dest + off, acc);
}

__attribute__((target(TGFNI)))
static void combine2_gfni(size_t len, const uint8_t *pp, const uint8_t *qq, uint8_t *dx,
                          uint8_t *dy, uint8_t a, uint8_t b)
{
    const __m512i ma = _mm512_set1_epi64((long long)affine_matrix(a));
    const __m512i mb = _mm512_set1_epi64((long long)affine_matrix(b));
    size_t off = 0;
    for (; off + 64 <= len; off += 64) {
        __m512i px = _mm512_xor_si512(_mm512_loadu_si512(pp + off), _mm512_loadu_si512(dx + off));
        __m512i qx = _mm512_xor_si512(_mm512_loadu_si512(qq + off), _mm512_loadu_si512(dy + off));
        __m512i y = _mm512_xor_si512(_mm512_gf2p8affine_epi64_epi8(px, ma, 0),
                                     _mm512_gf2p8affine_epi64_epi8(qx, mb, 0));
        _mm512_storeu_si512(dy + off, y);
        _mm512_storeu_si512(dx + off, _mm512_xor_si512(y, px));
    }
    combine2_generic(len - off, pp + off, qq + off, dx + off, dy + off, a, b);
}

__attribute__((target(TGFNI)))
static void combinep_gfni(size_t len, const uint8_t *qq, uint8_t *dx, uint8_t *pp, uint8_t c)
{
    const __m512i m = _mm512_set1_epi64((long long)affine_matrix(c));
    size_t off = 0;
    for (; off + 64 <= len; off += 64) {
        __m512i x = _mm512_xor_si512(_mm512_loadu_si512(qq + off), _mm512_loadu_si512(dx + off));
        __m512i d = _mm512_gf2p8affine_epi64_epi8(x, m, 0);
        _mm512_storeu_si512(dx + off, d);
        _mm512_storeu_si512(pp + off, _mm512_xor_si512(d, _mm512_loadu_si512(pp + off)));
    }
    combinep_generic(len - off, qq + off, dx + off, pp + off, c);
}
#endif

/* ------------------------------------------------------------ dispatch */

typedef void (*xor_fn)(int, size_t, const uint8_t *const *, uint8_t *);
typedef void (*pq_fn)(int, size_t, const uint8_t *const *, uint8_t *, uint8_t *);
typedef void (*mul_fn)(uint8_t, size_t, const uint8_t *, uint8_t *, int);
typedef void (*c2_fn)(size_t, const uint8_t *, const uint8_t *, uint8_t *, uint8_t *, uint8_t,
                      uint8_t);
typedef void (*cp_fn)(size_t, const uint8_t *, uint8_t *, uint8_t *, uint8_t);

static xor_fn do_xor = xor_gen_generic;
static pq_fn do_pq = pq_gen_generic;
static mul_fn do_mul = gf_mul_generic;
static c2_fn do_c2 = combine2_generic;
static cp_fn do_cp = combinep_generic;
static const char *backend_name = "generic";

static int cpu_has(const char *what)
{
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (!strcmp(what, "avx2"))
        return __builtin_cpu_supports("avx2");
    if (!strcmp(what, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (!strcmp(what, "gfni"))
        return __builtin_cpu_supports("gfni") && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512bw");
#endif
    (void)what;
    return 0;
}

int raid_set_backend(const char *name)
{
    int want_512 = 0, want_avx2 = 0;
    if (!name || !*name) {
        want_512 = cpu_has("avx512");
        want_avx2 = cpu_has("avx2");
    } else if (!strcmp(name, "avx512")) {
        if (!cpu_has("avx512"))
            return -1;
        want_512 = want_avx2 = 1;
    } else if (!strcmp(name, "avx2")) {
        if (!cpu_has("avx2"))
            return -1;
        want_avx2 = 1;
    } else if (strcmp(name, "generic")) {
        return -1;
    }
    do_xor = xor_gen_generic;
    do_pq = pq_gen_generic;
    do_mul = gf_mul_generic;
    do_c2 = combine2_generic;
    do_cp = combinep_generic;
    backend_name = "generic";
#ifdef HAVE_X86
    if (want_avx2) {
        do_xor = xor_gen_avx2;
        do_pq = pq_gen_avx2;
        do_mul = gf_mul_avx2;
        do_c2 = combine2_avx2;
        do_cp = combinep_avx2;
        backend_name = "avx2";
    }
    if (want_512) {
        do_xor = xor_gen_avx512;
        do_pq = pq_gen_avx512;
        backend_name = "avx512bw";
        if (cpu_has("gfni")) {
            do_mul = gf_mul_gfni;
            do_c2 = combine2_gfni;
            do_cp = combinep_gfni;
            backend_name = "avx512bw+gfni";
        }
    }
#else
    (void)want_512;
    (void)want_avx2;
#endif
    return 0;
}

void raid_init(void)
{
    if (initialised)
        return;
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
        gf_exp[i] = (uint8_t)x;
        gf_log[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100)
            x ^= 0x100 | POLY;
    }
    for (int i = 255; i < 512; i++)
        gf_exp[i] = gf_exp[i - 255];
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            gf_mul_tab[a][b] = gfmul((uint8_t)a, (uint8_t)b);
    raid_set_backend("");
    initialised = 1;
}

const char *raid_backend(void)
{
    return backend_name;
}

void raid_xor_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest)
{
    do_xor(n, len, srcs, dest);
}

void raid_pq_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *p, uint8_t *q)
{
    do_pq(n, len, srcs, p, q);
}

void raid_gf_mul(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest, int accumulate)
{
    do_mul(c, len, src, dest, accumulate);
}

int raid_recov_2data(int nd, size_t len, uint8_t **blocks, int x, int y)
{
    if (x > y) {
        int t = x;
        x = y;
        y = t;
    }
    const uint8_t **ptrs = malloc(sizeof(*ptrs) * (size_t)nd);
    uint8_t *zero = calloc(1, len ? len : 1);
    if (!ptrs || !zero) {
        free(ptrs);
        free(zero);
        return -1;
    }
    for (int i = 0; i < nd; i++)
        ptrs[i] = (i == x || i == y) ? zero : blocks[i];
    /* P and Q of the survivors land in the lost blocks' buffers (md's trick). */
    do_pq(nd, len, ptrs, blocks[x], blocks[y]);
    uint8_t denom = gfinv(gf_exp[x] ^ gf_exp[y]);
    do_c2(len, blocks[nd], blocks[nd + 1], blocks[x], blocks[y], gfmul(gf_exp[x], denom), denom);
    free(ptrs);
    free(zero);
    return 0;
}

int raid_recov_datap(int nd, size_t len, uint8_t **blocks, int x)
{
    const uint8_t **ptrs = malloc(sizeof(*ptrs) * (size_t)nd);
    uint8_t *zero = calloc(1, len ? len : 1);
    if (!ptrs || !zero) {
        free(ptrs);
        free(zero);
        return -1;
    }
    for (int i = 0; i < nd; i++)
        ptrs[i] = i == x ? zero : blocks[i];
    do_pq(nd, len, ptrs, blocks[nd], blocks[x]);
    do_cp(len, blocks[nd + 1], blocks[x], blocks[nd], gfinv(gf_exp[x]));
    free(ptrs);
    free(zero);
    return 0;
}
