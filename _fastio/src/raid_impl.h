/* RAID parity kernels for the _fastio._raid extension.
 *
 * Arithmetic is md's RAID-6: GF(2^8) with polynomial 0x11d, generator 2.
 * P = XOR of the data blocks, Q = sum of 2^i * D_i.  Every function takes
 * arrays of block pointers that all have `len` bytes; outputs never alias
 * inputs.  The implementation (AVX-512BW, AVX2, GFNI for multiplications by
 * a constant, or portable C) is chosen by cpuid in raid_init().
 */
#ifndef STORAGED_RAID_IMPL_H
#define STORAGED_RAID_IMPL_H

#include <stddef.h>
#include <stdint.h>

#define RAID_MAX_SRCS 256

void raid_init(void);

/* dest = srcs[0] ^ ... ^ srcs[n-1] */
void raid_xor_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest);

/* p = XOR of srcs, q = sum 2^i * srcs[i] */
void raid_pq_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *p, uint8_t *q);

/* dest = c * src (accumulate: dest ^= c * src) */
void raid_gf_mul(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest, int accumulate);

/* blocks[0..nd-1] data, blocks[nd] = P, blocks[nd+1] = Q; rebuild data x and y.
 * Returns -1 if a scratch buffer cannot be allocated. */
int raid_recov_2data(int nd, size_t len, uint8_t **blocks, int x, int y);

/* Rebuild data x and P from Q and the other data. */
int raid_recov_datap(int nd, size_t len, uint8_t **blocks, int x);

/* Name of the backends in use, e.g. "avx512bw+gfni". */
const char *raid_backend(void);

/* Force a backend for tests/benchmarks: "avx512", "avx2", "generic" ("" = best).
 * Returns 0, or -1 if this CPU cannot run it. */
int raid_set_backend(const char *name);

#endif
