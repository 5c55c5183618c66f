/* READDIR / READDIRPLUS entries (RFC 1813 §3.3.16-17) straight from getdents64.
 *
 * One loop per reply: getdents64 from the cookie on, then for every entry
 * name_to_handle_at + fstatat (READDIRPLUS), the NFS file handle (prefix,
 * inode handle, keyed BLAKE2b MAC as storaged.nas.exports builds it) and
 * the XDR of entry3 / entryplus3, stopping before the budget is exceeded.
 * The output is byte-identical to storaged.nfs.dirlist.encode_entries_py.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "nfsdir_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* ------------------------------------------------------------ BLAKE2b */

static const uint64_t b2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL,
    0xA54FF53A5F1D36F1ULL, 0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL,
    0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};

static const uint8_t b2b_sigma[12][16] = {
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

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
#define B2B_G(a, b, c, d, x, y)          \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = ROTR64(v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];              \
        v[b] = ROTR64(v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = ROTR64(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];              \
        v[b] = ROTR64(v[b] ^ v[c], 63);  \
    } while (0)

static uint64_t get64le(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static void b2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = b2b_iv[i];
    }
    v[12] ^= t; /* low word of the byte counter; inputs here are tiny */
    if (last)
        v[14] = ~v[14];
    for (i = 0; i < 16; i++)
        m[i] = get64le(block + 8 * i);
    for (i = 0; i < 12; i++) {
        const uint8_t *s = b2b_sigma[i];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

void nfsdir_blake2b(uint8_t *out, size_t out_len, const uint8_t *key, size_t key_len,
                    const uint8_t *in, size_t in_len) {
    uint64_t h[8];
    uint8_t block[128];
    uint64_t t = 0;
    size_t i;
    for (i = 0; i < 8; i++)
        h[i] = b2b_iv[i];
    h[0] ^= 0x01010000ULL ^ ((uint64_t)key_len << 8) ^ (uint64_t)out_len;
    if (key_len > 0) {
        /* RFC 7693 §3.3: the key, zero-padded, is the first block. */
        memset(block, 0, sizeof block);
        memcpy(block, key, key_len);
        t = 128;
        if (in_len == 0) {
            b2b_compress(h, block, t, 1);
            goto done;
        }
        b2b_compress(h, block, t, 0);
    }
    while (in_len > 128) {
        t += 128;
        b2b_compress(h, in, t, 0);
        in += 128;
        in_len -= 128;
    }
    memset(block, 0, sizeof block);
    memcpy(block, in, in_len);
    t += in_len;
    b2b_compress(h, block, t, 1);
done:
    for (i = 0; i < out_len; i++)
        out[i] = (uint8_t)(h[i >> 3] >> (8 * (i & 7)));
}

/* ------------------------------------------------------------ XDR bits */

static uint8_t *put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static uint8_t *put64(uint8_t *p, uint64_t v) {
    p = put32(p, (uint32_t)(v >> 32));
    return put32(p, (uint32_t)v);
}

static uint8_t *put_opaque(uint8_t *p, const void *data, size_t n) {
    p = put32(p, (uint32_t)n);
    memcpy(p, data, n);
    p += n;
    while (n & 3) {
        *p++ = 0;
        n++;
    }
    return p;
}

static uint32_t ftype3(mode_t mode) {
    switch (mode & S_IFMT) {
    case S_IFDIR: return 2;
    case S_IFBLK: return 3;
    case S_IFCHR: return 4;
    case S_IFLNK: return 5;
    case S_IFSOCK: return 6;
    case S_IFIFO: return 7;
    default: return 1; /* S_IFREG and anything unknown, as HostFs._attr does */
    }
}

static uint8_t *put_time(uint8_t *p, const struct timespec *ts) {
    if (ts->tv_sec < 0) /* before 1970: clamp to 0 as fattr3_bytes does */
        return put64(p, 0);
    p = put32(p, (uint32_t)ts->tv_sec);
    return put32(p, (uint32_t)ts->tv_nsec);
}

/* fattr3 (RFC 1813 §2.6), 84 bytes, the same fields as storaged.nfs.nfs3.fattr3_bytes. */
static uint8_t *put_fattr3(uint8_t *p, const struct stat *st, uint64_t fsid) {
    p = put32(p, ftype3(st->st_mode));
    p = put32(p, st->st_mode & 07777);
    p = put32(p, (uint32_t)st->st_nlink);
    p = put32(p, st->st_uid);
    p = put32(p, st->st_gid);
    p = put64(p, (uint64_t)st->st_size);
    p = put64(p, (uint64_t)st->st_blocks * 512);
    p = put32(p, major(st->st_rdev));
    p = put32(p, minor(st->st_rdev));
    p = put64(p, fsid);
    p = put64(p, st->st_ino);
    p = put_time(p, &st->st_atim);
    p = put_time(p, &st->st_mtim);
    return put_time(p, &st->st_ctim);
}

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

#define MAX_HANDLE 128
#define FH_MAX 64
#define MAC_LEN 8
#define ENTRY_MAX (4 + 8 + 4 + 256 + 8 + 4 + 84 + 4 + 4 + FH_MAX)
#define DENTS_SIZE (64 * 1024)

/* The NFS handle of ``name`` in a->dfd: prefix | handle type (BE) | f_handle | MAC.
 * Returns its length, or 0 when it has none (error, other mount, too long). */
static size_t entry_handle(const nfsdir_args *a, const char *name, uint8_t *fh) {
    union {
        struct file_handle h;
        uint8_t raw[sizeof(struct file_handle) + MAX_HANDLE];
    } u;
    int mid;
    size_t inode_len, n;
    u.h.handle_bytes = MAX_HANDLE;
    if (name_to_handle_at(a->dfd, name, &u.h, &mid, 0) != 0 || mid != a->mount_id)
        return 0;
    inode_len = 4 + u.h.handle_bytes;
    n = 5 + inode_len + MAC_LEN;
    if (n > FH_MAX)
        return 0;
    memcpy(fh, a->prefix, 5);
    put32(fh + 5, (uint32_t)u.h.handle_type);
    memcpy(fh + 9, u.h.f_handle, u.h.handle_bytes);
    /* MAC over export id (prefix[1..4]) + inode handle, as LiveExport._mac. */
    nfsdir_blake2b(fh + 5 + inode_len, MAC_LEN, a->key, a->key_len, fh + 1, 4 + inode_len);
    return n;
}

int nfsdir_encode(const nfsdir_args *a, uint8_t **out, size_t *out_len, uint32_t *count,
                  int *eof, uint64_t **index) {
    uint8_t *buf = NULL, *dents = NULL;
    uint64_t *idx = NULL;
    size_t idx_cap = 0;
    size_t cap = 0, len = 0, want;
    uint32_t n = 0;
    int rc = 0, done = 0, have_self = 0;
    struct stat self_st;

    *out = NULL;
    if (index)
        *index = NULL;
    *out_len = 0;
    *count = 0;
    *eof = 1;
    if (lseek(a->dfd, (off_t)a->cookie, SEEK_SET) < 0)
        return -EINVAL;
    dents = malloc(DENTS_SIZE);
    if (!dents)
        return -ENOMEM;
    want = a->first_read < 1024 ? 1024 : a->first_read;
    if (want > DENTS_SIZE)
        want = DENTS_SIZE;
    while (!done) {
        long got = syscall(SYS_getdents64, a->dfd, dents, want);
        long pos = 0;
        if (got < 0) {
            rc = -errno;
            break;
        }
        if (got == 0)
            break;
        want = DENTS_SIZE;
        while (pos < got) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(dents + pos);
            const char *name = d->d_name;
            size_t nlen = strlen(name);
            int self = name[0] == '.' && (name[1] == 0 ||
                                          (a->is_root && name[1] == '.' && name[2] == 0));
            uint8_t fh[FH_MAX];
            size_t fhlen = 0;
            struct stat st;
            const struct stat *stp = NULL;
            uint64_t fileid = d->d_ino;
            uint8_t *p;
            size_t need;
            pos += d->d_reclen;
            if (self) {
                /* "." (and ".." of the export root): the directory itself. */
                if (!have_self) {
                    if (fstat(a->dfd, &self_st) != 0) {
                        rc = -errno;
                        done = 1;
                        break;
                    }
                    have_self = 1;
                }
                fileid = self_st.st_ino;
                if (a->plus) {
                    stp = &self_st;
                    memcpy(fh, a->dir_fh, a->dir_fh_len);
                    fhlen = a->dir_fh_len;
                }
            } else if (a->plus) {
                fhlen = entry_handle(a, name, fh);
                if (fhlen) {
                    if (fstatat(a->dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
                        stp = &st;
                    else
                        fhlen = 0;
                }
            }
            need = 4 + 8 + 4 + ((nlen + 3) & ~(size_t)3) + 8;
            if (a->plus)
                need += stp ? 4 + 84 + 4 + 4 + ((fhlen + 3) & ~(size_t)3) : 8;
            if (len + need > a->budget) {
                *eof = 0;
                done = 1;
                break;
            }
            if (len + ENTRY_MAX > cap) {
                size_t ncap = cap ? cap * 2 : 16384;
                uint8_t *nb;
                while (ncap < len + ENTRY_MAX)
                    ncap *= 2;
                nb = realloc(buf, ncap);
                if (!nb) {
                    rc = -ENOMEM;
                    done = 1;
                    break;
                }
                buf = nb;
                cap = ncap;
            }
            p = buf + len;
            p = put32(p, 1);
            p = put64(p, fileid);
            p = put_opaque(p, name, nlen);
            p = put64(p, (uint64_t)d->d_off);
            if (a->plus) {
                if (stp) {
                    p = put32(p, 1);
                    p = put_fattr3(p, stp, a->fsid);
                    p = put32(p, 1);
                    p = put_opaque(p, fh, fhlen);
                } else {
                    p = put32(p, 0);
                    p = put32(p, 0);
                }
            }
            len = (size_t)(p - buf);
            if (a->want_index) {
                if (2 * (size_t)n + 2 > idx_cap) {
                    size_t ncap = idx_cap ? idx_cap * 2 : 1024;
                    uint64_t *ni = realloc(idx, ncap * sizeof *idx);
                    if (!ni) {
                        rc = -ENOMEM;
                        done = 1;
                        break;
                    }
                    idx = ni;
                    idx_cap = ncap;
                }
                idx[2 * n] = (uint64_t)d->d_off;
                idx[2 * n + 1] = len;
            }
            n++;
        }
    }
    free(dents);
    if (rc) {
        free(buf);
        free(idx);
        return rc;
    }
    if (index)
        *index = idx;
    else
        free(idx);
    *out = buf;
    *out_len = len;
    *count = n;
    return 0;
}

static uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

int nfsdir_refresh(int dfd, uint8_t *buf, size_t len, int is_root, uint64_t fsid) {
    size_t pos = 0;
    char name[256];
    struct stat st;
    while (pos < len) {
        uint32_t nlen, fhlen;
        if (pos + 16 > len || get32(buf + pos) != 1)
            return 1;
        nlen = get32(buf + pos + 12);
        if (nlen > 255 || pos + 16 + ((nlen + 3) & ~3u) + 8 + 4 > len)
            return 1;
        memcpy(name, buf + pos + 16, nlen);
        name[nlen] = 0;
        pos += 16 + ((nlen + 3) & ~3u) + 8;
        if (!get32(buf + pos)) { /* no attributes, no handle */
            pos += 8;
            continue;
        }
        if (pos + 4 + 84 + 8 > len)
            return 1;
        if ((name[0] == '.' && name[1] == 0) ||
            (is_root && name[0] == '.' && name[1] == '.' && name[2] == 0)) {
            if (fstat(dfd, &st) != 0)
                return 1;
        } else if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            return 1;
        }
        put_fattr3(buf + pos + 4, &st, fsid);
        pos += 4 + 84 + 4;
        fhlen = get32(buf + pos);
        if (fhlen > FH_MAX || pos + 4 + ((fhlen + 3) & ~3u) > len)
            return 1;
        pos += 4 + ((fhlen + 3) & ~3u);
    }
    return 0;
}
