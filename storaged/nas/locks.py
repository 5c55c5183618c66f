"""Byte-range locks and share reservations with POSIX semantics, sans-IO.

The NLM program (storaged.nfs.nlm) keeps its locks here; nothing in this
module knows about RPC, sockets or clocks, so the semantics are unit-tested
directly (tests/test_nas_locks.py checks them against a byte-map model).

POSIX rules (fcntl(2) F_SETLK, which NLM mirrors, XNFS ch. 10):

* a lock is held by an *owner* (here ``(host, svid, oh)``: the client's
  name, its process id and its opaque owner handle) on a range
  ``[start, start + length)``; length 0 means "to end of file and beyond";
* shared (read) locks of different owners coexist; an exclusive (write)
  lock conflicts with every lock of another owner that overlaps it;
* an owner's own locks never conflict with a new request: the new range
  replaces whatever the owner held there (upgrading or downgrading), and
  adjacent or overlapping ranges of the same type merge;
* unlocking a sub-range splits a lock in two;
* blocking requests wait in FIFO order and are granted (lock taken on their
  behalf) as soon as an unlock, cancel or host cleanup removes the conflict.

DOS share reservations (NLM SHARE/UNSHARE, XNFS 10.10) are kept per file:
an open with ``access`` conflicts with another owner's ``mode`` (deny bits)
and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Offsets are unsigned 64-bit in NLM v4; a range "to EOF" ends here.
EOF = 1 << 64

GRANTED, DENIED, BLOCKED = "granted", "denied", "blocked"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a lock: the client host's name, svid (usually a pid) and owner handle."""

    host: str
    svid: int
    oh: bytes = b""


@dataclass(slots=True)
class Lock:
    """One held range ``[start, end)`` (``end`` = EOF for "to end of file")."""

    owner: Owner
    start: int
    end: int
    exclusive: bool

    @property
    def length(self) -> int:
        """NLM's l_len: 0 for a lock to end of file."""
        return 0 if self.end >= EOF else self.end - self.start

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


@dataclass(slots=True)
class Waiter:
    """A blocked request; ``ctx`` is whatever the caller needs to notify the client."""

    file: Any
    owner: Owner
    start: int
    end: int
    exclusive: bool
    ctx: Any = None


@dataclass(slots=True)
class Share:
    """A DOS share reservation: ``access`` and ``mode`` (deny) bits, 1 = read, 2 = write."""

    owner: Owner
    access: int
    mode: int


@dataclass
class _File:
    locks: list[Lock] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.locks or self.waiters or self.shares)


def span(offset: int, length: int) -> tuple[int, int]:
    """``(start, end)`` of an NLM range; length 0 = to EOF.  ValueError past 2**64."""
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    end = EOF if length == 0 else offset + length
    if offset >= EOF or end > EOF:
        raise ValueError("range beyond 2**64")
    return offset, end


class LockManager:
    """All byte-range locks, waiters and share reservations, keyed by an opaque file key."""

    def __init__(self) -> None:
        self.files: dict[Any, _File] = {}
        self._woken: list[Waiter] = []

    # -- queries
    def locks(self, file: Any) -> list[Lock]:
        """The locks held on ``file``, sorted by (start, owner)."""
        f = self.files.get(file)
        return sorted(f.locks, key=lambda lk: (lk.start, repr(lk.owner))) if f else []

    def waiters(self, file: Any) -> list[Waiter]:
        f = self.files.get(file)
        return list(f.waiters) if f else []

    def hosts(self) -> set[str]:
        """Hosts holding a lock, a share or a waiting request."""
        out: set[str] = set()
        for f in self.files.values():
            out.update(lk.owner.host for lk in f.locks)
            out.update(w.owner.host for w in f.waiters)
            out.update(s.owner.host for s in f.shares)
        return out

    def conflict(self, file: Any, owner: Owner, start: int, end: int,
                 exclusive: bool) -> Lock | None:
        """The first lock of another owner that would block this request (TEST)."""
        f = self.files.get(file)
        if f is None:
            return None
        for lk in f.locks:
            if lk.owner != owner and (exclusive or lk.exclusive) and lk.overlaps(start, end):
                return lk
        return None

    # -- changes
    def _file(self, file: Any) -> _File:
        f = self.files.get(file)
        if f is None:
            f = self.files[file] = _File()
        return f

    def _gc(self, file: Any) -> None:
        f = self.files.get(file)
        if f is not None and f.empty():
            del self.files[file]

    def _apply(self, f: _File, owner: Owner, start: int, end: int,
               exclusive: bool | None) -> None:
        """Set ``owner``'s lock state on [start, end) (None = unlocked), splitting/merging."""
        kept: list[Lock] = []
        mine: list[Lock] = []
        for lk in f.locks:
            if lk.owner != owner:
                kept.append(lk)
            elif not lk.overlaps(start, end):
                mine.append(lk)
            else:
                if lk.start < start:
                    mine.append(Lock(owner, lk.start, start, lk.exclusive))
                if lk.end > end:
                    mine.append(Lock(owner, end, lk.end, lk.exclusive))
        if exclusive is not None:
            mine.append(Lock(owner, start, end, exclusive))
        mine.sort(key=lambda lk: lk.start)
        merged: list[Lock] = []
        for lk in mine:
            last = merged[-1] if merged else None
            if last is not None and last.exclusive == lk.exclusive and last.end >= lk.start:
                last.end = max(last.end, lk.end)
            else:
                merged.append(Lock(owner, lk.start, lk.end, lk.exclusive))
        f.locks = kept + merged

    def lock(self, file: Any, owner: Owner, start: int, end: int, exclusive: bool,
             block: bool = False, ctx: Any = None) -> str:
        """Try to take a lock: GRANTED, DENIED, or BLOCKED (queued when ``block``).

        A repeated blocking request of the same owner and range that is
        already queued stays queued once (clients retransmit).
        """
        f = self._file(file)
        if self.conflict(file, owner, start, end, exclusive) is None:
            self._apply(f, owner, start, end, exclusive)
            if f.waiters:  # a downgrade (exclusive -> shared) may unblock others
                self._woken += self._wake(file)
            return GRANTED
        if not block:
            self._gc(file)
            return DENIED
        for w in f.waiters:
            if (w.owner, w.start, w.end, w.exclusive) == (owner, start, end, exclusive):
                w.ctx = ctx
                return BLOCKED
        f.waiters.append(Waiter(file, owner, start, end, exclusive, ctx))
        return BLOCKED

    def take_woken(self) -> list[Waiter]:
        """Waiters granted as a side effect of ``lock`` (a downgrade); call after ``lock``."""
        out, self._woken = self._woken, []
        return out

    def unlock(self, file: Any, owner: Owner, start: int, end: int) -> list[Waiter]:
        """Release ``owner``'s locks on [start, end); returns the waiters now granted."""
        f = self.files.get(file)
        if f is None:
            return []
        self._apply(f, owner, start, end, None)
        return self._wake(file)

    def cancel(self, file: Any, owner: Owner, start: int, end: int,
               exclusive: bool) -> Waiter | None:
        """Remove a queued request (CANCEL); the waiter removed, or None."""
        f = self.files.get(file)
        if f is None:
            return None
        for i, w in enumerate(f.waiters):
            if (w.owner, w.start, w.end, w.exclusive) == (owner, start, end, exclusive):
                del f.waiters[i]
                self._gc(file)
                return w
        return None

    def free_host(self, host: str) -> list[Waiter]:
        """Drop every lock, waiter and share of ``host`` (FREE_ALL, SM_NOTIFY)."""
        granted: list[Waiter] = []
        for file in list(self.files):
            f = self.files[file]
            before = len(f.locks)
            f.locks = [lk for lk in f.locks if lk.owner.host != host]
            f.waiters = [w for w in f.waiters if w.owner.host != host]
            f.shares = [s for s in f.shares if s.owner.host != host]
            if len(f.locks) != before:
                granted += self._wake(file)
            else:
                self._gc(file)
        return granted

    def _wake(self, file: Any) -> list[Waiter]:
        f = self.files.get(file)
        if f is None:
            return []
        granted: list[Waiter] = []
        for w in list(f.waiters):
            if self.conflict(file, w.owner, w.start, w.end, w.exclusive) is None:
                f.waiters.remove(w)
                self._apply(f, w.owner, w.start, w.end, w.exclusive)
                granted.append(w)
        self._gc(file)
        return granted

    # -- share reservations
    def share(self, file: Any, owner: Owner, access: int, mode: int) -> bool:
        """Add a share reservation; False if it conflicts with another owner's."""
        f = self._file(file)
        for s in f.shares:
            if s.owner != owner and (s.mode & access or mode & s.access):
                self._gc(file)
                return False
        f.shares = [s for s in f.shares if s.owner != owner]
        f.shares.append(Share(owner, access, mode))
        return True

    def unshare(self, file: Any, owner: Owner) -> None:
        """Drop ``owner``'s share reservation on ``file`` (absent is fine)."""
        f = self.files.get(file)
        if f is not None:
            f.shares = [s for s in f.shares if s.owner != owner]
            self._gc(file)
