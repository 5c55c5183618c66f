"""Glocks: DLM locks a node keeps after use, given up only when another node asks.

GFS2's glock model on the storaged DLM.  A transaction's ``unlock`` only
drops the *local* hold; the node keeps its DLM lock (PR or EX) and with it
the metadata it read under that lock (:class:`BlockCache`).  When another
node's request conflicts, the DLM sends a blocking callback (bast); the
demote thread waits until no local transaction holds the glock and the lock
was held at least ``hold`` seconds (the minimum hold time against
ping-pong), then converts it down: EX to PR when the other node asked for PR,
else to NL.  The node keeps the NL lock (and so the resource and its LVB).

Write-back before a demote: clusterfs commits synchronously (data, journal
record, in place, checkpoint: storaged.clusterfs.journal) before a
transaction lets go of its locks, so by the time a glock can be demoted the
journal is already flushed and nothing is dirty; the demote itself only has
to publish the new version in the LVB.

Lock value block: 8 bytes, little-endian ``version``.  Every EX holder that
committed a change under the glock increments it when it converts down.  A
node re-acquiring a glock compares the LVB version with the one its cached
blocks were read at: equal means nobody changed anything protected by the
lock since, so the cache stays valid and nothing is re-read; different (or
the LVB invalid after a holder died) drops the glock's cached blocks.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from storaged.clusterfs.locks import EX, PR, LockLost, WouldBlock
from storaged.dlm.api import LockError, SyncLockspace
from storaged.dlm.modes import Flag, Mode, Status

LVB = struct.Struct("<Q")
DEFAULT_HOLD = 0.01  # seconds: GFS2's minimum hold time is 10 ms (HZ/100)
_RANK = {None: -1, "NL": 0, PR: 1, EX: 2}


class BlockCache:
    """Metadata block images a node read or wrote, each tagged with the lock protecting it.

    Valid only while that lock is held (or re-validated through its LVB); the
    lock layer calls :meth:`drop_owner` when it is not.  Bounded (LRU)."""

    def __init__(self, max_blocks: int = 16384) -> None:
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._owned: dict[str, set[int]] = {}
        self._decoded: dict[int, Any] = {}  # block -> what a decoder made of its image
        self.stats = {"hits": 0, "misses": 0, "dropped": 0}

    def get(self, block: int, owner: str) -> bytes | None:
        """The cached image of ``block`` if ``owner``'s lock protects it."""
        with self._lock:
            hit = self._blocks.get(block)
            if hit is None or hit[1] != owner:
                self.stats["misses"] += 1
                return None
            self._blocks.move_to_end(block)
            self.stats["hits"] += 1
            return hit[0]

    def decoded(self, block: int, owner: str, decode: Callable[[bytes], Any]) -> Any:
        """``decode(image)`` of the cached ``block``, memoised until the image changes
        (a directory bucket as a name -> entry map); None when not cached."""
        with self._lock:
            hit = self._blocks.get(block)
            if hit is None or hit[1] != owner:
                return None
            out = self._decoded.get(block)
            if out is None:
                out = self._decoded[block] = decode(hit[0])
            return out

    def put(self, block: int, image: bytes, owner: str) -> None:
        with self._lock:
            self._decoded.pop(block, None)
            old = self._blocks.pop(block, None)
            if old is not None and old[1] != owner:
                self._owned.get(old[1], set()).discard(block)
            self._blocks[block] = (bytes(image), owner)
            self._owned.setdefault(owner, set()).add(block)
            while len(self._blocks) > self.max_blocks:
                b, (_img, o) = self._blocks.popitem(last=False)
                self._owned.get(o, set()).discard(b)
                self._decoded.pop(b, None)

    def discard(self, block: int) -> None:
        with self._lock:
            self._decoded.pop(block, None)
            old = self._blocks.pop(block, None)
            if old is not None:
                self._owned.get(old[1], set()).discard(block)

    def drop_owner(self, owner: str) -> None:
        """Forget every block ``owner``'s lock protects (the lock was lost or changed)."""
        with self._lock:
            for b in self._owned.pop(owner, ()):
                self._decoded.pop(b, None)
                if self._blocks.pop(b, None) is not None:
                    self.stats["dropped"] += 1

    def clear(self) -> None:
        with self._lock:
            self.stats["dropped"] += len(self._blocks)
            self._blocks.clear()
            self._owned.clear()
            self._decoded.clear()

    def __len__(self) -> int:
        return len(self._blocks)


class Glock:
    """One cached DLM lock: the node's DLM mode and the local holders on top of it."""

    __slots__ = ("name", "handle", "dlm", "readers", "writer", "demote", "granted_at",
                 "version", "dirty", "busy", "used", "bseq")

    def __init__(self, name: str) -> None:
        self.name = name
        self.handle: Any = None      # the DLM PLock (None before the first grant)
        self.dlm: str | None = None  # mode the node holds in the DLM: None, "NL", PR, EX
        self.readers = 0             # local PR holders
        self.writer = False          # a local EX holder
        self.demote: int | None = None  # Mode another node asked for (bast), if any
        self.granted_at = 0.0
        self.version: int | None = None  # LVB version the cached blocks were read at
        self.dirty = False           # an EX holder committed a change: bump at demote
        self.busy = False            # a thread is talking to the DLM for this glock
        self.used = 0.0
        self.bseq = 0                # counts basts: a demote clears only what it saw

    def idle(self) -> bool:
        return not self.readers and not self.writer and not self.busy


class _Hold:
    __slots__ = ("g", "mode")

    def __init__(self, g: Glock, mode: str) -> None:
        self.g = g
        self.mode = mode

    @property
    def name(self) -> str:
        return self.g.name


class Glocks:
    """A caching lock layer (the ``LockLayer`` protocol) over a :class:`SyncLockspace`.

    ``hold`` is the minimum hold time in seconds (mount option ``hold_ms``).
    ``inner`` is a plain lock layer on the same lockspace for locks that must
    not be cached (journal slots, mount-time probes)."""

    caching = True

    def __init__(self, sync: SyncLockspace, hold: float = DEFAULT_HOLD,
                 max_glocks: int = 8192) -> None:
        from storaged.clusterfs.locks import DlmLocks
        self.sync = sync
        self.inner = DlmLocks(sync)
        self.hold = hold
        self.max_glocks = max_glocks
        self.on_invalidate: Callable[[str], None] | None = None
        self.before_release: Callable[[], None] | None = None  # journal checkpoint
        # Called when a grant brings an invalid LVB: the DLM purged a dead node's
        # PW/EX lock, so that node's journal must be replayed before anything
        # under this lock is read (the dead node's last record may cover it).
        self.on_lvb_invalid: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._glocks: dict[str, Glock] = {}
        self._stop = False
        self.stats = {"locks": 0, "cached": 0, "dlm_requests": 0, "busy": 0, "basts": 0,
                      "demotes": 0, "lvb_hits": 0, "lvb_misses": 0}
        self._worker = self._start_worker()

    def _start_worker(self) -> threading.Thread:
        t = threading.Thread(target=self._demote_loop, name="clusterfs-glockd", daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------ helpers
    def _invalidate(self, name: str) -> None:
        if self.on_invalidate is not None:
            self.on_invalidate(name)

    def _demote_due(self, g: Glock, now: float) -> bool:
        return g.demote is not None and now >= g.granted_at + self.hold

    def _bast_for(self, g: Glock) -> Callable[[Any, Mode], None]:
        def bast(lk: Any, mode: Mode) -> None:  # on the event loop: note it, wake glockd
            with self._cond:
                if g.handle is not None and g.handle is not lk:
                    return  # a bast for a lock this glock no longer uses
                self.stats["basts"] += 1
                g.demote = max(int(mode), g.demote if g.demote is not None else -1)
                g.bseq += 1
                self._cond.notify_all()
        return bast

    def _lvb_version(self, lk: Any) -> int | None:
        if not getattr(lk, "lvb_valid", False) or lk.lvb is None:
            return None
        return LVB.unpack_from(lk.lvb, 0)[0]

    def _dlm_up(self, g: Glock, mode: str, noqueue: bool) -> None:
        """Raise the node's DLM mode of ``g`` to ``mode`` (called with g.busy set,
        without the condition held)."""
        flags = Flag.VALBLK | (Flag.NOQUEUE if noqueue else 0)
        self.stats["dlm_requests"] += 1
        try:
            if g.handle is None:
                g.handle = self.sync.lock(g.name, Mode[mode], flags=flags,
                                          bast=self._bast_for(g))
            else:
                if g.dlm == PR and not noqueue:
                    # A waiting PR->EX conversion can deadlock against another node
                    # doing the same; go through NL (never blocks anyone) instead.
                    self.sync.convert(g.handle, Mode.NL, flags=0)
                    g.dlm = "NL"
                self.sync.convert(g.handle, Mode[mode], flags=flags)
        except LockError as e:
            if e.status == Status.EAGAIN:
                self.stats["busy"] += 1
                raise WouldBlock(g.name) from None
            raise LockLost(f"lock {g.name}: {e.status.name}") from None
        version = self._lvb_version(g.handle)
        if version is None and self.on_lvb_invalid is not None:
            self.on_lvb_invalid()
        if version is None or version != g.version:
            if g.version is not None or version is None:
                self.stats["lvb_misses"] += 1
            self._invalidate(g.name)
        else:
            self.stats["lvb_hits"] += 1
        g.version = version

    def _dlm_down(self, g: Glock, mode: str) -> None:
        """Convert ``g`` down to ``mode`` (NL or PR), publishing the LVB version."""
        if g.dlm != EX:
            self.sync.convert(g.handle, Mode[mode], flags=0)
            return
        if self.before_release is not None:
            self.before_release()  # no journal replay may touch what the next holder sees
        # Blocks stay cached across the demote: the LVB version decides at the next
        # grant whether they are still valid.  Nothing to write back (see module doc).
        if g.version is None:  # the LVB was invalid: start from a value no one cached
            g.version = random.getrandbits(62)
            g.dirty = False
        elif g.dirty:
            g.version += 1
            g.dirty = False
        self.sync.convert(g.handle, Mode[mode], flags=Flag.VALBLK, lvb=LVB.pack(g.version))

    def _release(self, g: Glock) -> None:
        """Give the DLM lock back (unlock is asynchronous: it does not wait for the
        master); from EX the LVB is written with the version, bumped if changed."""
        if g.dlm == EX:
            if self.before_release is not None:
                self.before_release()
            if g.version is None:
                g.version = random.getrandbits(62)
            elif g.dirty:
                g.version += 1
            g.dirty = False
            self.sync.unlock(g.handle, lvb=LVB.pack(g.version), flags=Flag.VALBLK)
        else:
            self.sync.unlock(g.handle)

    # --------------------------------------------------------- LockLayer
    def lock(self, name: str, mode: str, noqueue: bool = False) -> _Hold:
        """Hold glock ``name`` locally in ``mode``, asking the DLM only when the node's
        mode is not enough.  WouldBlock with ``noqueue`` when that would wait."""
        with self._cond:
            self.stats["locks"] += 1
            g = self._glocks.get(name)
            if g is None:
                g = self._glocks[name] = Glock(name)
            while True:
                if self._stop:
                    raise LockLost(f"lock {name}: lock layer stopped")
                cur = self._glocks.get(name)
                if cur is not g:  # forgotten (evicted) while this thread waited
                    g = cur if cur is not None else self._glocks.setdefault(name, Glock(name))
                now = time.monotonic()
                local_ok = not g.writer and (mode == PR or not g.readers)
                blocked = g.busy or not local_ok or self._demote_due(g, now)
                if blocked:
                    if noqueue:
                        self.stats["busy"] += 1
                        raise WouldBlock(name)
                    self._cond.wait(self.hold if g.demote is not None else None)
                    continue
                if _RANK[g.dlm] >= _RANK[mode]:
                    self.stats["cached"] += 1
                    break
                g.busy = True
                self._cond.release()
                try:
                    self._dlm_up(g, mode, noqueue)
                    ok = True
                except BaseException:
                    ok = False
                    raise
                finally:
                    self._cond.acquire()
                    g.busy = False
                    if ok:
                        g.dlm = mode
                        g.granted_at = time.monotonic()
                    self._cond.notify_all()
            if mode == EX:
                g.writer = True
            else:
                g.readers += 1
            g.used = time.monotonic()
            return _Hold(g, mode)

    def convert(self, handle: _Hold, mode: str, noqueue: bool = False) -> None:
        """Upgrade a local PR hold to EX (or down to PR); NOQUEUE semantics for the DLM."""
        g = handle.g
        if handle.mode == mode:
            return
        if mode == PR:
            with self._cond:
                g.writer = False
                g.readers += 1
                handle.mode = PR
                self._cond.notify_all()
            return
        with self._cond:
            now = time.monotonic()
            if g.writer or g.readers != 1 or g.busy or self._demote_due(g, now):
                self.stats["busy"] += 1
                raise WouldBlock(g.name)
            if g.dlm == EX:
                g.readers = 0
                g.writer = True
                handle.mode = EX
                return
            g.busy = True
        ok = False
        try:
            self._dlm_up(g, EX, True)
            ok = True
        finally:
            with self._cond:
                g.busy = False
                if ok:
                    g.dlm = EX
                    g.granted_at = time.monotonic()
                    g.readers = 0
                    g.writer = True
                    handle.mode = EX
                self._cond.notify_all()

    def unlock(self, handle: _Hold) -> None:
        """Drop the local hold; the DLM lock stays with the node (cached)."""
        g = handle.g
        with self._cond:
            if handle.mode == EX:
                g.writer = False
            else:
                g.readers -= 1
            if g.demote is not None or len(self._glocks) > self.max_glocks:
                self._cond.notify_all()

    def mark_dirty(self, handle: _Hold) -> None:
        """A transaction committed a change under this EX hold: bump the LVB at demote."""
        handle.g.dirty = True

    # ------------------------------------------------------------ demotes
    def _pick(self, now: float) -> tuple[Glock, str] | tuple[None, float | None]:
        wait: float | None = None
        for g in self._glocks.values():
            if g.demote is None or not g.idle():
                continue
            due = g.granted_at + self.hold
            if now < due:
                wait = due - now if wait is None else min(wait, due - now)
                continue
            target = PR if g.demote == int(Mode.PR) and g.dlm == EX else "NL"
            return g, target
        return None, wait

    def _evict(self) -> Glock | None:
        """The least recently used idle glock to forget once there are too many."""
        if len(self._glocks) <= self.max_glocks:
            return None
        idle = [g for g in self._glocks.values() if g.idle() and g.handle is not None]
        return min(idle, key=lambda g: g.used) if idle else None

    def _demote_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    g, info = self._pick(time.monotonic())
                    if g is not None:
                        break
                    victim = self._evict()
                    if victim is not None:
                        g, info = victim, "forget"
                        break
                    self._cond.wait(info if isinstance(info, float) else None)
                g.busy = True
                seen = g.bseq
            target = str(info)
            try:
                if target == "forget":
                    self._release(g)
                    self._invalidate(g.name)
                elif _RANK[g.dlm] > _RANK[target]:
                    self._dlm_down(g, target)
                    self.stats["demotes"] += 1
            except Exception:  # noqa: BLE001 - the demote thread must survive anything
                # LockError (lockspace gone) or LockLost (withdrawn: the checkpoint
                # failed): forget the glock and its blocks; the mount fails with EIO.
                self._invalidate(g.name)
                target = "lost"
            with self._cond:
                g.busy = False
                if target in ("forget", "lost"):
                    self._glocks.pop(g.name, None)
                    g.handle = None
                    g.dlm = None
                else:
                    g.dlm = target
                if g.bseq == seen:  # a bast that came during the conversion still counts
                    g.demote = None
                self._cond.notify_all()

    # ------------------------------------------------------------- teardown
    def drop_all(self) -> None:
        """Release every cached DLM lock (umount); waits for holders to finish."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            glocks = list(self._glocks.values())
            self._glocks = {}
        self._worker.join(5)
        for g in glocks:
            if g.handle is None:
                continue
            try:
                self._release(g)
            except (LockError, LockLost):
                pass
            self._invalidate(g.name)
        with self._cond:  # usable again (a later mount of the same layer)
            self._stop = False
        self._worker = self._start_worker()

    def describe(self) -> list[dict[str, Any]]:
        """The glocks this node holds (for ``storaged fs status``)."""
        with self._cond:
            return [{"name": g.name, "dlm": g.dlm, "readers": g.readers, "writer": g.writer,
                     "demote": None if g.demote is None else Mode(g.demote).name,
                     "version": g.version} for g in self._glocks.values()]
