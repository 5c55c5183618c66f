"""One-pass READDIR/READDIRPLUS encoding (storaged.nfs.dirlist): compiled vs pure vs general.

The compiled ``_fastio._nfsdir`` must return exactly the bytes of the
pure-Python reference ``encode_entries_py``, and a whole READDIRPLUS reply
built through it must equal the reply of the general path
(``HostFs.readdir`` + ``Nfs3._readdir`` encoding).  Needs root
(name_to_handle_at handles are checked against open_by_handle_at).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time

import pytest

from storaged.fastio import extensions_disabled
from storaged.nas import linux
from storaged.nas.exports import Export, LiveExport
from storaged.nas.fs import FileType
from storaged.nas.hostfs import HostFs
from storaged.nfs import dirlist
from storaged.nfs.nfs3 import NFS_PROGRAM, NFS_V3, READDIR3ARGS, READDIRPLUS3ARGS
from storaged.nfs.server import NfsServer
from tests.nfs_client import LocalClient
from tests.support import compiled_module

NO_EXT = extensions_disabled()


@pytest.fixture(scope="module")
def compiled():
    return compiled_module("_nfsdir")


def test_loader_picks_compiled_unless_disabled():
    if NO_EXT:
        assert dirlist.IMPLEMENTATION == "pure"
    else:
        compiled_module("_nfsdir")
        assert dirlist.IMPLEMENTATION == "compiled"


@pytest.mark.parametrize("key_len", [0, 1, 16, 64])
@pytest.mark.parametrize("data_len", [0, 1, 20, 127, 128, 129, 256, 300])
def test_blake2b_mac_matches_hashlib(compiled, key_len, data_len):
    key = bytes(range(key_len))
    data = bytes((7 * i) & 0xFF for i in range(data_len))
    for size in (8, 32, 64):
        want = hashlib.blake2b(data, key=key, digest_size=size).digest()
        assert compiled.blake2b_mac(key, data, size) == want
        assert dirlist.blake2b_mac_py(key, data, size) == want


def _tree(root: str, files: int = 200) -> str:
    d = os.path.join(root, "d")
    os.makedirs(d)
    for i in range(files):
        with open(os.path.join(d, f"f{i}" + "x" * (i % 9)), "wb") as f:
            f.write(b"y" * i)
    os.mkdir(os.path.join(d, "sub"))
    os.symlink("f1", os.path.join(d, "link"))
    os.mkfifo(os.path.join(d, "fifo"))
    with open(os.path.join(d, "n" * 255), "w"):
        pass
    os.utime(os.path.join(d, "f3xxx"), ns=(-5_000_000_000, 1 << 33))  # before 1970
    os.listdir(d)  # relatime: the first listing updates the directory's atime, not later ones
    return d


def _serve(tmp_path, files: int, **export: object):
    """A ``_tree`` of ``files`` under tmp_path/export, served in memory:
    (the listed directory, the NfsServer, a LocalClient)."""
    root = tmp_path / "export"
    root.mkdir()
    d = _tree(str(root), files=files)
    rec = Export(path="/export", directory=str(root), export_id=0x1234, handle_key="11" * 16,
                 **export)
    rec.validate()
    server = NfsServer(write_verifier=b"VERIFIER")
    server.exports.set([LiveExport(rec, HostFs(str(root), fsid=rec.export_id))])
    return d, server, LocalClient(server.service)


def _cookies(data: bytes, n: int, plus: bool) -> list[int]:
    """The cookie of every entry in an encoded entry list."""
    out, off = [], 0
    for _ in range(n):
        _vf, _fid, ln = struct.unpack_from(">IQI", data, off)
        off += 16 + ((ln + 3) & ~3)
        out.append(struct.unpack_from(">Q", data, off)[0])
        off += 8
        if plus:
            if struct.unpack_from(">I", data, off)[0]:
                off += 4 + 84 + 4
                fl = struct.unpack_from(">I", data, off)[0]
                off += 4 + ((fl + 3) & ~3)
            else:
                off += 8
    assert off == len(data)
    return out


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("is_root", [False, True])
@pytest.mark.parametrize("budget", [0, 100, 700, 4000, 1 << 20])
def test_compiled_equals_pure(compiled, tmp_path, plus, is_root, budget):
    d = _tree(str(tmp_path))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fh, mount_id = linux.name_to_handle_at(dfd, b"", linux.AT_EMPTY_PATH)
        common = (plus, is_root, mount_id, b"D" * 29, b"\x01\x00\x00\x12\x34", b"k" * 16,
                  0x1234)
        cookie, rounds, total = 0, 0, 0
        while True:
            rounds += 1
            a = compiled.encode_entries(dfd, cookie, budget, budget // 3, *common)
            b = dirlist.encode_entries_py(dfd, cookie, budget, budget // 3, *common)
            assert a == b
            data, n, eof = a
            total += n
            if eof or n == 0:
                break
            cookie = _cookies(data, n, plus)[-1]
        if budget >= 4000:
            assert eof and total == 200 + 4 + 2
            assert rounds > 1 or budget == 1 << 20
        if budget == 0:
            assert (n, eof) == (0, False)
        # A mount id that is not the directory's: no entry gets a handle, but "." does.
        data, n, _ = compiled.encode_entries(dfd, 0, 1 << 20, 0, True, is_root, mount_id + 1,
                                             *common[3:])
        assert (data, n) == dirlist.encode_entries_py(dfd, 0, 1 << 20, 0, True, is_root,
                                                      mount_id + 1, *common[3:])[:2]
    finally:
        os.close(dfd)


def test_errors_agree(compiled, tmp_path):
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    args = (0, 1000, 0, True, False, 0, b"", b"\x01\0\0\0\1", b"", 0)
    for fn in (compiled.encode_entries, dirlist.encode_entries_py):
        with pytest.raises(OSError):
            fn(fd, *args)  # closed descriptor
        with pytest.raises(ValueError):
            fn(0, 0, 1000, 0, True, False, 0, b"", b"bad", b"", 0)


@pytest.mark.root
@pytest.mark.parametrize("plus", [False, True])
def test_fast_reply_equals_general_path(tmp_path, plus):
    """The whole RPC reply, fast path vs HostFs.readdir + the Python encoder."""
    _d, server, c = _serve(tmp_path, 120)
    rootfh = c.mnt("/export")
    dfh = c.lookup(rootfh, b"d")
    for fh in (rootfh, dfh):
        for count in (400, 1500, 8192, 1 << 20):
            cookie = 0
            for _ in range(500):
                if plus:
                    args = READDIRPLUS3ARGS.encode({"dir": fh, "cookie": cookie,
                                                    "cookieverf": bytes(8), "dircount": count,
                                                    "maxcount": count})
                else:
                    args = READDIR3ARGS.encode({"dir": fh, "cookie": cookie,
                                                "cookieverf": bytes(8), "count": count})
                replies = []
                for fast in (False, True, False):
                    server.nfs.fast_listing = fast
                    replies.append(bytes(c.call(NFS_PROGRAM, NFS_V3, 17 if plus else 16,
                                                args)[1]))
                assert replies[1] == replies[2]  # (replies[0] may differ in the dir's atime)
                status, res = c.nfs("READDIRPLUS" if plus else "READDIR", {
                    "dir": fh, "cookie": cookie, "cookieverf": bytes(8), "count": count,
                    "dircount": count, "maxcount": count})
                if status == 10005 and plus and count == 400:
                    break  # NFS3ERR_TOOSMALL: the 255-byte name does not fit (both paths)
                assert status == 0
                if res["reply"]["eof"]:
                    break
                cookie = res["reply"]["entries"][-1]["cookie"]
            else:
                pytest.fail("listing did not end")
    server.nfs.fast_listing = True


def _plus_replies(c, fh, count, between=None):
    """Raw READDIRPLUS replies of a whole listing, and the entry names; ``between()``
    runs after every reply (as the server shell runs ``prefetch_listing``)."""
    cookie, raw, names = 0, [], []
    while True:
        args = READDIRPLUS3ARGS.encode({"dir": fh, "cookie": cookie, "cookieverf": bytes(8),
                                        "dircount": count, "maxcount": count})
        raw.append(bytes(c.call(NFS_PROGRAM, NFS_V3, 17, args)[1]))
        if between is not None:
            between()
        status, res = c.nfs("READDIRPLUS", {"dir": fh, "cookie": cookie,
                                            "cookieverf": bytes(8), "dircount": count,
                                            "maxcount": count})
        assert status == 0
        names += [e["name"] for e in res["reply"]["entries"]]
        if res["reply"]["eof"]:
            return raw, names
        cookie = res["reply"]["entries"][-1]["cookie"]


@pytest.mark.root
def test_listing_cache_fresh_attributes_and_invalidation(tmp_path):
    d, server, c = _serve(tmp_path, 150, attr_timeout=0)  # attributes re-read for every reply
    nfs = server.nfs
    dfh = c.lookup(c.mnt("/export"), b"d")

    def both():
        nfs.fast_listing = False
        general = _plus_replies(c, dfh, 1500)
        nfs.fast_listing = True
        cached = _plus_replies(c, dfh, 1500)
        assert cached == general
        assert _plus_replies(c, dfh, 1500, between=nfs.prefetch_listing) == general
        return cached[1]

    nfs.listings.settle_ns = 10**18  # never settled: no snapshot
    both()
    assert not nfs.listings._snaps
    nfs.listings.settle_ns = 0
    both()
    assert len(nfs.listings._snaps) == 1
    snap = next(iter(nfs.listings._snaps.values()))
    both()  # served from the same snapshot
    assert next(iter(nfs.listings._snaps.values())) is snap
    # Attributes are re-read for every reply: a write shows up at once.
    with open(os.path.join(d, "f5xxxxx"), "ab") as f:
        f.write(b"more data")
    os.chmod(os.path.join(d, "f7xxxxxxx"), 0o600)
    both()
    assert next(iter(nfs.listings._snaps.values())) is snap
    # A namespace change (the directory's mtime/ctime) replaces the snapshot.
    open(os.path.join(d, "new-file"), "w").close()
    os.unlink(os.path.join(d, "f9"))
    os.listdir(d)  # settle the directory's atime (relatime) before comparing
    names = both()
    assert b"new-file" in names and b"f9" not in names
    assert next(iter(nfs.listings._snaps.values())) is not snap


def test_listing_cache_bounds():
    from storaged.nfs.dirlist import ListingCache, Snapshot

    cache = ListingCache(max_dirs=2, max_bytes=250, max_dir_bytes=200, settle_ns=1000)
    index = struct.pack("=QQQQ", 5, 40, 9, 100)
    snaps = [Snapshot((i, i, i), bytes(100), index) for i in range(3)]
    for i, s in enumerate(snaps):
        cache.put(i, s)
    assert list(cache._snaps) == [1, 2] and cache.bytes == 200
    assert cache.get(1, (0, 0, 0)) is None and list(cache._snaps) == [2]  # stale stamp
    cache.put(9, Snapshot((0, 0, 0), bytes(201), index))  # too big for one directory
    assert cache._snaps[9].complete is False and cache._snaps[9].slice(0, 1000) is None
    assert Snapshot((0, 0, 0), bytes(100), index, complete=False).slice(0, 1000) is None
    assert cache.settled(0, 0, now=1001) and not cache.settled(0, 1, now=1001)
    s = snaps[2]
    assert s.slice(0, 40)[1:] == (1, False) and s.slice(0, 39)[1:] == (0, False)
    assert s.slice(5, 60)[1:] == (1, True) and s.slice(9, 0)[1:] == (0, True)
    assert s.slice(1234, 100) is None


@pytest.mark.root
def test_prefetched_attributes_are_retired_by_a_write(tmp_path):
    d, server, c = _serve(tmp_path, 150, squash="none", attr_timeout=0)
    nfs = server.nfs
    nfs.listings.settle_ns = 0
    dfh = c.lookup(c.mnt("/export"), b"d")
    args = {"dir": dfh, "cookie": 0, "cookieverf": bytes(8), "dircount": 1500,
            "maxcount": 1500}
    _status, res = c.nfs("READDIRPLUS", args)
    nfs.prefetch_listing()
    assert nfs._ready is not None
    entries = res["reply"]["entries"]
    _status, nxt = c.nfs("READDIRPLUS", dict(args, cookie=entries[-1]["cookie"]))
    nfs.prefetch_listing()
    # Write (through NFS) to a file in the prefetched slice: its new size must show.
    victim = nxt["reply"]["entries"][0]
    fh = c.lookup(dfh, victim["name"])
    assert c.write(fh, 0, b"z" * 5000)[0] == 0
    _status, again = c.nfs("READDIRPLUS", dict(args, cookie=entries[-1]["cookie"]))
    assert again["reply"]["entries"][0]["name"] == victim["name"]
    assert again["reply"]["entries"][0]["name_attributes"].size == 5000
    # Too old: not used either (a local change, not seen by the generation count).
    nfs.prefetch_listing()
    with open(os.path.join(d, victim["name"].decode()), "ab") as f:
        f.write(b"q")
    nfs.PREFETCH_MAX_AGE_NS = 0
    _status, again = c.nfs("READDIRPLUS", dict(args, cookie=entries[-1]["cookie"]))
    assert again["reply"]["entries"][0]["name_attributes"].size == 5001


def _listing(c, fh, count=1500):
    """name -> attributes of a whole READDIRPLUS listing of ``fh``."""
    cookie, out = 0, {}
    while True:
        status, res = c.nfs("READDIRPLUS", {"dir": fh, "cookie": cookie,
                                            "cookieverf": bytes(8), "dircount": count,
                                            "maxcount": count})
        assert status == 0
        for e in res["reply"]["entries"]:
            out[e["name"]] = e["name_attributes"]
        if res["reply"]["eof"]:
            return out
        cookie = res["reply"]["entries"][-1]["cookie"]


@pytest.mark.root
def test_attr_timeout_reuses_attributes_and_every_change_voids_them(tmp_path):
    """attr_timeout: a second listing reuses the first one's attributes (a local change
    stays unseen until it expires), but every NFS procedure that changes a listed file or
    directory shows in the very next listing."""
    from tests.nfs_client import sattr

    d, server, c = _serve(tmp_path, 150, squash="none", attr_timeout=60)
    export, _path = server.exports.for_path("/export")  # type: ignore[misc]
    nfs = server.nfs
    nfs.listings.settle_ns = 0
    dfh = c.lookup(c.mnt("/export"), b"d")
    sub = c.lookup(dfh, b"sub")
    first = _listing(c, dfh)
    assert len(first) == 150 + 6
    assert all(nfs.listings._snaps) and next(iter(nfs.listings._snaps.values())).fresh

    # Reused: a change made behind storaged's back is not seen within attr_timeout.
    with open(os.path.join(d, "f10x"), "ab") as f:
        f.write(b"local")
    assert _listing(c, dfh)[b"f10x"].size == 10

    def check(name, what, expect):
        got = getattr(_listing(c, dfh)[name], what)
        assert got == expect, (name, what, got, expect)
        assert getattr(_listing(c, dfh)[name], what) == expect  # and cached again

    def moved(fn):  # the directory "sub" after fn: its mtime in d's listing must follow
        time.sleep(0.02)  # past the timestamp tick
        assert fn()[0] == 0
        check(b"sub", "mtime", os.stat(os.path.join(d, "sub")).st_mtime_ns)
        check(b"sub", "nlink", os.stat(os.path.join(d, "sub")).st_nlink)

    f20 = c.lookup(dfh, b"f20xx")
    assert c.write(f20, 0, b"w" * 100)[0] == 0                      # WRITE
    check(b"f20xx", "size", 100)
    assert c.nfs("SETATTR", {"object": f20, "new_attributes": sattr(mode=0o600),
                             "guard": None})[0] == 0                # SETATTR
    check(b"f20xx", "mode", 0o600)
    f10 = c.lookup(dfh, b"f10x")
    assert c.nfs("COMMIT", {"file": f10, "offset": 0, "count": 0})[0] == 0  # COMMIT
    check(b"f10x", "size", 15)
    moved(lambda: c.nfs("CREATE", {"where": {"dir": sub, "name": b"c"},
                                   "how": (0, sattr(mode=0o644))}))  # CREATE
    moved(lambda: c.nfs("MKDIR", {"where": {"dir": sub, "name": b"m"},
                                  "attributes": sattr(mode=0o755)}))  # MKDIR
    moved(lambda: c.nfs("SYMLINK", {"where": {"dir": sub, "name": b"s"},
                                    "symlink": {"symlink_attributes": sattr(),
                                                "symlink_data": b"c"}}))  # SYMLINK
    moved(lambda: c.nfs("MKNOD", {"where": {"dir": sub, "name": b"p"},
                                  "what": (FileType.FIFO, sattr(mode=0o644))}))  # MKNOD
    moved(lambda: c.nfs("LINK", {"file": f20, "link": {"dir": sub, "name": b"l"}}))  # LINK
    check(b"f20xx", "nlink", 2)
    moved(lambda: c.nfs("REMOVE", {"object": {"dir": sub, "name": b"l"}}))  # REMOVE
    check(b"f20xx", "nlink", 1)
    moved(lambda: c.nfs("RMDIR", {"object": {"dir": sub, "name": b"m"}}))  # RMDIR
    # RENAME: a hard link of f30 in sub replaces another name; f30's nlink drops.
    f30 = c.lookup(dfh, b"f30xxx")
    assert c.nfs("LINK", {"file": f30, "link": {"dir": sub, "name": b"x"}})[0] == 0
    check(b"f30xxx", "nlink", 2)
    moved(lambda: c.nfs("RENAME", {"from": {"dir": sub, "name": b"c"},
                                   "to": {"dir": sub, "name": b"x"}}))  # RENAME
    check(b"f30xxx", "nlink", 1)

    # A procedure that fails changes nothing, but voids conservatively all the same.
    assert c.nfs("REMOVE", {"object": {"dir": sub, "name": b"absent"}})[0] != 0
    assert nfs.attrs_void == nfs.generation
    _listing(c, dfh)  # re-read, cached again
    # Expiry: the local change is seen once attr_timeout has passed.
    with open(os.path.join(d, "f40xxxx"), "ab") as f:
        f.write(b"local")
    assert _listing(c, dfh)[b"f40xxxx"].size == 40
    export.attr_timeout_ns = 50_000_000
    time.sleep(0.06)
    assert _listing(c, dfh)[b"f40xxxx"].size == 45


@pytest.mark.root
def test_attr_timeout_zero_and_many_changes(tmp_path):
    """attr_timeout=0 re-reads every time; past MAX_CHANGED changed handles everything
    cached is voided (the changed-handle list stays bounded)."""
    d, server, c = _serve(tmp_path, 60, squash="none", attr_timeout=0)
    export, _path = server.exports.for_path("/export")  # type: ignore[misc]
    nfs = server.nfs
    nfs.listings.settle_ns = 0
    dfh = c.lookup(c.mnt("/export"), b"d")
    _listing(c, dfh)
    assert not next(iter(nfs.listings._snaps.values())).fresh
    with open(os.path.join(d, "f10x"), "ab") as f:
        f.write(b"local")
    assert _listing(c, dfh)[b"f10x"].size == 15
    export.attr_timeout_ns = 60 * 10**9
    nfs.MAX_CHANGED = 3
    _listing(c, dfh)
    with open(os.path.join(d, "f11xx"), "ab") as f:
        f.write(b"local")
    handles = [c.lookup(dfh, n) for n in (b"f1x", b"f2xx", b"f3xxx", b"f4xxxx")]
    for fh in handles[:3]:
        assert c.write(fh, 0, b"")[0] == 0
    assert len(nfs.changed) == 3 and _listing(c, dfh)[b"f11xx"].size == 11
    assert c.write(handles[3], 0, b"")[0] == 0
    assert not nfs.changed and nfs.attrs_void == nfs.generation
    assert _listing(c, dfh)[b"f11xx"].size == 16
