"""The master copy of one resource: queues, grant rules, callbacks, LVB (sans-IO).

This is a direct transcription of the rules in Linux ``fs/dlm/lock.c``
(``_can_be_granted``, ``can_be_granted``, ``grant_pending_convert``,
``grant_pending_wait``, ``send_blocking_asts``, ``set_lvb_lock``,
``set_lvb_unlock``): a pure object with no I/O, no clock and no threads.
Every operation appends what the owners must be told to ``out`` as
:class:`Cast` (completion) and :class:`Bast` (blocking callback) records.

Locks are identified by ``(owner node, lkid)``; the owner keeps its own
process copy and applies the casts it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

from storaged.dlm.modes import COMPAT, Flag, Mode, Status, lvb_op

# Plain ints for the hot paths: enum member access and IntFlag arithmetic cost about a
# microsecond each, several times per lock operation.
_CONVDEADLK = Flag.CONVDEADLK.value
_IVVALBLK = Flag.IVVALBLK.value
_NOQUEUE = Flag.NOQUEUE.value
_QUECVT = Flag.QUECVT.value
_VALBLK = Flag.VALBLK.value
_CW = Mode.CW.value
_EX = Mode.EX.value
_IV = Mode.IV.value
_NL = Mode.NL.value
_PR = Mode.PR.value
_PW = Mode.PW.value
_S_EAGAIN = Status.EAGAIN.value
_S_EBUSY = Status.EBUSY.value
_S_ECANCEL = Status.ECANCEL.value
_S_EDEADLK = Status.EDEADLK.value
_S_EINVAL = Status.EINVAL.value
_S_ENOENT = Status.ENOENT.value
_S_EUNLOCK = Status.EUNLOCK.value
_S_OK = Status.OK.value

GRANTED, CONVERT, WAITING = 1, 2, 3

# QUECVT is only valid for these conversions (__quecvt_compat_matrix).
_QUECVT_OK = {
    (0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
    (1, 2), (1, 3), (1, 4), (1, 5),
    (2, 3), (2, 4), (2, 5),
    (3, 2), (3, 4), (3, 5),
    (4, 5),
}


class MLock:
    """Master-side lock block (``struct dlm_lkb`` on the master)."""

    __slots__ = ("owner", "lkid", "grmode", "rqmode", "flags", "lvb", "lvbseq", "highbast",
                 "queue", "demoted")

    def __init__(self, owner: int, lkid: int, rqmode: int, flags: int = 0,
                 lvb: bytes | None = None) -> None:
        self.owner = owner
        self.lkid = lkid
        self.grmode = _IV
        self.rqmode = rqmode
        self.flags = flags
        self.lvb = lvb
        self.lvbseq = 0
        self.highbast = 0
        self.queue = 0
        self.demoted = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.owner, self.lkid)

    def __repr__(self) -> str:
        return (f"MLock({self.owner}:{self.lkid} gr={Mode(self.grmode).name} "
                f"rq={Mode(self.rqmode).name})")


@dataclass(slots=True)
class Cast:
    """Completion for the owner of ``(owner, lkid)``."""

    owner: int
    lkid: int
    status: int           #: Status value (0 = granted / done)
    mode: int             #: the lock's granted mode after the operation (IV if gone)
    lvb: bytes | None     #: LVB returned to the lock (None: unchanged)
    lvb_valid: bool = True
    demoted: bool = False
    op: str = ""          #: "request", "convert", "unlock", "cancel"
    lvbseq: int = 0       #: sequence number of the returned LVB


@dataclass(slots=True)
class Bast:
    """Blocking callback: ``(owner, lkid)`` blocks a request for ``mode``."""

    owner: int
    lkid: int
    mode: int


class Resource:
    """One resource as its master sees it."""

    __slots__ = ("name", "lvb_len", "granted", "converting", "waiting", "locks", "lvb",
                 "lvbseq", "valnotvalid")

    def __init__(self, name: bytes, lvb_len: int = 32) -> None:
        self.name = name
        self.lvb_len = lvb_len
        self.granted: list[MLock] = []
        self.converting: list[MLock] = []
        self.waiting: list[MLock] = []
        self.locks: dict[tuple[int, int], MLock] = {}
        self.lvb: bytes | None = None
        self.lvbseq = 0
        self.valnotvalid = False

    # ---------------------------------------------------------------- queries

    def empty(self) -> bool:
        """True when no lock exists on the resource."""
        return not self.locks

    def _conflicts(self, queue: list[MLock], lk: MLock) -> bool:
        rq = lk.rqmode
        for other in queue:
            if other is not lk and not COMPAT[other.grmode][rq]:
                return True
        return False

    def _can_be_granted_raw(self, lk: MLock, now: bool) -> bool:
        conv = lk.grmode != _IV
        if self._conflicts(self.granted, lk) or self._conflicts(self.converting, lk):
            return False
        if now and conv:
            if not lk.flags & _QUECVT:
                return True
            return not self.converting
        if not now and conv:
            return bool(self.converting) and self.converting[0] is lk
        if now:
            return not self.converting and not self.waiting
        return not self.converting and bool(self.waiting) and self.waiting[0] is lk

    def _deadlock(self, lk: MLock) -> bool:
        """conversion_deadlock_detect: would ``lk`` wait on a conversion that waits on it?"""
        ahead = False
        for other in self.converting:
            if other is lk:
                ahead = True
                continue
            if not ahead:
                if not COMPAT[lk.grmode][other.rqmode]:
                    return True
            elif not COMPAT[lk.grmode][other.rqmode] and not COMPAT[other.grmode][lk.rqmode]:
                return True
        return False

    def _can_be_granted(self, lk: MLock, now: bool) -> tuple[bool, bool, bool]:
        """(grantable, deadlock, demoted): ``can_be_granted`` with CONVDEADLK handling."""
        if self._can_be_granted_raw(lk, now):
            return True, False, False
        conv = lk.grmode != _IV
        if conv and not lk.flags & _NOQUEUE and self._deadlock(lk):
            if lk.flags & _CONVDEADLK:
                lk.grmode = _NL
                lk.demoted = True
                return False, False, True
            return False, True, False
        return False, False, False

    # ------------------------------------------------------------------ grant

    def _set_lvb_lock(self, lk: MLock) -> tuple[bytes | None, bool]:
        """Apply the LVB rule of a grant; returns (lvb for the owner or None, valid)."""
        b = lvb_op(lk.grmode, lk.rqmode)
        out: bytes | None = None
        if b == 1:
            if lk.flags & _VALBLK:
                out = self.lvb if self.lvb is not None else bytes(self.lvb_len)
                lk.lvb = out
                lk.lvbseq = self.lvbseq
        elif b == 0:
            if lk.flags & _IVVALBLK:
                self.valnotvalid = True
            elif lk.flags & _VALBLK and lk.lvb is not None:
                self.lvb = lk.lvb
                self.lvbseq += 1
                lk.lvbseq = self.lvbseq
                self.valnotvalid = False
        return out, not self.valnotvalid

    def _set_lvb_unlock(self, lk: MLock) -> None:
        if lk.grmode < _PW:
            return
        if lk.flags & _IVVALBLK:
            self.valnotvalid = True
            return
        if lk.flags & _VALBLK and lk.lvb is not None:
            self.lvb = lk.lvb
            self.lvbseq += 1
            self.valnotvalid = False

    def _dequeue(self, lk: MLock) -> None:
        if lk.queue == GRANTED:
            self.granted.remove(lk)
        elif lk.queue == CONVERT:
            self.converting.remove(lk)
        elif lk.queue == WAITING:
            self.waiting.remove(lk)
        lk.queue = 0

    def _grant(self, lk: MLock, out: list, op: str) -> None:
        lvb, valid = self._set_lvb_lock(lk)
        demoted, lk.demoted = lk.demoted, False
        lk.grmode = lk.rqmode
        lk.rqmode = _IV
        lk.highbast = 0
        if lk.queue != GRANTED:
            self._dequeue(lk)
            self.granted.append(lk)
            lk.queue = GRANTED
        out.append(Cast(lk.owner, lk.lkid, _S_OK, lk.grmode, lvb, valid, demoted, op,
                        lk.lvbseq))

    # ------------------------------------------------------------- operations

    def request(self, owner: int, lkid: int, mode: int, flags: int, out: list,
                lvb: bytes | None = None) -> MLock | None:
        """A new lock request (do_request); the result is a Cast in ``out``."""
        lk = MLock(owner, lkid, int(mode), int(flags), lvb)
        ok, _dl, _dm = self._can_be_granted(lk, True)
        if ok:
            self.locks[lk.key] = lk
            self._grant(lk, out, "request")
            return lk
        if flags & _NOQUEUE:
            out.append(Cast(owner, lkid, _S_EAGAIN, _IV, None, True, False, "request"))
            return None
        self.locks[lk.key] = lk
        self.waiting.append(lk)
        lk.queue = WAITING
        self._send_basts(self.granted, lk, out)
        return lk

    def convert(self, owner: int, lkid: int, mode: int, flags: int, out: list,
                lvb: bytes | None = None) -> None:
        """Convert a granted lock to ``mode`` (do_convert)."""
        lk = self.locks.get((owner, lkid))
        if lk is None:
            out.append(Cast(owner, lkid, _S_ENOENT, _IV, None, True, False, "convert"))
            return
        if lk.queue != GRANTED or lk.rqmode != _IV:
            out.append(Cast(owner, lkid, _S_EBUSY, lk.grmode, None, True, False, "convert"))
            return
        if flags & _QUECVT and (lk.grmode, int(mode)) not in _QUECVT_OK:
            out.append(Cast(owner, lkid, _S_EINVAL, lk.grmode, None, True, False, "convert"))
            return
        lk.rqmode = int(mode)
        lk.flags = int(flags)
        if lvb is not None:
            lk.lvb = lvb
        ok, deadlk, demoted = self._can_be_granted(lk, True)
        if ok:
            self._grant(lk, out, "convert")
            self._grant_pending(out)
            return
        if deadlk:
            lk.rqmode = _IV
            out.append(Cast(owner, lkid, _S_EDEADLK, lk.grmode, None, True, False,
                            "convert"))
            return
        if demoted:
            self._grant_pending_convert(out)
            if self._can_be_granted_raw(lk, True):
                self._grant(lk, out, "convert")
                self._grant_pending(out)
                return
        if flags & _NOQUEUE:
            lk.rqmode = _IV
            lk.demoted = False
            out.append(Cast(owner, lkid, _S_EAGAIN, lk.grmode, None, True, demoted,
                            "convert"))
            return
        self._dequeue(lk)
        self.converting.append(lk)
        lk.queue = CONVERT
        self._send_basts(self.granted, lk, out)
        if demoted:
            self._grant_pending(out)

    def unlock(self, owner: int, lkid: int, out: list, lvb: bytes | None = None,
               flags: int = 0) -> None:
        """Release a granted lock (do_unlock), then grant what became grantable."""
        lk = self.locks.get((owner, lkid))
        if lk is None:
            out.append(Cast(owner, lkid, _S_ENOENT, _IV, None, True, False, "unlock"))
            return
        if lk.queue != GRANTED:
            out.append(Cast(owner, lkid, _S_EBUSY, lk.grmode, None, True, False, "unlock"))
            return
        if lvb is not None:
            lk.lvb = lvb
        if flags & (_VALBLK | _IVVALBLK):
            lk.flags = (lk.flags & ~(_VALBLK | _IVVALBLK)) | (
                flags & (_VALBLK | _IVVALBLK))
        self._set_lvb_unlock(lk)
        self._dequeue(lk)
        del self.locks[lk.key]
        out.append(Cast(owner, lkid, _S_EUNLOCK, _IV, None, True, False, "unlock"))
        self._grant_pending(out)

    def cancel(self, owner: int, lkid: int, out: list) -> bool:
        """Cancel a waiting request or conversion (do_cancel); False if nothing waits."""
        lk = self.locks.get((owner, lkid))
        if lk is None or lk.queue == GRANTED:
            return False
        if lk.queue == WAITING:
            self._dequeue(lk)
            del self.locks[lk.key]
            out.append(Cast(owner, lkid, _S_ECANCEL, _IV, None, True, False, "cancel"))
        else:
            self._dequeue(lk)
            lk.rqmode = _IV
            self.granted.append(lk)
            lk.queue = GRANTED
            out.append(Cast(owner, lkid, _S_ECANCEL, lk.grmode, None, True, False,
                            "cancel"))
        self._grant_pending(out)
        return True

    def purge(self, keep: set[int]) -> bool:
        """Drop every lock owned by a node not in ``keep`` (recovery).

        Returns True when one of them was held in PW or EX, which means the
        LVB may have been changed by the dead node and must be marked invalid.
        """
        pw = False
        for key, lk in list(self.locks.items()):
            if lk.owner not in keep:
                if lk.grmode >= _PW:
                    pw = True
                self._dequeue(lk)
                del self.locks[key]
        return pw

    # --------------------------------------------------------- pending grants

    def _grant_pending_convert(self, out: list) -> tuple[int, bool]:
        quit_ = False
        while True:
            grant_restart = demote_restart = False
            hi = _IV
            cw = False
            for lk in list(self.converting):
                was_demoted = lk.demoted
                ok, _deadlk, demoted = self._can_be_granted(lk, False)
                if ok:
                    self._grant(lk, out, "convert")
                    grant_restart = True
                    continue
                if demoted and not was_demoted:
                    demote_restart = True
                    continue
                hi = max(hi, lk.rqmode)
                if lk.rqmode == _CW:
                    cw = True
            if grant_restart:
                continue
            if demote_restart and not quit_:
                quit_ = True
                continue
            return hi, cw

    def _grant_pending(self, out: list) -> None:
        """grant_pending_locks: converts first, then waiters; basts for what still waits."""
        if not self.converting and not self.waiting:
            return
        high, cw = self._grant_pending_convert(out)
        for lk in list(self.waiting):
            ok, _d, _m = self._can_be_granted(lk, False)
            if ok:
                self._grant(lk, out, "request")
            else:
                high = max(high, lk.rqmode)
                if lk.rqmode == _CW:
                    cw = True
        if high == _IV:
            return
        for lk in self.granted:
            if self._requires_bast(lk, high, cw):
                mode = _CW if cw and high == _PR and lk.grmode == _PR \
                    else high
                out.append(Bast(lk.owner, lk.lkid, mode))
                lk.highbast = high

    @staticmethod
    def _requires_bast(gr: MLock, high: int, cw: bool) -> bool:
        """lock_requires_bast from fs/dlm/lock.c."""
        gmode = gr.grmode
        if gmode == _PR and cw:
            return gr.highbast < _EX
        if gr.highbast < high and not COMPAT[gmode][high]:
            return True
        return False

    def _send_basts(self, queue: list[MLock], rq: MLock, out: list) -> None:
        for gr in queue:
            if gr is rq:
                continue
            g, r = gr.grmode, rq.rqmode
            if (g == _PR and r == _CW) or (g == _CW and r == _PR):
                if gr.highbast < _EX:
                    out.append(Bast(gr.owner, gr.lkid, r))
                    gr.highbast = r
                continue
            if gr.highbast < r and not COMPAT[g][r]:
                out.append(Bast(gr.owner, gr.lkid, r))
                gr.highbast = r

    # ------------------------------------------------------------- recovery

    def add_recovered(self, owner: int, lkid: int, grmode: int, flags: int,
                      lvb: bytes | None, lvbseq: int) -> None:
        """Rebuild: put a survivor's granted lock back (recovery on a new master)."""
        lk = MLock(owner, lkid, _IV, flags, lvb)
        lk.grmode = grmode
        lk.lvbseq = lvbseq
        lk.queue = GRANTED
        self.granted.append(lk)
        self.locks[lk.key] = lk

    def describe(self) -> dict:
        """JSON-ready snapshot of the queues (for ``storaged lock ls``)."""
        def row(lk: MLock) -> dict:
            return {"node": lk.owner, "lkid": lk.lkid, "granted": Mode(lk.grmode).name,
                    "requested": Mode(lk.rqmode).name}
        return {"name": self.name.decode(errors="backslashreplace"),
                "granted": [row(lk) for lk in self.granted],
                "converting": [row(lk) for lk in self.converting],
                "waiting": [row(lk) for lk in self.waiting],
                "lvb_valid": not self.valnotvalid, "lvbseq": self.lvbseq}
