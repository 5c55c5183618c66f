"""NLM v4 (program 100021 version 4): byte-range locks for NFSv3 clients, sans-IO.

Wire format from RFC 1813 Appendix II ("Lock manager protocol", version 4)
and the Open Group XNFS specification (chapters 9-10, the v1-3 procedures
v4 widens to 64-bit offsets).  Locks live in ``storaged.nas.locks``.

Procedures: NULL, TEST, LOCK, CANCEL, UNLOCK; the asynchronous TEST_MSG,
LOCK_MSG, CANCEL_MSG, UNLOCK_MSG (their answers go back as a separate
*_RES call to the client's NLM) and the *_RES procedures themselves
(accepted and ignored: we never send *_MSG calls); GRANTED_RES; SHARE,
UNSHARE, NM_LOCK (a non-monitored, non-blocking LOCK) and FREE_ALL.

Semantics worth knowing (XNFS 10.x, Linux lockd as the reference server):

* A blocking LOCK that conflicts answers NLM4_BLOCKED; when the conflict
  goes away the lock is taken on the client's behalf and an NLM4_GRANTED
  call is sent to the client's NLM (found through the portmapper on the
  client's host).  A client that answers anything but NLM4_GRANTED, e.g.
  because it gave up, gets the lock released again.
* During the grace period after a restart only *reclaim* LOCK and SHARE
  requests are served; TEST, new LOCKs and CANCEL get
  NLM4_DENIED_GRACE_PERIOD; reclaims outside the grace period get it too.
* File handles are the NFS handles: malformed, forged or stale ones answer
  NLM4_STALE_FH; clients not on the export's list get NLM4_FAILED.  Like
  Linux, read (shared) locks are allowed on read-only exports; exclusive
  locks there get NLM4_ROFS.
* Ranges beyond 2**64 answer NLM4_FBIG.

Callbacks (GRANTED, *_RES) are not sent from here: they are queued as
``OutCall`` objects on ``outbox`` and ``wakeup()`` is called; the asyncio
shell (storaged.nfs.lockd) delivers them and reports back.  The grace
period is a flag the shell clears (``in_grace``); nothing here reads a
clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storaged.nas.exports import ExportTable, HandleError
from storaged.nas.fs import FsError
from storaged.nas.locks import BLOCKED, GRANTED, LockManager, Owner, Waiter, span
from storaged.nfs.rpc import Call, Procedure, Program
from storaged.nfs.xdr import (
    BOOL,
    INT32,
    UINT64,
    VOID,
    Enum,
    Opaque,
    String,
    Struct,
    Union,
)

log = logging.getLogger("storaged.nfs.nlm")

NLM_PROGRAM = 100021
NLM_V4 = 4
LM_MAXSTRLEN = 1024
MAXNETOBJ_SZ = 1024

# enum nlm4_stats (RFC 1813 Appendix II)
NLM4_GRANTED = 0
NLM4_DENIED = 1
NLM4_DENIED_NOLOCKS = 2
NLM4_BLOCKED = 3
NLM4_DENIED_GRACE_PERIOD = 4
NLM4_DEADLCK = 5
NLM4_ROFS = 6
NLM4_STALE_FH = 7
NLM4_FBIG = 8
NLM4_FAILED = 9

NLM4_STATS = Enum("nlm4_stats", range(10))
NETOBJ = Opaque(MAXNETOBJ_SZ, "netobj", copy=True)

NLM4_HOLDER = Struct("nlm4_holder", ("exclusive", BOOL), ("svid", INT32), ("oh", NETOBJ),
                     ("l_offset", UINT64), ("l_len", UINT64))
NLM4_TESTRPLY = Union("nlm4_testrply", NLM4_STATS, {NLM4_DENIED: NLM4_HOLDER}, default=VOID)
NLM4_RES = Struct("nlm4_res", ("cookie", NETOBJ), ("stat", NLM4_STATS))
NLM4_TESTRES = Struct("nlm4_testres", ("cookie", NETOBJ), ("test_stat", NLM4_TESTRPLY))
NLM4_LOCK = Struct("nlm4_lock", ("caller_name", String(LM_MAXSTRLEN)), ("fh", NETOBJ),
                   ("oh", NETOBJ), ("svid", INT32), ("l_offset", UINT64), ("l_len", UINT64))
NLM4_LOCKARGS = Struct("nlm4_lockargs", ("cookie", NETOBJ), ("block", BOOL),
                       ("exclusive", BOOL), ("alock", NLM4_LOCK), ("reclaim", BOOL),
                       ("state", INT32))
NLM4_CANCARGS = Struct("nlm4_cancargs", ("cookie", NETOBJ), ("block", BOOL),
                       ("exclusive", BOOL), ("alock", NLM4_LOCK))
NLM4_TESTARGS = Struct("nlm4_testargs", ("cookie", NETOBJ), ("exclusive", BOOL),
                       ("alock", NLM4_LOCK))
NLM4_UNLOCKARGS = Struct("nlm4_unlockargs", ("cookie", NETOBJ), ("alock", NLM4_LOCK))
FSH4_MODE = Enum("fsh4_mode", range(4))      # fsm_DN, fsm_DR, fsm_DW, fsm_DRW
FSH4_ACCESS = Enum("fsh4_access", range(4))  # fsa_NONE, fsa_R, fsa_W, fsa_RW
NLM4_SHARE = Struct("nlm4_share", ("caller_name", String(LM_MAXSTRLEN)), ("fh", NETOBJ),
                    ("oh", NETOBJ), ("mode", FSH4_MODE), ("access", FSH4_ACCESS))
NLM4_SHAREARGS = Struct("nlm4_shareargs", ("cookie", NETOBJ), ("share", NLM4_SHARE),
                        ("reclaim", BOOL))
NLM4_SHARERES = Struct("nlm4_shareres", ("cookie", NETOBJ), ("stat", NLM4_STATS),
                       ("sequence", INT32))
NLM4_NOTIFY = Struct("nlm4_notify", ("name", String(LM_MAXSTRLEN)), ("state", INT32))

PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("TEST", NLM4_TESTARGS, NLM4_TESTRES),
    2: ("LOCK", NLM4_LOCKARGS, NLM4_RES),
    3: ("CANCEL", NLM4_CANCARGS, NLM4_RES),
    4: ("UNLOCK", NLM4_UNLOCKARGS, NLM4_RES),
    5: ("GRANTED", NLM4_TESTARGS, NLM4_RES),
    6: ("TEST_MSG", NLM4_TESTARGS, VOID),
    7: ("LOCK_MSG", NLM4_LOCKARGS, VOID),
    8: ("CANCEL_MSG", NLM4_CANCARGS, VOID),
    9: ("UNLOCK_MSG", NLM4_UNLOCKARGS, VOID),
    11: ("TEST_RES", NLM4_TESTRES, VOID),
    12: ("LOCK_RES", NLM4_RES, VOID),
    13: ("CANCEL_RES", NLM4_RES, VOID),
    14: ("UNLOCK_RES", NLM4_RES, VOID),
    15: ("GRANTED_RES", NLM4_RES, VOID),
    20: ("SHARE", NLM4_SHAREARGS, NLM4_SHARERES),
    21: ("UNSHARE", NLM4_SHAREARGS, NLM4_SHARERES),
    22: ("NM_LOCK", NLM4_LOCKARGS, NLM4_RES),
    23: ("FREE_ALL", NLM4_NOTIFY, VOID),
}
PROC_NUMBERS = {name: num for num, (name, _a, _r) in PROCEDURES.items()}
#: *_MSG procedure -> (synchronous twin, *_RES procedure the answer is sent to).
_MSG = {6: (1, 11), 7: (2, 12), 8: (3, 13), 9: (4, 14)}
NLM_GRANTED_PROC = 5

# share access/mode bits (fsa_R = 1, fsa_W = 2; fsm_DR = 1, fsm_DW = 2)


@dataclass(slots=True)
class OutCall:
    """An RPC call this server must make to a client (GRANTED, *_RES, SM_NOTIFY).

    ``address`` is the client's IP; the shell finds the program's port with
    the portmapper there.  ``done(status)`` is called with the decoded
    result (None for a void result) or ``on_fail()`` after delivery failed.
    """

    address: str
    prog: int
    vers: int
    proc: int
    args: bytes
    res: Any = VOID
    done: Callable[[Any], None] | None = None
    attempts: int = 3
    what: str = ""


def host_name(caller_name: bytes) -> str:
    """A client's name as a str key (names are bytes on the wire; no charset assumed)."""
    return caller_name.decode("utf-8", "surrogateescape")


class Nlm:
    """The NLM v4 program over an export table and a lock manager."""

    def __init__(self, exports: ExportTable, locks: LockManager | None = None,
                 monitor: Callable[[str, str], None] | None = None) -> None:
        self.exports = exports
        self.locks = locks or LockManager()
        self.monitor = monitor  # (host, address) -> None: NSM bookkeeping, before granting
        self.forget: Callable[[str], None] | None = None  # host -> None: stop monitoring
        self.monitored: set[str] = set()
        self.in_grace = False
        self.outbox: list[OutCall] = []
        self.wakeup: Callable[[], None] = lambda: None

    def program(self) -> Program:
        prog = Program(NLM_PROGRAM, NLM_V4)
        for num, (name, args, res) in PROCEDURES.items():
            if num in _MSG:
                handler = self._msg_handler(num)
            elif name.endswith("_RES"):
                handler = self.ignore
            else:
                handler = getattr(self, name.lower())
            prog.procs[num] = Procedure(name, args, res, handler)
        return prog

    # -- helpers
    def _send(self, out: OutCall) -> None:
        self.outbox.append(out)
        self.wakeup()

    def _file(self, call: Call, fh: bytes, write: bool) -> tuple[int, Any]:
        """``(NLM4_GRANTED, file key)`` or ``(error status, None)`` for a handle."""
        try:
            export, inode = self.exports.resolve(fh)
        except HandleError:
            return NLM4_STALE_FH, None
        if not export.allows(call.peer[0]):
            return NLM4_FAILED, None
        try:
            export.fs.getattr(inode)
        except FsError as e:
            return (NLM4_STALE_FH if e.errno in (116, 2) else NLM4_FAILED), None
        except OSError:
            return NLM4_STALE_FH, None
        if write and export.record.read_only:
            return NLM4_ROFS, None
        return NLM4_GRANTED, (export.export_id, inode)

    def _range(self, call: Call, alock: dict[str, Any],
               write: bool) -> tuple[int, Any, int, int]:
        """``(NLM4_GRANTED, file key, start, end)`` for a lock's handle and byte
        range, or ``(error status, None, 0, 0)`` (NLM4_FBIG past 2**64)."""
        stat, file = self._file(call, alock["fh"], write)
        if file is None:
            return stat, None, 0, 0
        try:
            start, end = span(alock["l_offset"], alock["l_len"])
        except ValueError:
            return NLM4_FBIG, None, 0, 0
        return stat, file, start, end

    @staticmethod
    def _owner(alock: dict[str, Any]) -> Owner:
        return Owner(host_name(alock["caller_name"]), alock["svid"], alock["oh"])

    def _monitor(self, host: str, address: str) -> None:
        if host not in self.monitored:
            if self.monitor is not None:
                self.monitor(host, address)
            self.monitored.add(host)

    def _granted(self, waiters: list[Waiter]) -> None:
        """Send NLM4_GRANTED for locks taken on behalf of blocked requests."""
        for w in waiters:
            ctx = w.ctx or {}
            if not ctx.get("address"):
                continue
            args = NLM4_TESTARGS.encode({"cookie": ctx["cookie"], "exclusive": w.exclusive,
                                         "alock": ctx["alock"]})

            def done(res: Any, w: Waiter = w) -> None:
                if res is None or res["stat"] != NLM4_GRANTED:
                    log.info("client %s refused GRANTED: releasing its lock", w.owner.host)
                    self._granted(self.locks.unlock(w.file, w.owner, w.start, w.end))

            self._send(OutCall(ctx["address"], NLM_PROGRAM, NLM_V4, NLM_GRANTED_PROC, args,
                               NLM4_RES, done, attempts=5, what=f"GRANTED to {w.owner.host}"))

    # -- procedures
    def null(self, call: Call, args: Any) -> None:
        return None

    def ignore(self, call: Call, args: Any) -> None:
        return None

    def test(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        cookie = a["cookie"]
        if self.in_grace:
            return {"cookie": cookie, "test_stat": (NLM4_DENIED_GRACE_PERIOD, None)}
        alock = a["alock"]
        stat, file, start, end = self._range(call, alock, False)
        if file is None:
            return {"cookie": cookie, "test_stat": (stat, None)}
        lk = self.locks.conflict(file, self._owner(alock), start, end, a["exclusive"])
        if lk is None:
            return {"cookie": cookie, "test_stat": (NLM4_GRANTED, None)}
        holder = {"exclusive": lk.exclusive, "svid": lk.owner.svid, "oh": lk.owner.oh,
                  "l_offset": lk.start, "l_len": lk.length}
        return {"cookie": cookie, "test_stat": (NLM4_DENIED, holder)}

    def _lock(self, call: Call, a: dict[str, Any], monitored: bool) -> int:
        if self.in_grace and not a["reclaim"]:
            return NLM4_DENIED_GRACE_PERIOD
        if a["reclaim"] and not self.in_grace:
            return NLM4_DENIED_GRACE_PERIOD
        alock = a["alock"]
        stat, file, start, end = self._range(call, alock, a["exclusive"])
        if file is None:
            return stat
        owner = self._owner(alock)
        block = a["block"] and monitored
        if monitored:
            # Durable before the lock exists: a crash now still notifies this host.
            self._monitor(owner.host, call.peer[0])
        ctx = {"address": call.peer[0], "cookie": a["cookie"], "alock": alock} if block else None
        r = self.locks.lock(file, owner, start, end, a["exclusive"], block, ctx)
        self._granted(self.locks.take_woken())
        if r == GRANTED:
            return NLM4_GRANTED
        return NLM4_BLOCKED if r == BLOCKED else NLM4_DENIED

    def lock(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        return {"cookie": a["cookie"], "stat": self._lock(call, a, True)}

    def nm_lock(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        return {"cookie": a["cookie"], "stat": self._lock(call, a, False)}

    def cancel(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        cookie = a["cookie"]
        if self.in_grace:
            return {"cookie": cookie, "stat": NLM4_DENIED_GRACE_PERIOD}
        alock = a["alock"]
        stat, file, start, end = self._range(call, alock, False)
        if file is None:
            return {"cookie": cookie, "stat": stat}
        self.locks.cancel(file, self._owner(alock), start, end, a["exclusive"])
        return {"cookie": cookie, "stat": NLM4_GRANTED}  # like Linux: also when none waited

    def unlock(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        # Allowed during grace: releasing can only help others' reclaims.
        cookie = a["cookie"]
        alock = a["alock"]
        stat, file, start, end = self._range(call, alock, False)
        if file is None:
            return {"cookie": cookie, "stat": stat}
        self._granted(self.locks.unlock(file, self._owner(alock), start, end))
        return {"cookie": cookie, "stat": NLM4_GRANTED}

    def granted(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        # We are not an NLM client: nobody waits here for a lock.
        return {"cookie": a["cookie"], "stat": NLM4_DENIED}

    def _msg_handler(self, num: int) -> Callable[[Call, Any], None]:
        sync, res_proc = _MSG[num]
        name, _args, res_type = PROCEDURES[sync]
        handler = getattr(self, name.lower())

        def msg(call: Call, a: Any) -> None:
            result = handler(call, a)
            self._send(OutCall(call.peer[0], NLM_PROGRAM, NLM_V4, res_proc,
                               res_type.encode(result), VOID, None, attempts=2,
                               what=f"{name}_RES"))
            return None

        return msg

    def share(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        cookie = a["cookie"]
        s = a["share"]
        if self.in_grace != bool(a["reclaim"]):
            return {"cookie": cookie, "stat": NLM4_DENIED_GRACE_PERIOD, "sequence": 0}
        stat, file = self._file(call, s["fh"], bool(s["access"] & 2))
        if file is None:
            return {"cookie": cookie, "stat": stat, "sequence": 0}
        owner = Owner(host_name(s["caller_name"]), 0, s["oh"])
        self._monitor(owner.host, call.peer[0])
        ok = self.locks.share(file, owner, s["access"], s["mode"])
        return {"cookie": cookie, "stat": NLM4_GRANTED if ok else NLM4_DENIED, "sequence": 0}

    def unshare(self, call: Call, a: dict[str, Any]) -> dict[str, Any]:
        cookie = a["cookie"]
        s = a["share"]
        stat, file = self._file(call, s["fh"], False)
        if file is None:
            return {"cookie": cookie, "stat": stat, "sequence": 0}
        self.locks.unshare(file, Owner(host_name(s["caller_name"]), 0, s["oh"]))
        return {"cookie": cookie, "stat": NLM4_GRANTED, "sequence": 0}

    def free_all(self, call: Call, a: dict[str, Any]) -> None:
        self.free_host(host_name(a["name"]))
        return None

    def free_host(self, host: str) -> None:
        """Drop every lock of ``host`` (FREE_ALL, or its statd told us it rebooted)."""
        log.info("freeing all locks of %s", host)
        self._granted(self.locks.free_host(host))
        self.monitored.discard(host)
        if self.forget is not None:
            self.forget(host)
