"""The background worker: recovery onto spares, resync after an unclean
shutdown, check and repair (md's sync_action), throttled between
speed_limit_min and speed_limit_max."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storaged.raid.members import (
    CHECKPOINT_BYTES,
    FAULTY,
    IN_SYNC,
    RECOVERING,
    REPLACING,
    SPARE,
    RaidError,
    _MemberIOError,
)

log = logging.getLogger("storaged.raid")

class SyncWorker:
    """Background recovery, resync, check and repair.

    A part of :class:`~storaged.raid.array.RaidArray` (a mixin): its methods use the
    array's state and run under its lock, like the rest of the array."""

    # ------------------------------------------------------------ background work
    def _queue(self, action: str) -> None:
        if action not in self._want:
            self._want.append(action)
        self._idle.clear()
        self._wake.notify_all()

    def _maybe_recover(self) -> None:
        """Put spares into missing slots (md's remove_and_add_spares) and start recovery."""
        if self.failed or self.geo.level == 0:
            return
        slots = self.slots()
        spares = [m for m in self.members if m.state == SPARE]
        for slot, cur in enumerate(slots):
            if cur is None and spares:
                sp = spares.pop(0)
                sp.state, sp.slot, sp.recovery_offset = RECOVERING, slot, 0
                log.info("raid %s: recovering slot %d onto %s", self.name, slot, sp.path)
                self._sync_sbs()
        if any(m.state in (RECOVERING, REPLACING) for m in self.members):
            self._queue("recover")

    def start_sync(self, action: str) -> None:
        """Start ``check`` or ``repair`` (md's sync_action) in the background."""
        if action not in ("check", "repair"):
            raise RaidError(f"unknown sync action {action!r}")
        with self.lock:
            if self.geo.level == 0:
                raise RaidError("raid0 has no redundancy to check")
            if self.degraded():
                raise RaidError(f"array {self.name} is degraded; {action} needs all members")
            if self.sync is not None or self._want:
                raise RaidError(f"array {self.name} is busy "
                                f"({self.sync.action if self.sync else self._want[0]})")
            self._queue(action)

    def wait_idle(self, timeout: float | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Block until no background action is pending; True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._idle.wait(0.25 if left is None else min(0.25, left)):
                return True
            if progress is not None:
                with self.lock:
                    if self.sync is not None:
                        progress(self.sync.describe())

    def run_pending(self) -> None:
        """Run queued background actions in the caller's thread (no-worker mode, tests)."""
        while self._step_action():
            pass

    def _stop_worker(self) -> None:
        with self.lock:
            self._abort = True
            self._wake.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()
            self._worker = None

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._want and not self._abort:
                    if not self.clean and self.resync_from is None and self._last_write and \
                            time.monotonic() - self._last_write >= self.safe_mode_delay:
                        self._sc_destage_all()       # cached stripes home before "clean"
                        self.clean = True            # md safe mode: idle -> clean
                        if not self.failed:
                            self._sync_sbs()
                    if self.bitmap is not None and self.bitmap.bits:
                        self.settle_bitmap()
                    self._idle.set()
                    wait = None if self.clean else self.safe_mode_delay / 2
                    if self.bitmap is not None and self.bitmap.bits and not self.degraded():
                        wait = min(wait or 1.0, max(self.bitmap_clear_delay / 2, 0.05))
                    self._wake.wait(wait)
                if self._abort:
                    self._idle.set()
                    return
            try:
                self._step_action()
            except Exception:  # never let the worker die silently
                log.exception("raid %s: background action failed", self.name)
                with self.lock:
                    self.sync = None
                    self._want.clear()

    def _step_action(self) -> bool:
        """Run the first queued action to completion (throttled); False if none."""
        with self.lock:
            if not self._want:
                self._idle.set()
                return False
            action = self._want[0]
            if self.failed:
                self._want.clear()
                return False
            total = self.geo.member_bytes
            start = 0
            if action == "recover":
                rec = [m for m in self.members if m.state in (RECOVERING, REPLACING)]
                if not rec:
                    self._want.pop(0)
                    return True
                start = min(m.recovery_offset for m in rec)
            elif action == "resync":
                start = min(self.resync_from or 0, total)
            self.sync = SyncState(action, total, pos=start)
            if action == "recover":
                self.sync.members = {id(m) for m in rec}
                self.sync.by_bitmap = self.bitmap is not None and \
                    all(m.bitmap_recovery for m in rec)
            elif action == "resync":
                self.sync.by_bitmap = self.bitmap is not None
            if action in ("check", "repair"):
                self.mismatch_cnt = 0
        step = self.geo.chunk if self.geo.level != 1 else 1 << 20
        step = min(step, 1 << 20)
        if self.sync is not None and self.sync.by_bitmap and self.bitmap is not None:
            step = min(step, self.bitmap.chunksize)
        last_ckpt = start
        pos = start
        while pos < total:
            with self.lock:
                if self._abort or self.failed or self.sync is None:
                    return self._finish(action, completed=False)
                if action == "recover" and not any(m.state in (RECOVERING, REPLACING)
                                                   for m in self.members):
                    return self._finish(action, completed=False)
                n = min(step, total - pos)
                if self.sync.by_bitmap and self.bitmap is not None and \
                        not self.bitmap.dirty(pos, pos + n):
                    pos += n                  # clean region: members agree already
                    self.sync.pos = pos
                    continue
                mism = self._sync_range(action, pos, n)
                pos += n
                self.sync.pos = pos
                self.sync.done_bytes += n
                self.sync.synced_bytes += n
                self.sync.mismatches += mism
                self.mismatch_cnt = self.sync.mismatches
                now = time.monotonic()
                self.sync.window.append((now, self.sync.done_bytes))
                if len(self.sync.window) > 20:
                    self.sync.window.pop(0)
                if pos - last_ckpt >= CHECKPOINT_BYTES:
                    last_ckpt = pos
                    self._checkpoint()
            self._throttle()
        with self.lock:
            return self._finish(action, completed=True)

    def _throttle(self) -> None:
        """md's is_mddev_idle/speed_limit logic: slow down to min under foreground I/O."""
        while True:
            with self.lock:
                if self.sync is None or self._abort:
                    return
                speed = self.sync.speed()
                busy = time.monotonic() - self._last_fg < 0.5
                limit = self.speed_limit_min if busy else self.speed_limit_max
            if speed <= limit:
                return
            time.sleep(0.01 if not busy else 0.05)

    def _checkpoint(self) -> None:
        if self.sync is None:
            return
        if self.sync.action == "recover":
            for m in self.members:
                if m.state in (RECOVERING, REPLACING) and id(m) in self.sync.members:
                    m.recovery_offset = max(m.recovery_offset, min(self.sync.pos,
                                                                   self.geo.member_bytes))
            self._sync_sbs(bump=False)
        elif self.sync.action == "resync":
            self.resync_from = self.sync.pos
            self._sync_sbs(bump=False)

    def _finish(self, action: str, completed: bool) -> bool:
        sync = self.sync
        if not completed:
            self._checkpoint()
        if sync is not None:
            self.last_sync = {"action": action, "completed": completed,
                              "bytes": sync.synced_bytes, "by_bitmap": sync.by_bitmap}
        self.sync = None
        if self._want and self._want[0] == action:
            self._want.pop(0)
        if completed and action == "recover":
            for m in self.members:
                if m.state == REPLACING and sync is not None and id(m) in sync.members:
                    for old in [o for o in self.members
                                if o.slot == m.slot and o.state == IN_SYNC]:
                        old.state = FAULTY       # md: the replaced member is marked faulty
                        log.info("raid %s: %s replaced by %s in slot %d", self.name,
                                 old.path, m.path, m.slot)
                    m.state = IN_SYNC
                    m.recovery_offset = 0
                elif m.state == RECOVERING and sync is not None and id(m) in sync.members:
                    m.state = IN_SYNC
                    m.recovery_offset = 0
                    m.bitmap_recovery = False
                    log.info("raid %s: recovery of slot %d onto %s complete", self.name,
                             m.slot, m.path)
            self._sync_sbs()
            self._maybe_recover()
        elif completed and action == "resync":
            self.resync_from = None
            self.clean = False
            self._last_write = time.monotonic()   # safe mode marks it clean shortly
            self._sync_sbs(bump=False)
        elif completed and sync is not None:
            self.last_check = {"action": action, "mismatch_cnt": sync.mismatches,
                               "finished": time.time()}
        elif not completed and action == "recover" and not self._abort:
            if any(m.state in (RECOVERING, REPLACING) for m in self.members):
                self._queue("recover")
        elif not completed and not self._abort and action == "resync" and not self.failed:
            self._queue("resync")
        if not self._want:
            self._idle.set()
        return True

    def _sync_range(self, action: str, pos: int, n: int) -> int:
        """One step of an action on member bytes [pos, pos+n); returns mismatched sectors."""
        level = self.geo.level
        if level in (4, 5, 6):
            s, lo = divmod(pos, self.geo.chunk)
            self._sc_destage(s)           # the members hold the stripe's newest pages
            return self._sync_stripe(action, s, lo, lo + n)
        if level == 1:
            return self._sync_copies(action, [(slot, pos) for slot in
                                              range(self.geo.raid_disks)], n)
        if level == 10:
            chunk = self.geo.chunk
            row, lo = divmod(pos, chunk)
            mism = 0
            done: set[int] = set()
            for d in range(self.geo.raid_disks):
                c = self.geo.raid10_chunk_of(d, row)
                if c is None or c in done:
                    continue
                done.add(c)
                mism += self._sync_copies(action, [(dd, r * chunk + lo) for dd, r in
                                                   self.geo.raid10_copies(c)], n)
            return mism
        return 0

    def _sync_copies(self, action: str, copies: list[tuple[int, int]], n: int) -> int:
        good = self._mirror_read(copies, 0, n)
        mism = 0
        for slot, off in copies:
            m = self._slot_member(slot)
            if m is None:
                continue
            if m.state == RECOVERING:
                if action == "recover" and off + n > m.recovery_offset:
                    self._mwrite(m, off, good)
                continue
            if action == "recover":
                for r in self._replacements(slot):
                    if off + n > r.recovery_offset:
                        self._mwrite(r, off, good)
                continue
            try:
                cur = self._mread(m, off, n)
            except _MemberIOError:
                self._read_error(m, off, good)
                continue
            if cur != good:
                mism += _diff_sectors(cur, good)
                if action != "check":
                    self._mwrite(m, off, good)
        return mism

    def _sync_stripe(self, action: str, s: int, lo: int, hi: int) -> int:
        sm = self.geo.stripe(s)
        base = s * self.geo.chunk + lo
        length = hi - lo
        if action == "recover":
            rec = [m for m in self.members if m.state in (RECOVERING, REPLACING)
                   and base + length > m.recovery_offset]
            if not rec:
                return 0
            data, _, _ = self._stripe_read(s, lo, hi)
            p, q = self._parity(sm.qexp, data, length)
            for m in rec:
                if m.slot == sm.pd:
                    blk: Any = p
                elif m.slot == sm.qd:
                    blk = q
                else:
                    blk = data[sm.data.index(m.slot)]
                self._mwrite(m, base, blk)
            return 0
        data, p, q = self._stripe_read(s, lo, hi, parity=True)
        pn, qn = self._parity(sm.qexp, data, length)
        mism = 0
        if p is not None and p != pn:
            mism += _diff_sectors(p, pn)
        if qn is not None and q is not None and q != qn:
            mism += _diff_sectors(q, qn)
        if action == "check" or (mism == 0 and p is not None):
            return mism if action != "resync" else 0
        m = self._writable(sm.pd)
        if m is not None:
            self._mwrite(m, base, pn)
        if qn is not None:
            m = self._writable(sm.qd)
            if m is not None:
                self._mwrite(m, base, qn)
        return mism if action != "resync" else 0


@dataclass
class SyncState:
    """Progress of the running background action (md's sync_action)."""

    action: str                       # recover, resync, check, repair
    total: int                        # bytes per member to cover
    pos: int = 0
    started: float = field(default_factory=time.monotonic)
    done_bytes: int = 0
    mismatches: int = 0               # sectors
    members: set[int] = field(default_factory=set)   # id() of members being recovered
    by_bitmap: bool = False           # only regions dirty in the write-intent bitmap
    synced_bytes: int = 0             # bytes actually resynced/recovered (not skipped)
    window: list[tuple[float, int]] = field(default_factory=list)

    def speed(self) -> float:
        """Recent speed in KiB/s (md averages over a short window too)."""
        now = time.monotonic()
        t0, b0 = self.window[0] if self.window else (self.started, 0)
        el = now - t0
        return (self.done_bytes - b0) / 1024 / el if el > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        speed = self.speed()
        left = max(self.total - self.pos, 0)
        return {"action": self.action, "pos": self.pos, "total": self.total,
                "percent": round(100.0 * self.pos / self.total, 1) if self.total else 100.0,
                "speed_kib": round(speed), "eta_s": round(left / 1024 / speed) if speed else None}


def _diff_sectors(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Mismatch in md's units: 8 sectors for each differing 4 KiB page."""
    out = 0
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            out += 8
    return out
