/* READDIR / READDIRPLUS entry encoding for the host-directory NFS backend.
 * See nfsdir_impl.c; the pure-Python reference is storaged/nfs/dirlist.py. */
#ifndef STORAGED_NFSDIR_IMPL_H
#define STORAGED_NFSDIR_IMPL_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int dfd;                  /* the directory, open O_RDONLY|O_DIRECTORY */
    uint64_t cookie;          /* d_off to start from (0 = beginning) */
    size_t budget;            /* bytes of encoded entries allowed */
    size_t first_read;        /* size of the first getdents64 call */
    int plus;                 /* READDIRPLUS: attributes and handles too */
    int is_root;              /* ".." is the export root itself */
    int mount_id;             /* entries on another mount get no handle */
    const uint8_t *dir_fh;    /* NFS handle of the directory (for "." and root "..") */
    size_t dir_fh_len;
    const uint8_t *prefix;    /* handle prefix: version(1) + export id(4) */
    const uint8_t *key;       /* handle MAC key */
    size_t key_len;
    uint64_t fsid;
    int want_index;           /* also return (cookie, end offset) per entry */
} nfsdir_args;

/* Keyed BLAKE2b (RFC 7693) with a short digest; key_len <= 64, out_len <= 64. */
void nfsdir_blake2b(uint8_t *out, size_t out_len, const uint8_t *key, size_t key_len,
                    const uint8_t *in, size_t in_len);

/* Encode entries into a malloc'ed buffer (*out, freed by the caller).
 * Returns 0, or -errno (lseek failure is -EINVAL). */
int nfsdir_encode(const nfsdir_args *a, uint8_t **out, size_t *out_len, uint32_t *count,
                  int *eof, uint64_t **index);

/* Rewrite the fattr3 of every entryplus3 in ``buf`` (as nfsdir_encode made it) with a
 * fresh fstatat of its name.  Returns 0, or 1 if an entry cannot be stat'ed or the
 * buffer is malformed (the caller then lists the slow way). */
int nfsdir_refresh(int dfd, uint8_t *buf, size_t len, int is_root, uint64_t fsid);

#endif
