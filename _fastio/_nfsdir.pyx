# cython: language_level=3, boundscheck=False, wraparound=False
"""READDIR / READDIRPLUS entry encoding in one C loop (see src/nfsdir_impl.c).

Same signature, results and exceptions as
:func:`storaged.nfs.dirlist.encode_entries_py`, the pure-Python reference
that the tests compare this module with.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from cpython.bytes cimport PyBytes_FromStringAndSize

import errno as _errno
import os as _os


cdef extern from "src/nfsdir_impl.h":
    ctypedef struct nfsdir_args:
        int dfd
        uint64_t cookie
        size_t budget
        size_t first_read
        int plus
        int is_root
        int mount_id
        const uint8_t *dir_fh
        size_t dir_fh_len
        const uint8_t *prefix
        const uint8_t *key
        size_t key_len
        uint64_t fsid
        int want_index
    void nfsdir_blake2b(uint8_t *out, size_t out_len, const uint8_t *key, size_t key_len,
                        const uint8_t *inp, size_t in_len) nogil
    int nfsdir_encode(const nfsdir_args *a, uint8_t **out, size_t *out_len,
                      uint32_t *count, int *eof, uint64_t **index) nogil
    int nfsdir_refresh(int dfd, uint8_t *buf, size_t len, int is_root, uint64_t fsid) nogil


def blake2b_mac(bytes key, bytes data, int digest_size=8):
    """Keyed BLAKE2b digest (``hashlib.blake2b(data, key=key, digest_size=...)``)."""
    cdef uint8_t out[64]
    if len(key) > 64 or not 1 <= digest_size <= 64:
        raise ValueError("key longer than 64 bytes or bad digest size")
    nfsdir_blake2b(out, digest_size, <const uint8_t *>key, len(key),
                   <const uint8_t *>data, len(data))
    return PyBytes_FromStringAndSize(<char *>out, digest_size)


def encode_entries(int dfd, unsigned long long cookie, Py_ssize_t budget,
                   Py_ssize_t first_read, bint plus, bint is_root, int mount_id,
                   bytes dir_fh, bytes prefix, bytes key, unsigned long long fsid):
    """``(entries XDR, count, eof)`` of directory ``dfd`` from ``cookie`` on."""
    return _encode(dfd, cookie, budget, first_read, plus, is_root, mount_id, dir_fh, prefix,
                   key, fsid, False)[:3]


def encode_indexed(int dfd, unsigned long long cookie, Py_ssize_t budget,
                   Py_ssize_t first_read, bint plus, bint is_root, int mount_id,
                   bytes dir_fh, bytes prefix, bytes key, unsigned long long fsid):
    """``encode_entries`` plus an index: native-endian uint64 pairs (cookie, end offset)."""
    return _encode(dfd, cookie, budget, first_read, plus, is_root, mount_id, dir_fh, prefix,
                   key, fsid, True)


def refresh_attrs(int dfd, buf, bint is_root, unsigned long long fsid):
    """Rewrite every entryplus3 fattr3 in writable ``buf`` from a fresh fstatat; False if
    an entry cannot be stat'ed (or ``buf`` is not an entry list)."""
    cdef unsigned char[::1] view = buf
    cdef int rc
    if view.shape[0] == 0:
        return True
    with nogil:
        rc = nfsdir_refresh(dfd, &view[0], view.shape[0], is_root, fsid)
    return rc == 0


cdef tuple _encode(int dfd, unsigned long long cookie, Py_ssize_t budget,
                   Py_ssize_t first_read, bint plus, bint is_root, int mount_id,
                   bytes dir_fh, bytes prefix, bytes key, unsigned long long fsid,
                   bint want_index):
    cdef nfsdir_args a
    cdef uint8_t *out = NULL
    cdef uint64_t *index = NULL
    cdef size_t out_len = 0
    cdef uint32_t count = 0
    cdef int eof = 1
    cdef int rc
    if len(prefix) != 5 or len(key) > 64 or len(dir_fh) > 64:
        raise ValueError("bad handle prefix, key or directory handle")
    a.dfd = dfd
    a.cookie = cookie
    a.budget = budget if budget > 0 else 0
    a.first_read = first_read if first_read > 0 else 0
    a.plus = plus
    a.is_root = is_root
    a.mount_id = mount_id
    a.dir_fh = <const uint8_t *>dir_fh
    a.dir_fh_len = len(dir_fh)
    a.prefix = <const uint8_t *>prefix
    a.key = <const uint8_t *>key
    a.key_len = len(key)
    a.fsid = fsid
    a.want_index = want_index
    with nogil:
        rc = nfsdir_encode(&a, &out, &out_len, &count, &eof, &index)
    if rc != 0:
        if rc == -_errno.EINVAL:
            raise OSError(_errno.EINVAL, "bad cookie")
        raise OSError(-rc, _os.strerror(-rc))
    try:
        data = PyBytes_FromStringAndSize(<char *>out, out_len) if out_len else b""
        idx = PyBytes_FromStringAndSize(<char *>index, 16 * count) if index != NULL else b""
    finally:
        free(out)
        free(index)
    return data, count, bool(eof), idx
