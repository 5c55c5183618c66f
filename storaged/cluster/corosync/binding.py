"""ctypes binding to corosync's client libraries: CPG, quorum, votequorum and cmap.

Why ctypes and not Cython: the libraries are small C APIs whose every call is
a cheap IPC round trip to the local corosync (libqb), so the binding is not a
hot path; ctypes needs no headers (Debian ships them only in
libcorosync-common-dev) and no compiler at install time, and a host without
corosync simply fails :func:`load` with a message naming the packages.  The
structures below are transcribed from corosync 3's ``cpg.h``, ``quorum.h``,
``votequorum.h`` and ``cmap.h``.

Every handle exposes its file descriptor (``fd``) for an event loop reader
and a ``dispatch()`` that runs the queued callbacks (``CS_DISPATCH_ALL``) in
the calling thread; callbacks only record events for the sans-IO core.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass

PACKAGES = "corosync libcpg4 libquorum5 libvotequorum8 libcmap4 libcorosync-common4"

# cs_error_t (corotypes.h)
CS_OK = 1
CS_ERR_TRY_AGAIN = 6
CS_DISPATCH_ALL = 2
CS_TRACK_CURRENT = 1
CS_TRACK_CHANGES = 2

# cpg.h
CPG_TYPE_AGREED = 2
CPG_MODEL_V1 = 1
CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF = 1
CPG_MAX_NAME_LENGTH = 128
REASON_JOIN, REASON_LEAVE, REASON_NODEDOWN, REASON_NODEUP, REASON_PROCDOWN = 1, 2, 3, 4, 5
REASONS = {1: "join", 2: "leave", 3: "nodedown", 4: "nodeup", 5: "procdown"}

_ERRORS = {2: "CS_ERR_LIBRARY (is corosync running in this network namespace?)",
           3: "CS_ERR_VERSION", 4: "CS_ERR_INIT", 5: "CS_ERR_TIMEOUT", 6: "CS_ERR_TRY_AGAIN",
           7: "CS_ERR_INVALID_PARAM", 8: "CS_ERR_NO_MEMORY", 9: "CS_ERR_BAD_HANDLE",
           10: "CS_ERR_BUSY", 11: "CS_ERR_ACCESS", 12: "CS_ERR_NOT_EXIST",
           13: "CS_ERR_NAME_TOO_LONG", 14: "CS_ERR_EXIST", 15: "CS_ERR_NO_SPACE",
           16: "CS_ERR_INTERRUPT", 17: "CS_ERR_NOT_SUPPORTED", 18: "CS_ERR_MESSAGE_ERROR",
           100: "CS_ERR_NO_SECTIONS", 101: "CS_ERR_CONTEXT_NOT_FOUND",
           102: "CS_ERR_TOO_MANY_GROUPS"}


class CorosyncError(OSError):
    """A corosync library call failed (``code`` is the cs_error_t)."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call}: {_ERRORS.get(code, code)}")
        self.code = code


def _check(call: str, rc: int) -> None:
    if rc != CS_OK:
        raise CorosyncError(call, rc)


class CpgName(ctypes.Structure):
    _fields_ = [("length", ctypes.c_uint32), ("value", ctypes.c_char * CPG_MAX_NAME_LENGTH)]

    @classmethod
    def of(cls, name: str) -> CpgName:
        raw = name.encode()
        if len(raw) > CPG_MAX_NAME_LENGTH:
            raise ValueError(f"CPG group name longer than {CPG_MAX_NAME_LENGTH} bytes")
        return cls(len(raw), raw)


class CpgAddress(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("reason", ctypes.c_uint32)]


class RingId(ctypes.Structure):
    """struct cpg_ring_id / quorum_ring_id: the totem ring (representative, seq)."""

    _fields_ = [("nodeid", ctypes.c_uint32), ("seq", ctypes.c_uint64)]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_u64 = ctypes.c_uint64
_DELIVER = ctypes.CFUNCTYPE(None, _u64, ctypes.POINTER(CpgName), ctypes.c_uint32,
                            ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
_CONFCHG = ctypes.CFUNCTYPE(None, _u64, ctypes.POINTER(CpgName),
                            ctypes.POINTER(CpgAddress), ctypes.c_size_t,
                            ctypes.POINTER(CpgAddress), ctypes.c_size_t,
                            ctypes.POINTER(CpgAddress), ctypes.c_size_t)
_TOTEM = ctypes.CFUNCTYPE(None, _u64, RingId, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
_QUORUM_NOTIFY = ctypes.CFUNCTYPE(None, _u64, ctypes.c_uint32, ctypes.c_uint64,
                                  ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))


class _CpgModelV1(ctypes.Structure):
    _fields_ = [("model", ctypes.c_int), ("deliver", _DELIVER), ("confchg", _CONFCHG),
                ("totem", _TOTEM), ("flags", ctypes.c_uint)]


class _QuorumCallbacks(ctypes.Structure):
    _fields_ = [("notify", _QUORUM_NOTIFY)]


class VotequorumInfo(ctypes.Structure):
    """struct votequorum_info (votequorum.h)."""

    _fields_ = [("node_id", ctypes.c_uint), ("node_state", ctypes.c_uint),
                ("node_votes", ctypes.c_uint), ("node_expected_votes", ctypes.c_uint),
                ("highest_expected", ctypes.c_uint), ("total_votes", ctypes.c_uint),
                ("quorum", ctypes.c_uint), ("flags", ctypes.c_uint),
                ("qdevice_votes", ctypes.c_uint), ("qdevice_name", ctypes.c_char * 255)]


VOTEQUORUM_INFO_TWONODE = 1
VOTEQUORUM_INFO_QUORATE = 2
VOTEQUORUM_INFO_WAIT_FOR_ALL = 4


@dataclass
class _Libs:
    cpg: ctypes.CDLL
    quorum: ctypes.CDLL
    votequorum: ctypes.CDLL
    cmap: ctypes.CDLL
    libc: ctypes.CDLL


_LIBS: _Libs | None = None


def _open(stem: str, soname: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(stem) or soname
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        raise RuntimeError(f"cannot load {soname} ({e}): install the Debian packages "
                           f"{PACKAGES}") from None


def load() -> _Libs:
    """Load the libraries once (RuntimeError naming the Debian packages if missing)."""
    global _LIBS
    if _LIBS is None:
        libs = _Libs(_open("cpg", "libcpg.so.4"), _open("quorum", "libquorum.so.5"),
                     _open("votequorum", "libvotequorum.so.8"), _open("cmap", "libcmap.so.4"),
                     ctypes.CDLL(None))
        h = ctypes.POINTER(_u64)
        libs.cpg.cpg_model_initialize.argtypes = [h, ctypes.c_int, ctypes.c_void_p,
                                                  ctypes.c_void_p]
        for fn in ("cpg_finalize",):
            getattr(libs.cpg, fn).argtypes = [_u64]
        libs.cpg.cpg_fd_get.argtypes = [_u64, ctypes.POINTER(ctypes.c_int)]
        libs.cpg.cpg_dispatch.argtypes = [_u64, ctypes.c_int]
        libs.cpg.cpg_join.argtypes = [_u64, ctypes.POINTER(CpgName)]
        libs.cpg.cpg_leave.argtypes = [_u64, ctypes.POINTER(CpgName)]
        libs.cpg.cpg_local_get.argtypes = [_u64, ctypes.POINTER(ctypes.c_uint)]
        libs.cpg.cpg_mcast_joined.argtypes = [_u64, ctypes.c_int, ctypes.POINTER(_IoVec),
                                              ctypes.c_uint]
        libs.quorum.quorum_initialize.argtypes = [h, ctypes.POINTER(_QuorumCallbacks),
                                                  ctypes.POINTER(ctypes.c_uint32)]
        libs.quorum.quorum_finalize.argtypes = [_u64]
        libs.quorum.quorum_fd_get.argtypes = [_u64, ctypes.POINTER(ctypes.c_int)]
        libs.quorum.quorum_dispatch.argtypes = [_u64, ctypes.c_int]
        libs.quorum.quorum_trackstart.argtypes = [_u64, ctypes.c_uint]
        libs.quorum.quorum_getquorate.argtypes = [_u64, ctypes.POINTER(ctypes.c_int)]
        libs.votequorum.votequorum_initialize.argtypes = [h, ctypes.c_void_p]
        libs.votequorum.votequorum_finalize.argtypes = [_u64]
        libs.votequorum.votequorum_getinfo.argtypes = [_u64, ctypes.c_uint,
                                                       ctypes.POINTER(VotequorumInfo)]
        libs.cmap.cmap_initialize.argtypes = [h]
        libs.cmap.cmap_finalize.argtypes = [_u64]
        libs.cmap.cmap_get_uint32.argtypes = [_u64, ctypes.c_char_p,
                                              ctypes.POINTER(ctypes.c_uint32)]
        libs.cmap.cmap_get_string.argtypes = [_u64, ctypes.c_char_p,
                                              ctypes.POINTER(ctypes.c_void_p)]
        libs.libc.free.argtypes = [ctypes.c_void_p]
        _LIBS = libs
    return _LIBS


def _retry(call: str, fn: Callable[[], int], tries: int = 50) -> None:
    """Call ``fn`` again while corosync answers CS_ERR_TRY_AGAIN (it is syncing)."""
    import time
    for _ in range(tries):
        rc = fn()
        if rc != CS_ERR_TRY_AGAIN:
            _check(call, rc)
            return
        time.sleep(0.02)
    _check(call, CS_ERR_TRY_AGAIN)


Member = tuple[int, int, int]  # (nodeid, pid, reason)


class Cpg:
    """One CPG connection joined to one group.

    Callbacks (run inside :meth:`dispatch`): ``on_deliver(nodeid, pid, bytes)``,
    ``on_confchg(members, left, joined)`` with lists of (nodeid, pid, reason),
    ``on_totem(ring_seq, ring_nodeid, nodes)``.
    """

    def __init__(self, group: str, on_deliver: Callable[[int, int, bytes], None],
                 on_confchg: Callable[[list[Member], list[Member], list[Member]], None],
                 on_totem: Callable[[int, int, list[int]], None]) -> None:
        self.libs = load()
        self.group = CpgName.of(group)
        self.handle = _u64(0)

        def deliver(_h: int, _g: object, nodeid: int, pid: int, msg: int, size: int) -> None:
            on_deliver(nodeid, pid, ctypes.string_at(msg, size))

        def confchg(_h: int, _g: object, m: object, nm: int, lf: object, nl: int,
                    jn: object, nj: int) -> None:
            def pairs(p: object, n: int) -> list[Member]:
                return [(p[i].nodeid, p[i].pid, p[i].reason) for i in range(n)]  # type: ignore[index]
            on_confchg(pairs(m, nm), pairs(lf, nl), pairs(jn, nj))

        def totem(_h: int, ring: RingId, n: int, nodes: object) -> None:
            on_totem(ring.seq, ring.nodeid, [nodes[i] for i in range(n)])  # type: ignore[index]

        # Keep the C callbacks alive as long as the handle.
        self._model = _CpgModelV1(CPG_MODEL_V1, _DELIVER(deliver), _CONFCHG(confchg),
                                  _TOTEM(totem), CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF)
        _check("cpg_model_initialize", self.libs.cpg.cpg_model_initialize(
            ctypes.byref(self.handle), CPG_MODEL_V1, ctypes.byref(self._model), None))
        fd = ctypes.c_int(-1)
        _check("cpg_fd_get", self.libs.cpg.cpg_fd_get(self.handle, ctypes.byref(fd)))
        self.fd = fd.value
        nid = ctypes.c_uint(0)
        _check("cpg_local_get", self.libs.cpg.cpg_local_get(self.handle, ctypes.byref(nid)))
        self.nodeid = nid.value
        self.pid = os.getpid()
        self.joined = False

    def join(self) -> None:
        _retry("cpg_join", lambda: self.libs.cpg.cpg_join(self.handle, ctypes.byref(self.group)))
        self.joined = True

    def leave(self) -> None:
        if self.joined:
            self.joined = False
            _retry("cpg_leave",
                   lambda: self.libs.cpg.cpg_leave(self.handle, ctypes.byref(self.group)))

    def mcast(self, data: bytes) -> bool:
        """Send ``data`` to every group member in agreed (total) order; False when
        corosync asks to try again (it is synchronizing a new ring): the caller retries
        later instead of blocking its event loop."""
        buf = ctypes.create_string_buffer(data, len(data))
        iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
        rc = self.libs.cpg.cpg_mcast_joined(self.handle, CPG_TYPE_AGREED, ctypes.byref(iov), 1)
        if rc == CS_ERR_TRY_AGAIN:
            return False
        _check("cpg_mcast_joined", rc)
        return True

    def dispatch(self) -> None:
        """Run every queued callback (call when :attr:`fd` is readable)."""
        rc = self.libs.cpg.cpg_dispatch(self.handle, CS_DISPATCH_ALL)
        if rc not in (CS_OK, CS_ERR_TRY_AGAIN):
            raise CorosyncError("cpg_dispatch", rc)

    def close(self) -> None:
        if self.handle.value:
            self.libs.cpg.cpg_finalize(self.handle)
            self.handle = _u64(0)


class Quorum:
    """libquorum tracking: ``on_quorum(quorate, ring_seq, nodes)`` on every change."""

    def __init__(self, on_quorum: Callable[[bool, int, list[int]], None]) -> None:
        self.libs = load()
        self.handle = _u64(0)

        def notify(_h: int, quorate: int, ring_seq: int, n: int, nodes: object) -> None:
            on_quorum(bool(quorate), ring_seq, [nodes[i] for i in range(n)])  # type: ignore[index]

        self._cb = _QuorumCallbacks(_QUORUM_NOTIFY(notify))
        qtype = ctypes.c_uint32(0)
        _check("quorum_initialize", self.libs.quorum.quorum_initialize(
            ctypes.byref(self.handle), ctypes.byref(self._cb), ctypes.byref(qtype)))
        self.quorum_type = qtype.value
        fd = ctypes.c_int(-1)
        _check("quorum_fd_get", self.libs.quorum.quorum_fd_get(self.handle, ctypes.byref(fd)))
        self.fd = fd.value
        _check("quorum_trackstart", self.libs.quorum.quorum_trackstart(
            self.handle, CS_TRACK_CURRENT | CS_TRACK_CHANGES))

    def dispatch(self) -> None:
        rc = self.libs.quorum.quorum_dispatch(self.handle, CS_DISPATCH_ALL)
        if rc not in (CS_OK, CS_ERR_TRY_AGAIN):
            raise CorosyncError("quorum_dispatch", rc)

    def close(self) -> None:
        if self.handle.value:
            self.libs.quorum.quorum_finalize(self.handle)
            self.handle = _u64(0)


def votequorum_info(nodeid: int = 0) -> VotequorumInfo:
    """votequorum's view of ``nodeid`` (0 = this node): votes, expected, quorum, flags."""
    libs = load()
    h = _u64(0)
    _check("votequorum_initialize", libs.votequorum.votequorum_initialize(ctypes.byref(h), None))
    try:
        info = VotequorumInfo()
        _check("votequorum_getinfo",
               libs.votequorum.votequorum_getinfo(h, nodeid, ctypes.byref(info)))
        return info
    finally:
        libs.votequorum.votequorum_finalize(h)


class Cmap:
    """Read-only access to corosync's configuration map (nodelist, totem timeouts)."""

    def __init__(self) -> None:
        self.libs = load()
        self.handle = _u64(0)
        _check("cmap_initialize", self.libs.cmap.cmap_initialize(ctypes.byref(self.handle)))

    def get_u32(self, key: str) -> int | None:
        v = ctypes.c_uint32(0)
        rc = self.libs.cmap.cmap_get_uint32(self.handle, key.encode(), ctypes.byref(v))
        if rc == 12:  # CS_ERR_NOT_EXIST
            return None
        _check(f"cmap_get_uint32({key})", rc)
        return v.value

    def get_str(self, key: str) -> str | None:
        p = ctypes.c_void_p(None)
        rc = self.libs.cmap.cmap_get_string(self.handle, key.encode(), ctypes.byref(p))
        if rc == 12:
            return None
        _check(f"cmap_get_string({key})", rc)
        try:
            return ctypes.string_at(p.value).decode(errors="replace") if p.value else ""
        finally:
            self.libs.libc.free(p)

    def nodelist(self) -> dict[int, str]:
        """{nodeid: name} from ``nodelist.node.N.{nodeid,name,ring0_addr}``."""
        out: dict[int, str] = {}
        for i in range(1024):
            nid = self.get_u32(f"nodelist.node.{i}.nodeid")
            if nid is None:
                break
            out[nid] = (self.get_str(f"nodelist.node.{i}.name")
                        or self.get_str(f"nodelist.node.{i}.ring0_addr") or f"node{nid}")
        return out

    def close(self) -> None:
        if self.handle.value:
            self.libs.cmap.cmap_finalize(self.handle)
            self.handle = _u64(0)


def read_cluster_info() -> dict[str, object]:
    """Cluster name, token timeout (ms) and node names, read once through cmap."""
    c = Cmap()
    try:
        return {"cluster_name": c.get_str("totem.cluster_name") or "",
                "token_ms": c.get_u32("runtime.config.totem.token") or 0,
                "consensus_ms": c.get_u32("runtime.config.totem.consensus") or 0,
                "nodes": c.nodelist()}
    finally:
        c.close()
