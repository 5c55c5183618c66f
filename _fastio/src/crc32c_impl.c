/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78) as used by iSCSI
 * header and data digests (RFC 7143 section 13.1, examples RFC 3720 B.4).
 *
 * Hardware path: SSE4.2 CRC32 instruction, three independent streams so
 * the 3-cycle latency of CRC32 is hidden, recombined with "shift by N zero
 * bytes" operator tables (the technique of Intel's crc_iscsi_v_pcl and Mark
 * Adler's crc32c.c, re-implemented here).  The function carries a target
 * attribute, so the module itself needs no -msse4.2 and still loads on CPUs
 * without SSE4.2; cpuid decides at crc32c_init() time.
 *
 * Software path: slicing-by-8, little-endian friendly, any architecture.
 */
#include "crc32c_impl.h"

#include <string.h>

#define POLY 0x82f63b78u

static uint32_t sw_table[8][256];
static int initialised;

static void sw_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ POLY : crc >> 1;
        sw_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = sw_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = sw_table[0][crc & 0xff] ^ (crc >> 8);
            sw_table[k][n] = crc;
        }
    }
}

static inline uint64_t load64le(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

uint32_t crc32c_sw(uint32_t crci, const unsigned char *buf, size_t len)
{
    uint32_t crc = crci ^ 0xffffffffu;
    while (len && ((uintptr_t)buf & 7)) {
        crc = sw_table[0][(crc ^ *buf++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w = load64le(buf) ^ crc;
        crc = sw_table[7][w & 0xff] ^
              sw_table[6][(w >> 8) & 0xff] ^
              sw_table[5][(w >> 16) & 0xff] ^
              sw_table[4][(w >> 24) & 0xff] ^
              sw_table[3][(w >> 32) & 0xff] ^
              sw_table[2][(w >> 40) & 0xff] ^
              sw_table[1][(w >> 48) & 0xff] ^
              sw_table[0][w >> 56];
        buf += 8;
        len -= 8;
    }
    while (len--)
        crc = sw_table[0][(crc ^ *buf++) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffffu;
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_HW 1
#include <nmmintrin.h>

/* Block sizes of the three interleaved streams. */
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t long_shift[4][256], short_shift[4][256];
static int use_hw;

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

/* Operator that feeds len (a power of two) zero bytes through a raw CRC. */
static void zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd); /* 2 zero bits */
    gf2_matrix_square(odd, even); /* 4 zero bits */
    do {
        gf2_matrix_square(even, odd); /* 8, 32, ... zero bits */
        len >>= 1;
        if (len == 0)
            return;
        gf2_matrix_square(odd, even); /* 16, 64, ... zero bits */
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void zeros_table(uint32_t table[4][256], size_t len)
{
    uint32_t op[32];
    zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        table[0][n] = gf2_matrix_times(op, n);
        table[1][n] = gf2_matrix_times(op, n << 8);
        table[2][n] = gf2_matrix_times(op, n << 16);
        table[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t shift_crc(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
           table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crci, const unsigned char *buf, size_t len)
{
    uint64_t crc0 = crci ^ 0xffffffffu, crc1, crc2;
    const unsigned char *end;

    while (len && ((uintptr_t)buf & 7)) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *buf++);
        len--;
    }
    while (len >= 3 * LONG_BLOCK) {
        crc1 = 0;
        crc2 = 0;
        end = buf + LONG_BLOCK;
        do {
            uint64_t a, b, c;
            memcpy(&a, buf, 8);
            memcpy(&b, buf + LONG_BLOCK, 8);
            memcpy(&c, buf + 2 * LONG_BLOCK, 8);
            crc0 = _mm_crc32_u64(crc0, a);
            crc1 = _mm_crc32_u64(crc1, b);
            crc2 = _mm_crc32_u64(crc2, c);
            buf += 8;
        } while (buf < end);
        crc0 = shift_crc(long_shift, (uint32_t)crc0) ^ crc1;
        crc0 = shift_crc(long_shift, (uint32_t)crc0) ^ crc2;
        buf += 2 * LONG_BLOCK;
        len -= 3 * LONG_BLOCK;
    }
    while (len >= 3 * SHORT_BLOCK) {
        crc1 = 0;
        crc2 = 0;
        end = buf + SHORT_BLOCK;
        do {
            uint64_t a, b, c;
            memcpy(&a, buf, 8);
            memcpy(&b, buf + SHORT_BLOCK, 8);
            memcpy(&c, buf + 2 * SHORT_BLOCK, 8);
            crc0 = _mm_crc32_u64(crc0, a);
            crc1 = _mm_crc32_u64(crc1, b);
            crc2 = _mm_crc32_u64(crc2, c);
            buf += 8;
        } while (buf < end);
        crc0 = shift_crc(short_shift, (uint32_t)crc0) ^ crc1;
        crc0 = shift_crc(short_shift, (uint32_t)crc0) ^ crc2;
        buf += 2 * SHORT_BLOCK;
        len -= 3 * SHORT_BLOCK;
    }
    while (len >= 8) {
        uint64_t a;
        memcpy(&a, buf, 8);
        crc0 = _mm_crc32_u64(crc0, a);
        buf += 8;
        len -= 8;
    }
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *buf++);
        len--;
    }
    return (uint32_t)crc0 ^ 0xffffffffu;
}
#endif /* x86-64 */

void crc32c_init(void)
{
    if (initialised)
        return;
    sw_init();
#ifdef HAVE_HW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        zeros_table(long_shift, LONG_BLOCK);
        zeros_table(short_shift, SHORT_BLOCK);
        use_hw = 1;
    }
#endif
    initialised = 1;
}

uint32_t crc32c_value(uint32_t crc, const unsigned char *buf, size_t len)
{
#ifdef HAVE_HW
    if (use_hw)
        return crc32c_hw(crc, buf, len);
#endif
    return crc32c_sw(crc, buf, len);
}

const char *crc32c_backend(void)
{
#ifdef HAVE_HW
    if (use_hw)
        return "sse4.2";
#endif
    return "software";
}
