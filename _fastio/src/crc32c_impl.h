/* CRC32C (Castagnoli) for the _fastio._crc extension.
 *
 * crc32c_value() continues a running CRC exactly like zlib.crc32: pass 0 to
 * start, pass the previous return value to continue.  The x86-64 SSE4.2
 * path is chosen at run time (the rest of the extension is built for the
 * baseline ISA), everything else uses portable slicing-by-8 tables.
 */
#ifndef STORAGED_CRC32C_IMPL_H
#define STORAGED_CRC32C_IMPL_H

#include <stddef.h>
#include <stdint.h>

/* Fill tables and pick the implementation; idempotent, call once at import. */
void crc32c_init(void);

/* Best implementation for this CPU. */
uint32_t crc32c_value(uint32_t crc, const unsigned char *buf, size_t len);

/* Portable table-driven implementation (always available, for tests). */
uint32_t crc32c_sw(uint32_t crc, const unsigned char *buf, size_t len);

/* "sse4.2" or "software". */
const char *crc32c_backend(void);

#endif
