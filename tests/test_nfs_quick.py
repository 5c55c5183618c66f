"""The NFS READ/WRITE quick path (storaged.nfs.quick) against the general path
(RpcService.run through the XDR tables and Nfs3.read/write).

One server over a host directory; every generated call runs the general way
first, the file is put back as it was, then the call runs as the TCP shell
runs it (``run_inline``: quick where it can).  The two replies must be the
same bytes.  ctime cannot be put back, so the backend reports it as 0.
Needs root (open_by_handle_at, file owners).
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from storaged.nas.exports import Export, LiveExport
from storaged.nas.hostfs import HostFs
from storaged.nfs import nfs3
from storaged.nfs import quick as quickmod
from storaged.nfs.nfs3 import NFS_PROGRAM, READ3ARGS, Stat
from storaged.nfs.rpc import AUTH_SYS, Call, Cred, FileRange, decode_reply
from storaged.nfs.server import NfsServer
from tests.nfs_client import LocalClient, sattr

pytestmark = pytest.mark.root

KEY = "22" * 16
SIZE = 200 << 10  # above the 64 KiB sendfile threshold
PEERS = (("127.0.0.1", 700), ("127.0.0.1", 40000), ("192.168.7.7", 700))
CREDS = (Cred(AUTH_SYS, 0, 0), Cred(AUTH_SYS, 1000, 1000), Cred(AUTH_SYS, 2000, 2000, (5,)),
         Cred())


class NoCtimeFs(HostFs):
    """HostFs whose attributes say ctime 0 (a test cannot set ctime back)."""

    def _attr(self, st):  # noqa: ANN001, ANN202
        a = super()._attr(st)
        a.ctime = 0
        return a


class Env:
    def __init__(self, tmp_path, attr_timeout: float = 0.0) -> None:  # noqa: ANN001
        self.root = str(tmp_path / "export")
        os.makedirs(os.path.join(self.root, "ro"))
        self.server = NfsServer(write_verifier=b"VERIFIER")
        self.rw = Export(path="/export", directory=self.root, export_id=0x1234,
                         handle_key=KEY, clients=["127.0.0.1"], squash="root",
                         anonuid=3000, anongid=3000, attr_timeout=attr_timeout)
        self.ro = Export(path="/ro", directory=os.path.join(self.root, "ro"),
                         export_id=0x4321, handle_key=KEY, read_only=True, secure=True,
                         squash="none", attr_timeout=attr_timeout)
        for rec in (self.rw, self.ro):
            rec.validate()
        self.fs = {r.export_id: NoCtimeFs(r.directory, fsid=r.export_id)
                   for r in (self.rw, self.ro)}
        self.set_exports()
        self.files: dict[str, str] = {}
        for name, mode, uid in (("a", 0o666, 0), ("priv", 0o600, 1000),
                                ("shared", 0o664, 2000), ("ro/b", 0o644, 0)):
            path = os.path.join(self.root, name)
            with open(path, "wb") as f:
                f.write(os.urandom(SIZE))
            os.chown(path, uid, uid)
            os.chmod(path, mode)
            self.files[name] = path
        os.symlink("a", os.path.join(self.root, "link"))
        c = LocalClient(self.server.service)
        rootfh, rofh = c.mnt("/export"), c.mnt("/ro")
        self.handles = {n: c.lookup(rootfh, n.encode()) for n in ("a", "priv", "shared",
                                                                   "link")}
        self.handles["ro/b"] = c.lookup(rofh, b"b")
        self.handles["dir"] = rootfh
        open(os.path.join(self.root, "gone"), "wb").close()
        self.handles["gone"] = c.lookup(rootfh, b"gone")
        os.unlink(os.path.join(self.root, "gone"))
        a = self.handles["a"]
        self.handles["forged"] = a[:-1] + bytes([a[-1] ^ 1])
        self.handles["other export"] = a[:1] + struct.pack(">I", 0x9999) + a[5:]
        self.handles["short"] = a[:6]
        #: one scratch dict per pretend connection, as RpcConnection keeps them
        self.local = {p: {} for p in PEERS}

    def set_exports(self) -> None:
        self.server.exports.set([LiveExport(r, self.fs[r.export_id])
                                 for r in (self.rw, self.ro)])

    def snapshot(self) -> dict[str, tuple[bytes, int, int]]:
        out = {}
        for name, path in self.files.items():
            with open(path, "rb") as f:
                data = f.read()
            st_ = os.stat(path)  # after the read: it may have moved atime
            out[name] = (data, st_.st_atime_ns, st_.st_mtime_ns)
        return out

    def restore(self, snap: dict[str, tuple[bytes, int, int]]) -> None:
        for name, (data, atime, mtime) in snap.items():
            path = self.files[name]
            with open(path, "r+b") as f:
                f.write(data)
                f.truncate(len(data))
            os.utime(path, ns=(atime, mtime))

    def call(self, proc: int, args: bytes, peer: tuple[str, int], cred: Cred,
             zero_copy: bool = False) -> Call:
        return Call(7, NFS_PROGRAM, 3, proc, cred, memoryview(args), peer, zero_copy,
                    self.local[peer])


def _bytes(parts: list) -> bytes:
    out = bytearray()
    for p in parts:
        if type(p) is FileRange:
            out += os.pread(p.fd, p.count, p.offset)
            os.close(p.fd)
        else:
            out += p
    return bytes(out)


def _general(env: Env, call: Call) -> bytes:
    service = env.server.service
    return _bytes(service.run(call, service.lookup(call)))


def _quick(proc, call: Call) -> list | None:  # noqa: ANN001
    """What the procedure's quick path answers (None: it declines), as
    ``run_inline`` calls it: with the arguments its ``fast_args`` decoded."""
    args = proc.fast_args(call.args)
    return None if args is None else proc.quick(call, args)


def _as_shell_runs_it(env: Env, call: Call) -> tuple[bytes, bool]:
    """The reply ``run_inline`` gives, and whether the quick path gave it."""
    proc = env.server.service.lookup(call)
    parts = _quick(proc, call)
    took = parts is not None
    if parts is None:
        parts = env.server.service.run(call, proc)
    return _bytes(parts), took


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """attr_timeout 0: the tests change the files on the host between the two
    paths, which reused attributes (tests below) would rightly not see."""
    return Env(tmp_path_factory.mktemp("quick"))


def _read_args(fh: bytes, offset: int, count: int) -> bytes:
    return READ3ARGS.encode({"file": fh, "offset": offset, "count": count})


def _write_args(fh: bytes, offset: int, count: int, stable: int, data: bytes) -> bytes:
    n = len(fh)
    return (struct.pack(">I", n) + fh + bytes(-n & 3)
            + struct.pack(">QIiI", offset, count, stable, len(data)) + data
            + bytes(-len(data) & 3))


# Weighted towards calls that succeed, which the quick path answers itself.
HANDLES = ("a",) * 6 + ("priv", "shared") * 2 + ("ro/b", "link", "dir", "gone", "forged",
                                                  "other export", "short")
PEER = st.sampled_from(PEERS[:1] * 5 + PEERS)
CRED = st.sampled_from(CREDS[:3] * 2 + CREDS)
OFFSETS = st.one_of(st.sampled_from([0, 1, 4096, SIZE - 1, SIZE, SIZE + 10, 1 << 62]),
                    st.integers(0, SIZE))
COUNTS = st.one_of(st.sampled_from([0, 1, 4096, 65535, 65536, 1 << 20, (1 << 20) + 1,
                                    0xFFFFFFFF]), st.integers(0, 70000))
TAILS = st.sampled_from([b""] * 8 + [b"\0\0\0\0", b"x"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(HANDLES), offset=OFFSETS, count=COUNTS,
       peer=PEER, cred=CRED, zero_copy=st.booleans(), tail=TAILS,
       cut=st.sampled_from([0] * 6 + [1, 2, 3]))
def test_read_replies_are_the_general_paths(env, name, offset, count, peer, cred,
                                            zero_copy, tail, cut):
    args = _read_args(env.handles[name], offset, count) + tail
    args = args[:len(args) - cut] if cut and not tail else args
    snap = env.snapshot()
    want = _general(env, env.call(6, args, peer, cred, zero_copy))
    env.restore(snap)
    got, took = _as_shell_runs_it(env, env.call(6, args, peer, cred, zero_copy))
    env.restore(snap)
    event(f"quick path took it: {took}")
    assert got == want


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(HANDLES), offset=OFFSETS, peer=PEER, cred=CRED,
       stable=st.sampled_from([0, 1, 2] * 3 + [3, -1]),
       size=st.sampled_from([0, 1, 3, 4096, 5000]),
       less=st.sampled_from([0] * 6 + [-1, 1, 2]),
       tail=TAILS)
def test_write_replies_are_the_general_paths(env, name, offset, peer, cred, stable, size,
                                             less, tail):
    offset = min(offset, SIZE + 4096)  # keep the files small
    data = os.urandom(size)
    args = _write_args(env.handles[name], offset, max(size - less, 0), stable, data) + tail
    snap = env.snapshot()
    want = _general(env, env.call(7, args, peer, cred))
    after = env.snapshot()
    env.restore(snap)
    got, took = _as_shell_runs_it(env, env.call(7, args, peer, cred))
    # The same bytes reached the files, whichever path wrote them.
    assert {k: v[0] for k, v in env.snapshot().items()} == {k: v[0] for k, v in after.items()}
    env.restore(snap)
    event(f"quick path took it: {took}")
    assert _post_mtime_masked(got) == _post_mtime_masked(want)


def _post_mtime_masked(reply: bytes) -> bytes:
    """A WRITE reply with the post-op mtime zeroed when the write succeeded: two
    writes of the same bytes cannot give a file the same mtime."""
    if len(reply) != 164 or reply[28:36] != bytes(4) + struct.pack(">I", 1):
        return reply
    return reply[:132] + bytes(8) + reply[140:]


def test_plain_reads_and_writes_take_the_quick_path(env):
    peer, cred = PEERS[0], CREDS[1]
    fh = env.handles["a"]
    proc = env.server.service.lookup(env.call(6, b"", peer, cred))
    for _ in range(2):  # the first call routes the handle, the second uses the route
        parts = _quick(proc, env.call(6, _read_args(fh, 4096, 4096), peer, cred))
        assert parts is not None and _bytes(parts)[-4096:] == open(env.files["a"], "rb").read(
            8192)[4096:]
    wproc = env.server.service.lookup(env.call(7, b"", peer, CREDS[0]))
    snap = env.snapshot()
    parts = _quick(wproc, env.call(7, _write_args(fh, 0, 4, 0, b"abcd"), peer, CREDS[0]))
    assert parts is not None
    xid, astat, res = decode_reply(_bytes(parts)[4:])
    assert (xid, astat, struct.unpack_from(">I", res)[0]) == (7, 0, Stat.OK)
    assert open(env.files["a"], "rb").read(4) == b"abcd"
    env.restore(snap)
    # zero-copy READs above the threshold hand out a FileRange for sendfile
    parts = _quick(proc, env.call(6, _read_args(fh, 0, 65536), peer, cred,
                                        zero_copy=True))
    assert parts is not None and any(type(p) is FileRange for p in parts)
    _bytes(parts)


def _status(parts: list) -> int:
    _xid, astat, res = decode_reply(_bytes(parts)[4:])
    assert astat == 0
    return struct.unpack_from(">I", res)[0]


def test_routes_follow_export_changes(env):
    """A route remembered for a handle is dropped when the exports are set again
    (``storaged nfs export ...`` applies live): a now read-only export refuses."""
    peer, cred = PEERS[0], CREDS[0]
    fh = env.handles["a"]
    service = env.server.service
    snap = env.snapshot()
    call = env.call(7, _write_args(fh, 0, 4, 0, b"wxyz"), peer, cred)
    assert _status(service.run_inline(call)) == Stat.OK
    env.rw.read_only = True
    try:
        env.set_exports()
        assert _status(service.run_inline(env.call(7, _write_args(fh, 0, 4, 0, b"1234"),
                                                   peer, cred))) == Stat.ROFS
        env.rw.clients = ["10.0.0.0/8"]
        env.set_exports()
        assert _status(service.run_inline(env.call(6, _read_args(fh, 0, 4), peer, cred))
                       ) == Stat.ACCES
    finally:
        env.rw.read_only = False
        env.rw.clients = ["127.0.0.1"]
        env.set_exports()
    env.restore(snap)
    assert open(env.files["a"], "rb").read(4) == snap["a"][0][:4]


def test_a_file_deleted_after_routing_is_stale(env, tmp_path):
    peer, cred = PEERS[0], CREDS[0]
    service = env.server.service
    c = LocalClient(service)
    path = os.path.join(env.root, "brief")
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    fh = c.lookup(c.mnt("/export"), b"brief")
    assert _status(service.run_inline(env.call(6, _read_args(fh, 0, 10), peer, cred))) \
        == Stat.OK
    os.unlink(path)
    assert _status(service.run_inline(env.call(6, _read_args(fh, 0, 10), peer, cred))) \
        == Stat.STALE


def test_route_cache_is_bounded(env, monkeypatch):
    monkeypatch.setattr(quickmod, "MAX_FILES", 3)
    local: dict = {}
    service = env.server.service
    for name in ("a", "priv", "shared", "a", "shared"):
        call = Call(1, NFS_PROGRAM, 3, 6, CREDS[0], memoryview(
            _read_args(env.handles[name], 0, 1)), PEERS[0], False, local)
        assert service.run_inline(call) is not None
        assert len(local) <= 3


def test_a_disk_error_on_read_is_nfs3err_io(env, monkeypatch):
    """pread failing with EIO: the quick path declines, the general path answers
    NFS3ERR_IO (not an RPC SYSTEM_ERR)."""
    def eio(*_args):  # noqa: ANN202
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(os, "pread", eio)
    call = env.call(6, _read_args(env.handles["a"], 0, 10), PEERS[0], CREDS[0])
    assert _status(env.server.service.run_inline(call)) == Stat.IO


def test_an_unexpected_quick_path_failure_falls_back(env, monkeypatch):
    service = env.server.service
    call = env.call(6, _read_args(env.handles["a"], 0, 10), PEERS[0], CREDS[0])
    want = _bytes(service.run(call, service.lookup(call)))

    def broken(_call, _args):  # noqa: ANN202
        raise RuntimeError("bug")
    monkeypatch.setattr(service.lookup(call), "quick", broken)
    assert _bytes(service.run_inline(call)) == want


# ---------------------------------------------------------------- attribute reuse


@pytest.fixture
def reuse(tmp_path, monkeypatch):
    """A server whose exports reuse attributes for 1 s, a fresh file on it, and a
    count of the attribute reads (fstat) the backend makes."""
    e = Env(tmp_path, attr_timeout=1.0)
    path = os.path.join(e.root, "b")
    with open(path, "wb") as f:
        f.write(b"b" * 100)
    os.chmod(path, 0o666)
    os.chown(path, 3000, 3000)  # the squashed root's: SETATTR may change its mode
    c = LocalClient(e.server.service)
    e.handles["b"] = c.lookup(c.mnt("/export"), b"b")
    e.stats = 0
    real = HostFs._stat

    def counted(self, fh):  # noqa: ANN001, ANN202
        e.stats += 1
        return real(self, fh)
    monkeypatch.setattr(HostFs, "_stat", counted)
    return e


def _read(env: Env, name: str, offset: int, count: int) -> tuple[dict, bool]:
    """A READ of ``name`` as the shell runs it: (READ3resok, quick path took it)."""
    got, took = _as_shell_runs_it(env, env.call(6, _read_args(env.handles[name], offset,
                                                              count), PEERS[0], CREDS[0]))
    status, res = nfs3.READ3RES.decode(decode_reply(got[4:])[2])
    assert status == Stat.OK, status
    return res, took


def _write(env: Env, name: str, offset: int, data: bytes) -> dict:
    got, took = _as_shell_runs_it(env, env.call(7, _write_args(env.handles[name], offset,
                                                               len(data), 0, data),
                                                PEERS[0], CREDS[0]))
    status, res = nfs3.WRITE3RES.decode(decode_reply(got[4:])[2])
    assert status == Stat.OK and took, status
    return res


def test_reads_inside_the_file_reuse_the_last_reads_attributes(reuse):
    first, _ = _read(reuse, "a", 0, 4096)
    n = reuse.stats
    for off in (4096, 8192, 100):
        res, took = _read(reuse, "a", off, 4096)
        assert took and res["file_attributes"] == first["file_attributes"]
        assert res["data"] == open(reuse.files["a"], "rb").read()[off:off + 4096]
    assert reuse.stats == n  # no attribute read after the first


def test_a_read_to_the_end_of_the_file_reads_its_size_afresh(reuse):
    """The file grew on the host: a READ ending at the old size is not answered
    eof from the reused attributes."""
    _read(reuse, "a", 0, 4096)
    with open(reuse.files["a"], "ab") as f:
        f.write(b"more")
    res, _ = _read(reuse, "a", SIZE - 4096, 4096)
    assert res["eof"] is False and res["file_attributes"].size == SIZE + 4
    res, _ = _read(reuse, "a", SIZE, 4096)
    assert (res["data"], res["eof"]) == (b"more", True)


def test_a_short_read_after_the_file_shrank_reads_afresh(reuse):
    _read(reuse, "a", 0, 4096)
    os.truncate(reuse.files["a"], 6000)
    res, _ = _read(reuse, "a", 4096, 4096)
    assert (len(res["data"]), res["eof"], res["file_attributes"].size) == (1904, True, 6000)


def test_any_modifying_procedure_ends_the_reuse(reuse):
    """A WRITE to another file moves the generation on: the next READ of ``b``
    reads its attributes again, and sees what a SETATTR through NFS did."""
    _read(reuse, "b", 0, 10)
    _write(reuse, "a", 0, b"x")
    n = reuse.stats
    _read(reuse, "b", 0, 10)
    assert reuse.stats == n + 1
    c = LocalClient(reuse.server.service)
    status, _ = c.nfs("SETATTR", {"object": reuse.handles["b"],
                                  "new_attributes": sattr(mode=0o640), "guard": None})
    assert status == Stat.OK
    res, _ = _read(reuse, "b", 0, 10)
    assert res["file_attributes"].mode == 0o640


def test_reuse_ends_after_attr_timeout(reuse, monkeypatch):
    _read(reuse, "a", 0, 4096)
    n = reuse.stats
    now = quickmod.time.monotonic_ns()
    monkeypatch.setattr(quickmod.time, "monotonic_ns", lambda: now + 1_000_000_000)
    _read(reuse, "a", 0, 4096)
    assert reuse.stats == n + 1


def test_attr_timeout_zero_reads_attributes_every_time(env, monkeypatch):
    calls = []
    real = HostFs._stat
    monkeypatch.setattr(HostFs, "_stat", lambda self, fh: calls.append(1) or real(self, fh))
    for _ in range(3):
        _read(env, "a", 0, 4096)
    assert len(calls) == 3


def test_writes_chain_their_wcc_attributes(reuse):
    """Back-to-back WRITEs to one file: each one's pre-op attributes are the
    previous one's post-op attributes, with one attribute read per WRITE (after)."""
    prev = _write(reuse, "a", 0, b"1111")
    n = reuse.stats
    for i in range(3):
        res = _write(reuse, "a", 4 * (i + 1), b"2222")
        before = res["file_wcc"]["before"]
        after = prev["file_wcc"]["after"]
        assert before == {"size": after.size, "mtime": _time(after.mtime),
                          "ctime": _time(after.ctime)}
        prev = res
    assert reuse.stats == n  # the after-attributes come from the write's own fstat
    assert open(reuse.files["a"], "rb").read(16) == b"1111222222222222"


def _time(ns: int) -> dict:
    return {"seconds": ns // 10**9, "nseconds": ns % 10**9}
