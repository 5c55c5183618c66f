"""One lockspace on one node: the distributed DLM state machine (sans-IO).

The shell feeds API calls (:meth:`LockspaceCore.lock`, ``convert``,
``unlock``, ``cancel``), network messages (:meth:`receive`) and membership
changes (:meth:`view_change`, :meth:`set_fence_ok`); the core appends the
messages to send to ``out`` as ``(node, dict)`` and what the lock owners must
be told to ``events`` as ``("cast", lock, status)``, ``("bast", lock, mode)``
and ``("lost", lock)``.

Layout (Linux fs/dlm): every node keeps a *process copy* (:class:`PLock`)
of its own locks; each resource has one *master* holding the queues
(:class:`~storaged.dlm.resource.Resource`).  The *directory node* of a name
is ``members[crc32(name) % len(members)]``; it records the master, which is
the first node that asked for the name, so a node's own resources are
mastered locally and cost no network round trip.

Recovery, on every new quorate view (all members run it in lockstep):

1. *stop*: new API operations queue locally; ``rc1`` goes to every member.
   Messages keep flowing until every member sent ``rc1``, then ``rc2``.
   Channels are FIFO, so once ``rc2`` arrived from everyone, every request
   sent before the stop was processed and every reply was delivered.
2. *fence*: wait until the membership layer reports every node that left
   uncleanly as fenced.
3. *rebuild*: every node sends each member ``rcb`` with its granted locks on
   the names that member is the directory node of, and the LVB state of the
   resources it masters.  The directory node becomes the new master: it
   rebuilds the queues from the survivors' process copies (dead nodes' locks
   simply are not there: they are purged), resolves the LVB under the Linux
   rules (invalid if a purged lock held PW/EX, or if a new master sees only
   NL/CR locks), then sends ``rcd``.
4. *resume* once ``rcd`` came from every member: operations that were in
   flight to a dead master, and the ones queued during recovery, are sent
   again (waiting requests survive recovery), then locking goes on.

Rebuilding from process copies every time makes an interrupted recovery
harmless: the next view simply starts over from the same source of truth.
"""

from __future__ import annotations

import zlib
from typing import Any

from storaged.dlm import messages
from storaged.dlm.modes import Flag, Mode, Status, check_name
from storaged.dlm.resource import Bast, Cast, Resource

# Plain ints for the hot paths: enum member access and IntFlag arithmetic cost about a
# microsecond each, several times per lock operation.
_CONVERT = Flag.CONVERT.value
_IVVALBLK = Flag.IVVALBLK.value
_VALBLK = Flag.VALBLK.value
_CR = Mode.CR.value
_IV = Mode.IV.value
_PW = Mode.PW.value
_S_EUNLOCK = Status.EUNLOCK.value
_S_OK = Status.OK.value
_STATUS = {s.value: s for s in Status}

ViewId = tuple[int, int]

NEW, RUNNING, RECOVERY, FROZEN, STOPPED = "new", "running", "recovery", "frozen", "stopped"
_NORMAL = messages.NORMAL_KINDS
#: Message kind -> handler; those from the master do not take the sender.
_FROM_MASTER = {"cast": "_apply_cast", "bast": "_apply_bast"}
_FROM_PEER = {"req": "_master_request", "cvt": "_master_convert", "unl": "_master_unlock",
              "can": "_master_cancel", "look": "_on_look", "lookr": "_on_lookr"}
_RC = messages.RECOVERY_KINDS


def _b(name: bytes) -> str:
    return name.decode("latin-1")


class PLock:
    """Process copy of a lock owned by this node."""

    __slots__ = ("lkid", "name", "grmode", "rqmode", "flags", "lvb", "lvb_valid", "lvbseq",
                 "op", "cancel", "sent", "rc_unlocked", "demoted", "ctx", "bast", "status")

    def __init__(self, lkid: int, name: bytes, mode: int, flags: int, lvb: bytes | None) -> None:
        self.lkid = lkid
        self.name = name
        self.grmode = _IV
        self.rqmode = int(mode)
        self.flags = int(flags)
        self.lvb = lvb
        self.lvb_valid = True
        self.lvbseq = 0
        self.op: str | None = "request"
        self.cancel = False
        self.sent: int | None = None
        self.rc_unlocked = False
        self.demoted = False
        self.ctx: Any = None
        self.bast: Any = None
        self.status: Status | None = None  #: status of the last completion (set by the API)

    @property
    def mode(self) -> Mode:
        """The granted mode (``Mode.IV`` while not granted)."""
        return Mode(self.grmode)

    def __repr__(self) -> str:
        return (f"PLock({self.lkid} {self.name!r} gr={Mode(self.grmode).name} "
                f"rq={Mode(self.rqmode).name} op={self.op})")


class _Round:
    """State of one recovery round."""

    def __init__(self, vid: ViewId, members: tuple[int, ...]) -> None:
        self.vid = vid
        self.members = members
        self.phase = 1
        self.got1: set[int] = set()
        self.got2: set[int] = set()
        self.batches: dict[int, dict[str, Any]] = {}
        self.gotd: set[int] = set()


class DlmError(Exception):
    """A request was refused before it reached a master (bad argument, wrong state)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class LockspaceCore:
    """The distributed lock state machine of one lockspace on one node."""

    def __init__(self, name: str, node: int, lvb_len: int = 32,
                 no_quorum_policy: str = "stop") -> None:
        self.name = name
        self.node = node
        self.lvb_len = lvb_len
        self.policy = no_quorum_policy
        self.state = NEW
        self.view_id: ViewId | None = None
        self.members: tuple[int, ...] = ()
        self.locks: dict[int, PLock] = {}
        self._next = 1
        self.masters: dict[bytes, int] = {}
        self.rsbs: dict[bytes, Resource] = {}
        self.since: dict[bytes, ViewId] = {}
        self.directory: dict[bytes, int] = {}
        self.lookups: dict[bytes, list[PLock]] = {}
        self.queued: list[PLock] = []
        self.deferred: list[tuple[int, dict[str, Any]]] = []
        self.future: dict[ViewId, list[tuple[int, dict[str, Any]]]] = {}
        self.fence_ok = False
        self.rc: _Round | None = None
        self.out: list[tuple[int, dict[str, Any]]] = []
        self.events: list[tuple[Any, ...]] = []
        self.recoveries = 0
        self._cbuf: list[Cast | Bast] = []

    # ----------------------------------------------------------------- helpers

    def dir_node(self, name: bytes, members: tuple[int, ...] | None = None) -> int:
        """The directory node of ``name`` among ``members`` (default: the current view)."""
        members = members or self.members
        return members[zlib.crc32(name) % len(members)]

    def _msg(self, kind: str, **fields: Any) -> dict[str, Any]:
        return messages.build(kind, self.name, **fields)

    # -------------------------------------------------------------------- API

    def lock(self, name: bytes | str, mode: int, flags: int = 0,
             lvb: bytes | None = None) -> PLock:
        """Request a new lock; its completion comes as a ``cast`` event."""
        raw = check_name(name)
        mode = Mode.parse(mode)
        if self.state == STOPPED:
            raise DlmError(Status.ENOLCK, f"lockspace {self.name} is stopped (no quorum)")
        lk = PLock(self._next, raw, mode, int(flags) & ~_CONVERT, self._lvb(lvb))
        self._next += 1
        self.locks[lk.lkid] = lk
        if self.state == RUNNING:
            self._dispatch(lk)
        else:
            self.queued.append(lk)
        return lk

    def convert(self, lk: PLock, mode: int, flags: int = 0, lvb: bytes | None = None) -> None:
        """Convert a granted lock to ``mode``; the result comes as a ``cast`` event."""
        mode = Mode.parse(mode)
        self._check_idle(lk, "convert")
        lk.op = "convert"
        lk.rqmode = int(mode)
        lk.flags = int(flags) | _CONVERT
        if lvb is not None:
            lk.lvb = self._lvb(lvb)
        if self.state == RUNNING:
            self._dispatch(lk)
        else:
            self.queued.append(lk)

    def unlock(self, lk: PLock, lvb: bytes | None = None, flags: int = 0) -> None:
        """Release a granted lock; writes the LVB from PW/EX when VALBLK is set."""
        self._check_idle(lk, "unlock")
        lk.op = "unlock"
        if lvb is not None:
            lk.lvb = self._lvb(lvb)
        lk.flags = (lk.flags & ~(_VALBLK | _IVVALBLK)) | (
            int(flags) & (_VALBLK | _IVVALBLK)) if flags else lk.flags
        if self.state == RUNNING:
            self._dispatch(lk)
        else:
            self.queued.append(lk)

    def cancel(self, lk: PLock) -> bool:
        """Cancel a waiting request or conversion; False if there is nothing to cancel."""
        if lk.op not in ("request", "convert") or lk.lkid not in self.locks:
            return False
        if lk.cancel:
            return True
        lk.cancel = True
        if lk.sent is None:
            # Not at a master yet (queued or waiting for a lookup): cancel here.
            if lk in self.queued:
                self.queued.remove(lk)
            waiters = self.lookups.get(lk.name)
            if waiters and lk in waiters:
                waiters.remove(lk)
            self._local_cancel(lk)
        elif lk.sent == self.node:
            self._master_cancel(self.node, lk.name, lk.lkid)
        else:
            self.out.append((lk.sent, self._msg("can", r=_b(lk.name), id=lk.lkid)))
        return True

    def _local_cancel(self, lk: PLock) -> None:
        lk.cancel = False
        lk.op = None
        lk.rqmode = _IV
        if lk.grmode == _IV:
            self.locks.pop(lk.lkid, None)
        self.events.append(("cast", lk, Status.ECANCEL))

    def _check_idle(self, lk: PLock, what: str) -> None:
        if self.locks.get(lk.lkid) is not lk:
            raise DlmError(Status.ENOENT, f"{what}: no such lock")
        if self.state == STOPPED:
            raise DlmError(Status.ENOLCK, f"lockspace {self.name} is stopped (no quorum)")
        if lk.op is not None or lk.grmode == _IV:
            raise DlmError(Status.EBUSY, f"{what}: the lock has an operation in progress")

    def _lvb(self, lvb: bytes | None) -> bytes | None:
        if lvb is None:
            return None
        raw = bytes(lvb)
        if len(raw) > self.lvb_len:
            raise DlmError(Status.EINVAL, f"LVB longer than {self.lvb_len} bytes")
        return raw.ljust(self.lvb_len, b"\0")

    # --------------------------------------------------------------- dispatch

    def _dispatch(self, lk: PLock) -> None:
        name = lk.name
        m = self.masters.get(name)
        if m is None:
            d = self.dir_node(name)
            if d == self.node:
                m = self.directory.get(name)
                if m is None:
                    m = self.directory[name] = self.node
                self.masters[name] = m
            else:
                waiters = self.lookups.get(name)
                if waiters is None:
                    self.lookups[name] = [lk]
                    self.out.append((d, self._msg("look", r=_b(name))))
                else:
                    waiters.append(lk)
                return
        self._send(m, lk)

    def _send(self, m: int, lk: PLock) -> None:
        lk.sent = m
        op = lk.op
        if m == self.node:
            if op == "request":
                self._master_request(m, lk.name, lk.lkid, lk.rqmode, lk.flags, lk.lvb)
            elif op == "convert":
                self._master_convert(m, lk.name, lk.lkid, lk.rqmode, lk.flags, lk.lvb)
            else:
                self._master_unlock(m, lk.name, lk.lkid, lk.lvb, lk.flags)
            return
        lvb = None if lk.lvb is None else _b(lk.lvb)
        if op == "request":
            msg = self._msg("req", r=_b(lk.name), id=lk.lkid, m=lk.rqmode, f=lk.flags, lvb=lvb)
        elif op == "convert":
            msg = self._msg("cvt", r=_b(lk.name), id=lk.lkid, m=lk.rqmode, f=lk.flags, lvb=lvb)
        else:
            msg = self._msg("unl", r=_b(lk.name), id=lk.lkid, f=lk.flags, lvb=lvb)
        self.out.append((m, msg))

    # ------------------------------------------------------------ master side

    def _rsb(self, name: bytes) -> Resource:
        r = self.rsbs.get(name)
        if r is None:
            r = self.rsbs[name] = Resource(name, self.lvb_len)
            self.since[name] = self.view_id or (0, 0)
            if self.members and self.dir_node(name) == self.node:
                self.directory.setdefault(name, self.node)
        return r

    def _master_request(self, src: int, name: bytes, lkid: int, mode: int, flags: int,
                        lvb: bytes | None) -> None:
        out = self._cbuf
        self._rsb(name).request(src, lkid, mode, flags, out, lvb)
        self._deliver(out)

    def _master_convert(self, src: int, name: bytes, lkid: int, mode: int, flags: int,
                        lvb: bytes | None) -> None:
        out = self._cbuf
        self._rsb(name).convert(src, lkid, mode, flags, out, lvb)
        self._deliver(out)

    def _master_unlock(self, src: int, name: bytes, lkid: int, lvb: bytes | None,
                       flags: int) -> None:
        out = self._cbuf
        self._rsb(name).unlock(src, lkid, out, lvb, flags)
        self._deliver(out)

    def _master_cancel(self, src: int, name: bytes, lkid: int) -> None:
        r = self.rsbs.get(name)
        if r is None:
            return
        out = self._cbuf
        r.cancel(src, lkid, out)
        self._deliver(out)

    def _deliver(self, out: list[Cast | Bast]) -> None:
        me = self.node
        for c in out:
            if type(c) is Cast:
                if c.owner == me:
                    self._apply_cast(c.lkid, c.status, c.mode, c.lvb, c.lvb_valid, c.demoted,
                                     c.lvbseq)
                else:
                    self.out.append((c.owner, self._msg(
                        "cast", id=c.lkid, s=int(c.status), m=c.mode,
                        lvb=None if c.lvb is None else _b(c.lvb), ok=c.lvb_valid,
                        d=c.demoted, q=c.lvbseq)))
            elif c.owner == me:
                self._apply_bast(c.lkid, c.mode)
            else:
                self.out.append((c.owner, self._msg("bast", id=c.lkid, m=c.mode)))
        out.clear()

    # ------------------------------------------------------------- owner side

    def _apply_cast(self, lkid: int, status: int, mode: int, lvb: bytes | None, valid: bool,
                    demoted: bool, lvbseq: int) -> None:
        lk = self.locks.get(lkid)
        if lk is None:
            return
        lk.sent = None
        if status == _S_OK:
            lk.grmode = mode
            lk.rqmode = _IV
            lk.op = None
            lk.cancel = False
            lk.demoted = demoted
            if lvb is not None:
                lk.lvb = lvb
                lk.lvbseq = lvbseq
            lk.lvb_valid = valid
        elif status == _S_EUNLOCK:
            lk.grmode = _IV
            lk.op = None
            del self.locks[lkid]
        else:
            lk.grmode = mode
            lk.rqmode = _IV
            lk.op = None
            lk.cancel = False
            if mode == _IV:
                del self.locks[lkid]
        st = _STATUS.get(status)    # not ``or``: Status.OK is 0, falsy
        self.events.append(("cast", lk, st if st is not None else Status(status)))

    def _apply_bast(self, lkid: int, mode: int) -> None:
        lk = self.locks.get(lkid)
        if lk is not None and lk.grmode != _IV:
            self.events.append(("bast", lk, Mode(mode)))

    # ---------------------------------------------------------------- network

    def receive(self, src: int, msg: dict[str, Any]) -> None:
        """Handle one message from node ``src`` (already checked to be a current member)."""
        kind = msg.get("t")
        if kind in _RC:
            self._receive_rc(src, msg)
            return
        if kind not in _NORMAL or src not in self.members:
            return
        if self.state == RUNNING or (self.state == RECOVERY and self.rc is not None
                                     and self.rc.phase <= 2):
            self._handle(src, msg)
        elif self.state in (RECOVERY, FROZEN):
            self.deferred.append((src, msg))

    def _handle(self, src: int, msg: dict[str, Any]) -> None:
        # Arguments in the order storaged.dlm.messages.MESSAGES lists them.
        args = messages.decode(msg)
        kind = msg["t"]
        if kind in _FROM_MASTER:
            getattr(self, _FROM_MASTER[kind])(*args)
        else:
            getattr(self, _FROM_PEER[kind])(src, *args)

    def _on_look(self, src: int, name: bytes) -> None:
        """Directory node: the master of ``name`` (the asker, if it has none yet)."""
        m = self.directory.get(name)
        if m is None:
            m = self.directory[name] = src
        self.out.append((src, self._msg("lookr", r=_b(name), m=m)))

    def _on_lookr(self, src: int, name: bytes, m: int) -> None:
        """The directory's answer: send the waiting requests for ``name`` to master ``m``."""
        if self.state != RUNNING:
            return  # re-dispatched at resume against the rebuilt directory
        waiters = self.lookups.pop(name, [])
        if m not in self.members:
            self.queued.extend(waiters)
            return
        self.masters[name] = m
        for lk in waiters:
            if self.locks.get(lk.lkid) is lk:
                self._send(m, lk)

    # --------------------------------------------------------------- recovery

    def view_change(self, vid: ViewId, members: tuple[int, ...], quorate: bool) -> None:
        """A new membership view was installed."""
        members = tuple(sorted(members))
        if self.node not in members:
            return
        old_phase = self.rc.phase if self.rc is not None else 0
        self.view_id = vid
        self.members = members
        pending = self.future.pop(vid, [])
        for old in [v for v in self.future if v < vid]:
            del self.future[old]
        if not quorate and self.policy != "ignore":
            self.rc = None
            if self.policy == "stop":
                self._drop_all()
                self.state = STOPPED
            else:
                self.state = FROZEN
            return
        self.recoveries += 1
        carried = self.deferred if (self.state != RECOVERY or old_phase >= 4) else []
        self.deferred = []
        self.state = RECOVERY
        self.rc = _Round(vid, members)
        self.rc.got1.add(self.node)
        for n in members:
            if n != self.node:
                self.out.append((n, self._msg("rc1", v=list(vid))))
        for src, msg in carried:
            if src in members:
                self._handle(src, msg)
        for src, msg in pending:
            self._receive_rc(src, msg)
        self._advance()

    def set_fence_ok(self, ok: bool) -> None:
        """Membership reports whether every unclean leaver is fenced."""
        self.fence_ok = ok
        if ok and self.rc is not None:
            self._advance()

    def reset(self) -> None:
        """This node was removed from the cluster (new incarnation): every lock is lost."""
        self._drop_all()
        self.state = NEW
        self.view_id = None
        self.members = ()
        self.rc = None
        self.future.clear()

    def _drop_all(self) -> None:
        for lk in list(self.locks.values()):
            if lk.op is not None and lk.grmode == _IV:
                self.events.append(("cast", lk, Status.ENOLCK))
            else:
                self.events.append(("lost", lk))
            lk.grmode = _IV
            lk.op = None
        self.locks.clear()
        self.queued.clear()
        self.lookups.clear()
        self.deferred.clear()
        self.rsbs.clear()
        self.since.clear()
        self.directory.clear()
        self.masters.clear()

    def _receive_rc(self, src: int, msg: dict[str, Any]) -> None:
        args = messages.decode(msg)
        vid = args[0]
        if self.view_id is None or vid > self.view_id:
            self.future.setdefault(vid, []).append((src, msg))
            return
        rc = self.rc
        if rc is None or vid != rc.vid or src not in rc.members:
            return
        kind = msg["t"]
        if kind == "rc1":
            rc.got1.add(src)
        elif kind == "rc2":
            rc.got2.add(src)
        elif kind == "rcb":
            rc.batches[src] = args
        elif kind == "rcd":
            rc.gotd.add(src)
        self._advance()

    def _advance(self) -> None:
        rc = self.rc
        while rc is not None and rc is self.rc:
            members = set(rc.members)
            if rc.phase == 1 and rc.got1 >= members:
                rc.phase = 2
                rc.got2.add(self.node)
                for n in rc.members:
                    if n != self.node:
                        self.out.append((n, self._msg("rc2", v=list(rc.vid))))
            elif rc.phase == 2 and rc.got2 >= members and (self.fence_ok
                                                          or self.policy == "ignore"):
                rc.phase = 3
                self._send_batches(rc)
            elif rc.phase == 3 and set(rc.batches) >= members:
                rc.phase = 4
                self._rebuild(rc)
                rc.gotd.add(self.node)
                for n in rc.members:
                    if n != self.node:
                        self.out.append((n, self._msg("rcd", v=list(rc.vid))))
            elif rc.phase == 4 and rc.gotd >= members:
                self._resume()
            else:
                return

    def _send_batches(self, rc: _Round) -> None:
        batches: dict[int, dict[str, list]] = {n: {"locks": [], "lvbs": []} for n in rc.members}
        for lk in self.locks.values():
            if lk.grmode == _IV:
                continue
            unlocking = lk.op == "unlock"
            lk.rc_unlocked = unlocking
            batches[self.dir_node(lk.name, rc.members)]["locks"].append(
                [_b(lk.name), lk.lkid, lk.grmode, lk.flags & ~_CONVERT,
                 None if lk.lvb is None else _b(lk.lvb), lk.lvbseq, unlocking])
        keep = set(rc.members)
        for name, r in self.rsbs.items():
            dead_pw = any(lk.owner not in keep and lk.grmode >= _PW
                          for lk in r.locks.values())
            batches[self.dir_node(name, rc.members)]["lvbs"].append(
                [_b(name), None if r.lvb is None else _b(r.lvb), r.lvbseq, not r.valnotvalid,
                 list(self.since.get(name, (0, 0))), dead_pw])
        for n, b in batches.items():
            msg = self._msg("rcb", v=list(rc.vid), **b)
            if n == self.node:
                rc.batches[n] = messages.decode(msg)
            else:
                self.out.append((n, msg))

    def _rebuild(self, rc: _Round) -> None:
        staging: dict[bytes, Resource] = {}
        infos: dict[bytes, list[list]] = {}
        unlocks: list[tuple[bytes, list]] = []
        for src in rc.members:
            # Records as messages.LOCK_RECORD and LVB_RECORD define them.
            _vid, locks, lvbs = rc.batches[src]
            for entry in locks:
                name, lkid, grmode, flags, lvb, lvbseq, unlocking = entry
                r = staging.get(name)
                if r is None:
                    r = staging[name] = Resource(name, self.lvb_len)
                if unlocking:
                    unlocks.append((name, entry))
                    continue
                r.add_recovered(src, lkid, grmode, flags, lvb, lvbseq)
            for info in lvbs:
                infos.setdefault(info[0], []).append(info)
        for name, lst in infos.items():
            r = staging.get(name)
            if r is None:
                r = staging[name] = Resource(name, self.lvb_len)
            best = max(lst, key=lambda i: (i[4], i[2]))
            r.lvb = best[1]
            r.lvbseq = best[2]
            r.valnotvalid = not best[3] or any(i[5] for i in lst)
        for name, r in staging.items():
            if name not in infos:
                self._recover_lvb(r)
        for name, entry in unlocks:
            r = staging[name]
            grmode, flags, lvb = entry[2], entry[3], entry[4]
            if grmode >= _PW:
                if flags & _IVVALBLK:
                    r.valnotvalid = True
                elif flags & _VALBLK and lvb is not None:
                    r.lvb = lvb
                    r.lvbseq += 1
                    r.valnotvalid = False
        self.rsbs = staging
        self.since = dict.fromkeys(staging, rc.vid)
        self.directory = dict.fromkeys(staging, self.node)
        # Only names rebuilt at their directory node are known to be mastered there; any
        # other name goes through a lookup, so the directory stays the single authority.
        self.masters = {}
        for lk in self.locks.values():
            if lk.grmode != _IV:
                self.masters[lk.name] = self.dir_node(lk.name, rc.members)

    @staticmethod
    def _recover_lvb(r: Resource) -> None:
        """recover_lvb for a new master (the old master died): Linux rules."""
        big = None
        high = None
        for lk in r.granted:
            if not lk.flags & _VALBLK or lk.lvb is None:
                continue
            if lk.grmode > _CR:
                big = lk
                break
            if high is None or lk.lvbseq >= high.lvbseq:
                high = lk
        if big is not None:
            r.lvb, r.lvbseq = big.lvb, big.lvbseq
        elif high is not None:
            r.lvb, r.lvbseq = high.lvb, high.lvbseq
            r.valnotvalid = True

    def _resume(self) -> None:
        self.state = RUNNING
        self.rc = None
        redo: list[PLock] = []
        for lk in self.locks.values():
            if lk.op is not None:
                redo.append(lk)
        self.queued.clear()
        self.lookups.clear()
        redo.sort(key=lambda lk: lk.lkid)
        for lk in redo:
            if self.locks.get(lk.lkid) is not lk:
                continue
            lk.sent = None
            if lk.op == "unlock" and lk.rc_unlocked:
                lk.rc_unlocked = False
                lk.op = None
                lk.grmode = _IV
                del self.locks[lk.lkid]
                self.events.append(("cast", lk, Status.EUNLOCK))
            elif lk.cancel:
                self._local_cancel(lk)
            else:
                self._dispatch(lk)
        for lk in self.locks.values():
            lk.rc_unlocked = False
        deferred, self.deferred = self.deferred, []
        for src, msg in deferred:
            if src in self.members:
                self._handle(src, msg)

    # ------------------------------------------------------------------ views

    def describe(self) -> dict[str, Any]:
        """JSON-ready snapshot for ``storaged lock ls``."""
        return {
            "lockspace": self.name, "state": self.state,
            "view": None if self.view_id is None else f"{self.view_id[0]}.{self.view_id[1]}",
            "mastered": [r.describe() for r in sorted(self.rsbs.values(), key=lambda r: r.name)
                         if not r.empty()],
            "locks": [{"lkid": lk.lkid, "name": lk.name.decode(errors="backslashreplace"),
                       "granted": Mode(lk.grmode).name, "requested": Mode(lk.rqmode).name,
                       "op": lk.op, "master": self.masters.get(lk.name)}
                      for lk in sorted(self.locks.values(), key=lambda lk: lk.lkid)],
        }
