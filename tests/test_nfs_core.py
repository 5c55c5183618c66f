"""NFSv3 + MOUNT semantics through the sans-IO core, over a host directory.

Every procedure, its wcc/post-op attributes and error codes; file handles
(restart-stable, unique over time, bound to their export); export options
(client lists, ro, squashing, secure ports).  Needs root (open_by_handle_at).
"""

from __future__ import annotations

import os
import stat

import pytest

from storaged.nas.exports import Export, LiveExport
from storaged.nas.hostfs import HostFs
from storaged.nfs.nfs3 import Stat
from storaged.nfs.rpc import GARBAGE_ARGS, PROC_UNAVAIL, PROG_MISMATCH, PROG_UNAVAIL
from storaged.nfs.server import NfsServer
from tests.nfs_client import LocalClient, sattr

pytestmark = pytest.mark.root

KEY = "11" * 16


def make_server(tmp_path, **opts) -> tuple[NfsServer, str]:
    root = tmp_path / "export"
    root.mkdir(parents=True, exist_ok=True)
    rec = Export(path="/export", directory=str(root), export_id=0x1234, handle_key=KEY,
                 **opts)
    rec.validate()
    server = NfsServer(write_verifier=b"VERIFIER")
    server.exports.set([LiveExport(rec, HostFs(str(root), fsid=rec.export_id))])
    return server, str(root)


@pytest.fixture
def env(tmp_path):
    server, root = make_server(tmp_path, squash="none")
    c = LocalClient(server.service)
    return server, root, c, c.mnt("/export")


def test_mount_export_dump_umnt(env):
    server, root, c, rootfh = env
    assert c.mount("EXPORT") == [{"ex_dir": b"/export", "ex_groups": [b"*"]}]
    os.mkdir(os.path.join(root, "sub"))
    sub = c.mnt("/export/sub")
    assert sub == c.lookup(rootfh, b"sub")
    assert c.mount("MNT", b"/nope")[0] == 2  # MNT3ERR_NOENT
    assert c.mount("MNT", b"/export/missing")[0] == 2
    assert len(c.mount("DUMP")) == 2
    c.mount("UMNT", b"/export/sub")
    assert [m["ml_directory"] for m in c.mount("DUMP")] == [b"/export"]
    c.mount("UMNTALL")
    assert c.mount("DUMP") == []


def test_mount_by_host_directory(env, tmp_path):
    """An export is mountable by the host directory it serves, as by its pseudo path."""
    _s, root, c, rootfh = env
    os.mkdir(os.path.join(root, "sub"))
    assert c.mnt(root) == rootfh
    assert c.mnt(root + "/") == rootfh
    assert c.mnt(root + "/sub") == c.lookup(rootfh, b"sub")
    assert c.mount("MNT", (root + "/missing").encode())[0] == 2  # MNT3ERR_NOENT
    assert c.mount("MNT", (root + "x").encode())[0] == 2  # a sibling is not inside it
    assert c.mount("MNT", str(tmp_path).encode())[0] == 2  # nor is its parent


def test_getattr_lookup_access(env):
    _s, root, c, rootfh = env
    with open(os.path.join(root, "f"), "wb") as f:
        f.write(b"x" * 100)
    status, res = c.nfs("GETATTR", {"object": rootfh})
    assert status == 0 and res["obj_attributes"].type == 2
    status, res = c.nfs("LOOKUP", {"what": {"dir": rootfh, "name": b"f"}})
    assert status == 0
    assert res["obj_attributes"].size == 100
    assert res["obj_attributes"].fileid == os.stat(os.path.join(root, "f")).st_ino
    assert res["dir_attributes"] is not None
    status, res = c.nfs("LOOKUP", {"what": {"dir": rootfh, "name": b"missing"}})
    assert status == Stat.NOENT and res["dir_attributes"] is not None
    # ".." of the export root stays at the root
    assert c.lookup(rootfh, b"..") == rootfh
    status, res = c.nfs("LOOKUP", {"what": {"dir": rootfh, "name": b"a/b"}})
    assert status == Stat.ACCES
    status, res = c.nfs("ACCESS", {"object": rootfh, "access": 0x3F})
    assert status == 0 and res["access"] == 0x1F  # no EXECUTE bit for directories
    fh = c.lookup(rootfh, b"f")
    c.set_user(1000, 1000)
    status, res = c.nfs("ACCESS", {"object": fh, "access": 0x3F})
    assert res["access"] == 0x01  # world-readable only


def test_read_write_commit_and_verifier(env):
    _s, root, c, rootfh = env
    fh = c.create(rootfh, b"data")
    status, res = c.write(fh, 0, b"hello world", stable=0)
    assert status == 0
    assert res["count"] == 11 and res["committed"] == 0 and res["verf"] == b"VERIFIER"
    assert res["file_wcc"]["before"]["size"] == 0 and res["file_wcc"]["after"].size == 11
    status, res = c.read(fh, 6, 100)
    assert status == 0 and bytes(res["data"]) == b"world" and res["eof"] is True
    assert res["count"] == 5 and res["file_attributes"].size == 11
    status, res = c.read(fh, 0, 5)
    assert bytes(res["data"]) == b"hello" and res["eof"] is False
    status, res = c.nfs("COMMIT", {"file": fh, "offset": 0, "count": 0})
    assert status == 0 and res["verf"] == b"VERIFIER"
    status, res = c.write(fh, 1 << 20, b"z", stable=2)
    assert res["committed"] == 2
    assert os.path.getsize(os.path.join(root, "data")) == (1 << 20) + 1
    # a directory is not readable as a file
    assert c.read(rootfh, 0, 10)[0] == Stat.ISDIR
    # count larger than the data sent is garbage in disguise
    status, _ = c.nfs("WRITE", {"file": fh, "offset": 0, "count": 10, "stable": 0,
                                "data": b"ab"})
    assert status == Stat.INVAL


def test_create_modes(env):
    _s, root, c, rootfh = env
    where = {"dir": rootfh, "name": b"g"}
    status, res = c.nfs("CREATE", {"where": where, "how": (1, sattr(mode=0o640))})
    assert status == 0 and res["obj_attributes"].mode == 0o640
    assert res["dir_wcc"]["before"] is not None and res["dir_wcc"]["after"] is not None
    assert stat.S_IMODE(os.stat(os.path.join(root, "g")).st_mode) == 0o640
    # GUARDED on an existing file: EXIST; UNCHECKED: fine (and truncates with size=0)
    c.write(res["obj"], 0, b"abc")
    status, _ = c.nfs("CREATE", {"where": where, "how": (1, sattr())})
    assert status == Stat.EXIST
    status, res = c.nfs("CREATE", {"where": where, "how": (0, sattr(size=0))})
    assert status == 0 and res["obj_attributes"].size == 0
    # EXCLUSIVE: a retransmission with the same verifier succeeds, another fails
    ex = {"dir": rootfh, "name": b"excl"}
    s1, r1 = c.nfs("CREATE", {"where": ex, "how": (2, b"12345678")})
    s2, r2 = c.nfs("CREATE", {"where": ex, "how": (2, b"12345678")})
    s3, _ = c.nfs("CREATE", {"where": ex, "how": (2, b"87654321")})
    assert (s1, s2, s3) == (0, 0, Stat.EXIST)
    assert r1["obj"] == r2["obj"]
    status, _ = c.nfs("CREATE", {"where": {"dir": rootfh, "name": b".."},
                                 "how": (0, sattr())})
    assert status == Stat.EXIST


def test_setattr_and_guard(env):
    _s, root, c, rootfh = env
    fh = c.create(rootfh, b"s")
    c.write(fh, 0, b"0123456789")
    status, res = c.nfs("SETATTR", {"object": fh, "new_attributes": sattr(mode=0o600, size=4,
                                                                            uid=123, gid=456),
                                    "guard": None})
    assert status == 0
    after = res["obj_wcc"]["after"]
    assert (after.mode, after.size, after.uid, after.gid) == (0o600, 4, 123, 456)
    assert res["obj_wcc"]["before"]["size"] == 10
    st = os.stat(os.path.join(root, "s"))
    assert (st.st_uid, st.st_gid, st.st_size) == (123, 456, 4)
    status, res = c.nfs("SETATTR", {"object": fh, "new_attributes": sattr(mode=0o644),
                                    "guard": {"seconds": 1, "nseconds": 2}})
    assert status == Stat.NOT_SYNC
    new_attrs = sattr()
    new_attrs["mtime"] = (2, {"seconds": 1_000_000, "nseconds": 5})
    status, res = c.nfs("SETATTR", {"object": fh, "new_attributes": new_attrs, "guard": None})
    assert status == 0 and res["obj_wcc"]["after"].mtime == 1_000_000 * 10**9 + 5


def test_namespace_ops(env):
    _s, root, c, rootfh = env
    status, res = c.nfs("MKDIR", {"where": {"dir": rootfh, "name": b"d"},
                                  "attributes": sattr(mode=0o750)})
    assert status == 0 and res["obj_attributes"].type == 2 and res["obj_attributes"].mode == 0o750
    d = res["obj"]
    status, res = c.nfs("SYMLINK", {"where": {"dir": d, "name": b"ln"},
                                    "symlink": {"symlink_attributes": sattr(),
                                                "symlink_data": b"../target"}})
    assert status == 0 and res["obj_attributes"].type == 5
    status, res = c.nfs("READLINK", {"object": res["obj"]})
    assert status == 0 and res["data"] == b"../target"
    status, res = c.nfs("MKNOD", {"where": {"dir": d, "name": b"fifo"},
                                  "what": (7, sattr(mode=0o600))})
    assert status == 0 and res["obj_attributes"].type == 7
    status, res = c.nfs("MKNOD", {"where": {"dir": d, "name": b"reg"}, "what": (1, None)})
    assert status == Stat.BADTYPE
    f = c.create(rootfh, b"f")
    status, res = c.nfs("LINK", {"file": f, "link": {"dir": d, "name": b"hard"}})
    assert status == 0 and res["file_attributes"].nlink == 2
    assert res["linkdir_wcc"]["after"] is not None
    status, res = c.nfs("RENAME", {"from": {"dir": rootfh, "name": b"f"},
                                   "to": {"dir": d, "name": b"moved"}})
    assert status == 0 and res["fromdir_wcc"]["after"] is not None
    assert c.lookup(d, b"moved") == f  # handles survive renames
    status, _ = c.nfs("RMDIR", {"object": {"dir": rootfh, "name": b"d"}})
    assert status == Stat.NOTEMPTY
    status, _ = c.nfs("REMOVE", {"object": {"dir": rootfh, "name": b"d"}})
    assert status == Stat.ISDIR
    for name in (b"ln", b"fifo", b"hard", b"moved"):
        status, res = c.nfs("REMOVE", {"object": {"dir": d, "name": name}})
        assert status == 0, name
    status, res = c.nfs("RMDIR", {"object": {"dir": rootfh, "name": b"d"}})
    assert status == 0 and res["dir_wcc"]["before"] is not None
    assert os.listdir(root) == []
    status, res = c.nfs("REMOVE", {"object": {"dir": rootfh, "name": b"gone"}})
    assert status == Stat.NOENT and res["dir_wcc"]["after"] is not None


def _readdir_all(c, dirfh, plus, count=2048):
    names, cookie, rounds = [], 0, 0
    while True:
        rounds += 1
        if plus:
            status, res = c.nfs("READDIRPLUS", {"dir": dirfh, "cookie": cookie,
                                                "cookieverf": bytes(8), "dircount": count,
                                                "maxcount": count})
        else:
            status, res = c.nfs("READDIR", {"dir": dirfh, "cookie": cookie,
                                            "cookieverf": bytes(8), "count": count})
        assert status == 0
        for e in res["reply"]["entries"]:
            names.append(e)
            cookie = e["cookie"]
        if res["reply"]["eof"]:
            return names, rounds


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_cookies_are_stable(env, plus):
    _s, root, c, rootfh = env
    for i in range(300):
        open(os.path.join(root, f"file{i:03d}"), "w").close()
    entries, rounds = _readdir_all(c, rootfh, plus)
    names = sorted(e["name"] for e in entries)
    assert names == sorted([b".", b".."] + [f"file{i:03d}".encode() for i in range(300)])
    assert rounds > 3
    if plus:
        e = next(e for e in entries if e["name"] == b"file007")
        assert e["name_handle"] == c.lookup(rootfh, b"file007")
        assert e["name_attributes"].type == 1
    # Resume from a cookie in the middle after deleting entries before and after it:
    # nothing that remains is skipped or repeated (kernel d_off cookies are stable).
    mid = entries[len(entries) // 2]["cookie"]
    seen_after = [e["name"] for e in entries[len(entries) // 2 + 1:]]
    for name in (entries[3]["name"], seen_after[5]):
        os.unlink(os.path.join(root, name.decode()))
    status, res = c.nfs("READDIR", {"dir": rootfh, "cookie": mid, "cookieverf": bytes(8),
                                    "count": 1 << 20})
    got = [e["name"] for e in res["reply"]["entries"]]
    assert got == [n for n in seen_after if n != seen_after[5]]
    status, res = c.nfs("READDIR", {"dir": rootfh, "cookie": 0, "cookieverf": bytes(8),
                                    "count": 60})
    assert status == Stat.TOOSMALL


def test_fsstat_fsinfo_pathconf(env):
    _s, _root, c, rootfh = env
    status, res = c.nfs("FSINFO", {"object": rootfh})
    assert status == 0 and res["rtmax"] >= 1 << 20 and res["wtmax"] >= 1 << 20
    assert res["properties"] & 0x1B == 0x1B
    status, res = c.nfs("FSSTAT", {"object": rootfh})
    assert status == 0 and res["tbytes"] > 0 and res["obj_attributes"] is not None
    status, res = c.nfs("PATHCONF", {"object": rootfh})
    assert status == 0 and res["name_max"] == 255 and res["case_preserving"]
    assert c.nfs("NULL") is None


def test_handles_are_stable_unique_and_bound_to_export(env, tmp_path):
    server, root, c, rootfh = env
    fh = c.create(rootfh, b"f")
    # A restart: a new server and filesystem over the same directory and record.
    server2, _ = make_server(tmp_path, squash="none")
    c2 = LocalClient(server2.service)
    assert c2.nfs("GETATTR", {"object": fh})[0] == 0
    assert c2.lookup(rootfh, b"f") == fh
    # Deleted and recreated: a new handle; the old one is stale.
    os.unlink(os.path.join(root, "f"))
    assert c.nfs("GETATTR", {"object": fh})[0] == Stat.STALE
    assert c.read(fh, 0, 1)[0] == Stat.STALE
    fh2 = c.create(rootfh, b"f")
    assert fh2 != fh
    assert c.nfs("GETATTR", {"object": fh})[0] == Stat.STALE
    # Tampered handles and handles moved to another export are refused.
    bad = bytearray(fh2)
    bad[-1] ^= 1
    assert c.nfs("GETATTR", {"object": bytes(bad)})[0] == Stat.BADHANDLE
    other = bytearray(fh2)
    other[1:5] = (0x9999).to_bytes(4, "big")
    assert c.nfs("GETATTR", {"object": bytes(other)})[0] == Stat.STALE
    assert c.nfs("GETATTR", {"object": b"\x01abc"})[0] == Stat.BADHANDLE
    second = tmp_path / "second"
    second.mkdir()
    rec2 = Export(path="/second", directory=str(second), export_id=0x5678, handle_key="22" * 16)
    live = list(server.exports.by_id.values())
    server.exports.set(live + [LiveExport(rec2, HostFs(str(second), fsid=0x5678))])
    moved = bytearray(fh2)
    moved[1:5] = (0x5678).to_bytes(4, "big")
    assert c.nfs("GETATTR", {"object": bytes(moved)})[0] == Stat.BADHANDLE


def test_client_list_and_secure_port(tmp_path):
    server, root = make_server(tmp_path, clients=["10.1.0.0/16", "192.168.1.7"])
    inside = LocalClient(server.service, peer=("10.1.2.3", 900))
    outside = LocalClient(server.service, peer=("127.0.0.1", 900))
    rootfh = inside.mnt("/export")
    assert outside.mount("MNT", b"/export")[0] == 13  # MNT3ERR_ACCES
    assert outside.nfs("GETATTR", {"object": rootfh})[0] == Stat.ACCES
    assert inside.nfs("GETATTR", {"object": rootfh})[0] == 0
    server, root = make_server(tmp_path / "s", secure=True)
    high = LocalClient(server.service, peer=("127.0.0.1", 40000))
    low = LocalClient(server.service, peer=("127.0.0.1", 800))
    assert high.mount("MNT", b"/export")[0] == 13
    rootfh = low.mnt("/export")
    assert high.nfs("GETATTR", {"object": rootfh})[0] == Stat.ACCES


def test_read_only_export(tmp_path):
    server, root = make_server(tmp_path, read_only=True)
    with open(os.path.join(root, "f"), "w") as f:
        f.write("ro")
    c = LocalClient(server.service)
    rootfh = c.mnt("/export")
    fh = c.lookup(rootfh, b"f")
    assert bytes(c.read(fh, 0, 10)[1]["data"]) == b"ro"
    assert c.write(fh, 0, b"x")[0] == Stat.ROFS
    for name, args in [
        ("CREATE", {"where": {"dir": rootfh, "name": b"n"}, "how": (0, sattr())}),
        ("MKDIR", {"where": {"dir": rootfh, "name": b"n"}, "attributes": sattr()}),
        ("REMOVE", {"object": {"dir": rootfh, "name": b"f"}}),
        ("SETATTR", {"object": fh, "new_attributes": sattr(mode=0), "guard": None}),
        ("RENAME", {"from": {"dir": rootfh, "name": b"f"}, "to": {"dir": rootfh, "name": b"g"}}),
        ("COMMIT", {"file": fh, "offset": 0, "count": 0}),
    ]:
        assert c.nfs(name, args)[0] == Stat.ROFS, name
    assert c.nfs("ACCESS", {"object": fh, "access": 0x3F})[1]["access"] & 0x1C == 0
    assert os.listdir(root) == ["f"]


def test_root_squash_and_all_squash(tmp_path):
    server, root = make_server(tmp_path, squash="root", anonuid=4242, anongid=4343)
    os.chmod(root, 0o777)
    c = LocalClient(server.service, uid=0, gid=0)
    rootfh = c.mnt("/export")
    fh = c.create(rootfh, b"by-root")
    st = os.stat(os.path.join(root, "by-root"))
    assert (st.st_uid, st.st_gid) == (4242, 4343)  # uid 0 was squashed
    c.set_user(1000, 1000)
    c.create(rootfh, b"by-user")
    st = os.stat(os.path.join(root, "by-user"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    # squashed root cannot read a 0600 file of another user
    with open(os.path.join(root, "secret"), "w") as f:
        f.write("s")
    os.chmod(os.path.join(root, "secret"), 0o600)
    c.set_user(0, 0)
    sfh = c.lookup(rootfh, b"secret")
    assert c.read(sfh, 0, 1)[0] == Stat.ACCES
    assert c.nfs("SETATTR", {"object": sfh, "new_attributes": sattr(mode=0o777),
                             "guard": None})[0] == Stat.PERM
    assert c.read(fh, 0, 1)[0] == 0
    server, root = make_server(tmp_path / "all", squash="all", anonuid=7, anongid=8)
    os.chmod(root, 0o777)
    c = LocalClient(server.service, uid=1000, gid=1000)
    c.create(c.mnt("/export"), b"x")
    st = os.stat(os.path.join(root, "x"))
    assert (st.st_uid, st.st_gid) == (7, 8)
    c = LocalClient(server.service, uid=None)  # AUTH_NONE is anonymous too
    c.create(c.mnt("/export"), b"y")
    assert os.stat(os.path.join(root, "y")).st_uid == 7


def test_permissions_are_the_callers(env):
    _s, root, c, rootfh = env
    os.mkdir(os.path.join(root, "private"), 0o700)
    priv = c.lookup(rootfh, b"private")
    c.set_user(1000, 1000)
    status, _ = c.nfs("LOOKUP", {"what": {"dir": priv, "name": b"x"}})
    assert status == Stat.ACCES
    status, _ = c.nfs("CREATE", {"where": {"dir": priv, "name": b"x"}, "how": (0, sattr())})
    assert status == Stat.ACCES
    status, res = c.nfs("READDIR", {"dir": priv, "cookie": 0, "cookieverf": bytes(8),
                                    "count": 4096})
    assert status == Stat.ACCES


def test_rpc_level_errors(env):
    server, _root, c, rootfh = env
    assert c.call(100003, 2, 0)[0] == PROG_MISMATCH
    assert c.call(100003, 3, 22)[0] == PROC_UNAVAIL
    assert c.call(200000, 1, 0)[0] == PROG_UNAVAIL
    assert c.call(100003, 3, 1, b"\0\0\0")[0] == GARBAGE_ARGS
    assert c.call(100005, 3, 1, b"\xff\xff\xff\xff")[0] == GARBAGE_ARGS


def test_commit_leaves_the_descriptor_cache_alone(env):
    """COMMIT runs in a worker thread: it must not add to or evict from the
    descriptor cache the event-loop thread reads through without the lock."""
    server, root, c, rootfh = env
    fh = c.create(rootfh, b"sync-me")
    assert c.write(fh, 0, b"data", stable=0)[0] == 0
    fs = server.exports.by_path["/export"].fs
    fs._cache.clear()                    # as if evicted: COMMIT must open its own
    before = dict(fs._cache)
    status, res = c.nfs("COMMIT", {"file": fh, "offset": 0, "count": 0})
    assert status == 0 and res["file_wcc"]["after"].size == 4
    assert fs._cache == before
    os.unlink(os.path.join(root, "sync-me"))
    status, _res = c.nfs("COMMIT", {"file": fh, "offset": 0, "count": 0})
    assert status == Stat.STALE
    assert fs._cache == before
