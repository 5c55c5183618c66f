"""RaidArray: an md-compatible RAID 0/1/4/5/6/10 BlockDevice over member BlockDevices.

Behaviour follows Linux md where it matters to an admin:

* Data placement is md's (``storaged.raid.layout``) behind a v1.2 superblock
  (``storaged.raid.superblock``) on every member, so ``mdadm --examine``
  reads our members and a Linux host could assemble them.
* A member whose I/O fails is marked faulty: its role becomes 0xfffe in the
  superblocks of the others and ``events`` is bumped (md_error ->
  md_update_sb).  The array keeps serving degraded while redundancy allows.
* A read error is repaired the way raid1/raid5 ``fix_read_error`` does:
  the block is rebuilt from the other members and rewritten; only if the
  rewrite fails (or more than ``max_corrected_read_errors`` pile up) is the
  member failed.  ``cnt_corrected_read`` counts the fixes.
* A spare takes a failed slot and is rebuilt in the background ("recovery"),
  throttled like md: never faster than ``speed_limit_max`` KiB/s, and down
  to ``speed_limit_min`` KiB/s while the array has foreground I/O.  The
  spare's ``recovery_offset`` is checkpointed so a restart resumes.
* The array is marked dirty (``resync_offset`` = 0) before the first write
  and clean again after ``safe_mode_delay`` seconds without writes or on
  flush/close, like md's safe mode; a dirty array found at assembly is
  resynced.  ``check`` counts mismatches (md's ``mismatch_cnt``, in
  sectors), ``repair`` rewrites parity/copies.
* Parity updates are reconstruct-writes (read the rest of the stripe's rows,
  compute P/Q with the ``storaged.fastio`` kernels, write).

All I/O and every state change runs under one lock; the background worker
takes it for one step at a time, so foreground I/O interleaves.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from storaged import fastio
from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.raid import journal as jrnl
from storaged.raid.bitmap import BITMAP_OFFSET_SECTORS, WriteIntentBitmap
from storaged.raid.layout import REDUNDANCY, Geometry, layout_name
from storaged.raid.superblock import (
    FEATURE_BITMAP_OFFSET,
    FEATURE_RECOVERY_OFFSET,
    FEATURE_REPLACEMENT,
    MAX_SECTOR,
    ROLE_FAULTY,
    ROLE_SPARE,
    SECTOR,
    Superblock,
    SuperblockError,
    md_time,
    mdadm_uuid,
    read_superblock,
    write_superblock,
)

log = logging.getLogger("storaged.raid")

IN_SYNC = "in_sync"
RECOVERING = "recovering"
REPLACING = "replacing"       # md's want_replacement: a copy of a live slot's member
SPARE = "spare"
FAULTY = "faulty"

SPEED_LIMIT_MIN = 1000        # KiB/s, md's /proc/sys/dev/raid/speed_limit_min
SPEED_LIMIT_MAX = 200000      # KiB/s, md's speed_limit_max
SAFE_MODE_DELAY = 0.2         # seconds, md's safe_mode_delay
MAX_CORRECTED_READ_ERRORS = 20
CHECKPOINT_BYTES = 8 << 20    # recovery_offset written at least this often
SPLIT_RECORD = 32 << 10       # journal payloads this large are written apart from the header


class RaidError(Exception):
    """An administrative RAID operation was refused (message says why)."""


class _MemberIOError(Exception):
    def __init__(self, member: Member, reading: bool, err: OSError) -> None:
        super().__init__(str(err))
        self.member = member
        self.reading = reading


@dataclass(eq=False)
class Member:
    """One member device and what the array thinks of it."""

    path: str
    dev: BlockDevice | None
    sb: Superblock
    state: str
    slot: int = -1
    recovery_offset: int = 0          # bytes of the data area already rebuilt
    corrected: int = 0
    bitmap_recovery: bool = False     # re-added: only bitmap-dirty regions need recovery

    @property
    def dev_number(self) -> int:
        return self.sb.dev_number

    @property
    def data_offset(self) -> int:
        return self.sb.data_offset * SECTOR


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


class RaidArray:
    """A running md array; implements the BlockDevice protocol."""

    def __init__(self, name: str, geometry: Geometry, members: list[Member], template: Superblock,
                 block_size: int = 512, start_worker: bool = True,
                 bitmap: WriteIntentBitmap | None = None,
                 journal: tuple[int, int] | None = None, journal_sync: bool = False) -> None:
        geometry.validate()
        self.name = name
        self.geo = geometry
        self.block_size = block_size
        self.read_only = False
        self.thin = False
        self.members = members
        self.template = template          # array-wide superblock fields
        self.events = max((m.sb.events for m in members), default=0)
        self.lock = threading.RLock()
        self.speed_limit_min = SPEED_LIMIT_MIN
        self.speed_limit_max = SPEED_LIMIT_MAX
        self.safe_mode_delay = SAFE_MODE_DELAY
        self.mismatch_cnt = 0
        self.last_check: dict[str, Any] | None = None
        self.clean = template.resync_offset == MAX_SECTOR
        self.resync_from: int | None = None if self.clean else template.resync_offset
        self.failed = False
        self.sync: SyncState | None = None
        self._want: list[str] = []
        self._abort = False
        self._closed = False
        self._last_fg = 0.0
        self._last_write = 0.0
        self._wake = threading.Condition(self.lock)
        self._idle = threading.Event()
        self._idle.set()
        self.bitmap = bitmap
        self.bitmap_clear_delay = float(bitmap.daemon_sleep) if bitmap is not None else 0.0
        self.journal = journal            # (ring start, ring end) in member bytes, or None
        self._jseq = 1
        self._jupto = 1
        self._jpos = 0
        self._jroles: list[int] | None = None
        self._jlive: dict[int, list[tuple[int, int]]] = {}   # stripe -> rows with live records
        self._jbusy = False               # a journaled stripe update is between its writes
        self._jdeferred = False           # a checkpoint waits for that update to finish
        self.last_sync: dict[str, Any] | None = None
        self.journal_replayed = 0
        self.journal_fua = journal_sync   # records durable before home writes (power cut)
        self._check_alive()
        if self.journal is not None and not self.failed:
            self._journal_replay()
        if start_worker:
            self._worker = threading.Thread(target=self._run, name=f"raid-{name}", daemon=True)
            self._worker.start()
        else:
            self._worker = None
        with self.lock:
            if self.resync_from is not None:
                self._queue("resync")
            self._maybe_recover()

    # ------------------------------------------------------------ introspection
    @property
    def size(self) -> int:
        return self.geo.size - self.geo.size % self.block_size

    @property
    def uuid(self) -> str:
        return mdadm_uuid(self.template.set_uuid)

    def slots(self) -> list[Member | None]:
        """The member in each raid slot (None: missing)."""
        out: list[Member | None] = [None] * self.geo.raid_disks
        for m in self.members:
            if m.state in (IN_SYNC, RECOVERING) and 0 <= m.slot < len(out):
                out[m.slot] = m
        return out

    def degraded(self) -> int:
        """Number of slots without an in-sync member."""
        return sum(1 for m in self.slots() if m is None or m.state != IN_SYNC)

    def state_words(self) -> list[str]:
        words = ["clean" if self.clean else "active"]
        if self.failed:
            words.append("FAILED")
        elif self.degraded():
            words.append("degraded")
        action = self.sync.action if self.sync is not None else \
            (self._want[0] if self._want else None)
        if action is not None:
            words.append({"recover": "recovering", "resync": "resyncing",
                          "check": "checking", "repair": "repairing"}[action])
        return words

    def status(self) -> dict[str, Any]:
        """JSON-ready view (``storaged raid status``)."""
        with self.lock:
            members = []
            for m in sorted(self.members, key=lambda m: m.dev_number):
                members.append({"path": m.path, "dev_number": m.dev_number, "state": m.state,
                                "slot": m.slot if m.state in (IN_SYNC, RECOVERING, REPLACING)
                                else None,
                                "recovery_offset": m.recovery_offset
                                if m.state in (RECOVERING, REPLACING) else None,
                                "corrected_read_errors": m.corrected})
            return {
                "bitmap": None if self.bitmap is None else {
                    "chunk": self.bitmap.chunksize, "bits": self.bitmap.nbits,
                    "dirty": len(self.bitmap.bits),
                    "events_cleared": self.bitmap.events_cleared},
                "journal": None if self.journal is None else
                ("sync" if self.journal_fua else "async"),
                "last_sync": self.last_sync,
                "name": self.name, "uuid": self.uuid, "level": self.geo.level,
                "layout": layout_name(self.geo.level, self.geo.layout),
                "chunk": self.geo.chunk if self.geo.level != 1 else 0,
                "raid_disks": self.geo.raid_disks, "size": self.size,
                "member_size": self.geo.member_bytes, "events": self.events,
                "state": ", ".join(self.state_words()), "degraded": self.degraded(),
                "slots": "".join("U" if m is not None and m.state == IN_SYNC else "_"
                                 for m in self.slots()),
                "members": members, "sync": self.sync.describe() if self.sync else None,
                "mismatch_cnt": self.mismatch_cnt, "last_check": self.last_check,
                "speed_limit_min": self.speed_limit_min, "speed_limit_max": self.speed_limit_max,
            }

    # ------------------------------------------------------------ superblocks
    def _roles(self) -> list[int]:
        max_dev = max([m.dev_number + 1 for m in self.members] + [self.template.max_dev])
        roles = [ROLE_FAULTY] * max_dev          # md: unknown devices are "faulty"
        for m in self.members:
            if m.state in (IN_SYNC, RECOVERING, REPLACING):
                roles[m.dev_number] = m.slot
            elif m.state == SPARE:
                roles[m.dev_number] = ROLE_SPARE
        return roles

    def _member_sb(self, m: Member, roles: list[int]) -> Superblock:
        t = self.template
        sb = m.sb
        sb.set_uuid, sb.set_name, sb.level, sb.layout = t.set_uuid, t.set_name, t.level, t.layout
        sb.size, sb.chunksize, sb.raid_disks, sb.ctime = t.size, t.chunksize, t.raid_disks, t.ctime
        sb.dev_roles = list(roles)
        sb.max_dev = len(roles)
        sb.events = self.events
        sb.utime = md_time()
        sb.resync_offset = MAX_SECTOR if self.clean else (self.resync_from or 0)
        sb.cnt_corrected_read = m.corrected
        sb.feature_map &= ~(FEATURE_RECOVERY_OFFSET | FEATURE_BITMAP_OFFSET)
        sb.recovery_offset = 0
        sb.bitmap_offset = 0
        if self.bitmap is not None:
            sb.feature_map |= FEATURE_BITMAP_OFFSET
            sb.bitmap_offset = self._bitmap_offset()
        sb.feature_map &= ~FEATURE_REPLACEMENT
        if m.state in (RECOVERING, REPLACING):
            sb.feature_map |= FEATURE_RECOVERY_OFFSET
            sb.recovery_offset = m.recovery_offset // SECTOR
        if m.state == REPLACING:
            sb.feature_map |= FEATURE_REPLACEMENT
        return sb

    def _sync_sbs(self, bump: bool = True) -> None:
        """md_update_sb: bump events and write every live member's superblock."""
        if bump:
            self.events += 1
        roles = self._roles()
        if self.bitmap is not None:
            self.bitmap.events = self.events
        for m in list(self.members):
            if m.state == FAULTY or m.dev is None:
                continue
            try:
                write_superblock(m.dev, self._member_sb(m, roles))
                if self.bitmap is not None:
                    self._write_bitmap(m)
            except OSError as e:
                log.error("raid %s: superblock write to %s failed: %s", self.name, m.path, e)
                self._fail(m, f"superblock write failed: {e}")
                return
        if self.journal is not None and roles != self._jroles and not self.failed:
            if self._jbusy:
                self._jdeferred = True    # after the stripe update in progress
            else:
                self._journal_checkpoint()

    # ------------------------------------------------------------ write-intent bitmap
    def _write_bitmap(self, m: Member) -> None:
        assert m.dev is not None and self.bitmap is not None
        m.dev.write((m.sb.super_offset + self._bitmap_offset()) * SECTOR, self.bitmap.encode(),
                    fua=True)

    def _bitmap_offset(self) -> int:
        """Sectors from the superblock to the bitmap (kept from md-made arrays; else 8)."""
        return self.template.bitmap_offset or BITMAP_OFFSET_SECTORS

    def _bitmap_to_all(self) -> None:
        """Write the bitmap durably to every live member (before data writes rely on it)."""
        for m in list(self.members):
            if m.state in (IN_SYNC, RECOVERING, REPLACING, SPARE) and m.dev is not None:
                try:
                    self._write_bitmap(m)
                except OSError as e:
                    self._fail(m, f"bitmap write failed: {e}")

    def _member_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Member byte ranges that a write of array bytes [offset, offset+length) touches."""
        level = self.geo.level
        if level == 1:
            return [(offset, offset + length)]
        chunk = self.geo.chunk
        dd = self.geo.data_disks
        out: list[tuple[int, int]] = []
        for _pos, c, within, n in self._pieces(offset, length):
            if level == 10:
                for _d, r in self.geo.raid10_copies(c):
                    out.append((r * chunk + within, r * chunk + within + n))
            else:
                row = c // dd
                out.append((row * chunk + within, row * chunk + within + n))
        return out

    def settle_bitmap(self, force: bool = False) -> int:
        """Clear bits whose writes have settled (md's bitmap daemon); returns bits cleared.

        Only while every slot has an in-sync member and no resync/recovery is
        pending: a dirty bit is what lets a missing member come back cheaply.
        Members are flushed first so the data the bit covered is durable.
        """
        with self.lock:
            bm = self.bitmap
            if bm is None or not bm.bits or self.failed or self._closed:
                return 0
            if self.degraded() or self.sync is not None or self._want \
                    or self.resync_from is not None:
                return 0
            done = set(bm.bits) if force else bm.settled(self.bitmap_clear_delay)
            if not done:
                return 0
            self.flush()
            bm.bits -= done
            for b in done:
                bm.last_write.pop(b, None)
            bm.events_cleared = self.events
            bm.events = self.events
            self._bitmap_to_all()
            return len(done)

    # ------------------------------------------------------------ stripe journal
    def _journal_members(self) -> list[Member]:
        return [m for m in self.members
                if m.state in (IN_SYNC, RECOVERING, REPLACING, SPARE) and m.dev is not None]

    def _journal_checkpoint(self) -> None:
        """Flush members and restart the ring: every earlier record is durable at home."""
        assert self.journal is not None
        start, _end = self.journal
        for m in self._journal_members() if self.journal_fua else []:
            try:
                assert m.dev is not None
                m.dev.flush()
            except OSError as e:
                self._fail(m, f"flush failed: {e}")
        seq = self._jseq
        self._jseq += 1
        self._jupto = seq
        rec = jrnl.Record(seq, seq, 0, 0, 0xFFFF, ())
        raw = rec.encode(self.template.set_uuid)
        for m in self._journal_members():
            try:
                assert m.dev is not None
                m.dev.write(start, raw, fua=self.journal_fua)
            except OSError as e:
                self._fail(m, f"journal write failed: {e}")
        self._jpos = start + rec.size
        self._jroles = self._roles()
        self._jlive.clear()

    def _jlive_overlaps(self, s: int, lo: int, hi: int) -> bool:
        """Whether rows [lo, hi) of stripe ``s`` have records newer than the last checkpoint."""
        return any(a < hi and lo < b for a, b in self._jlive.get(s, ()))

    def _journal_replay(self) -> None:
        """Copy complete journaled stripe updates home (before any I/O is served)."""
        assert self.journal is not None
        start, end = self.journal
        uuid = self.template.set_uuid
        found: dict[int, list[jrnl.Record]] = {}
        by_slot: dict[int, Member] = {}
        for m in self.members:
            if m.state in (IN_SYNC, RECOVERING) and m.dev is not None:
                by_slot[m.slot] = m
                try:
                    area = m.dev.read(start, end - start)
                except OSError as e:
                    log.warning("raid %s: cannot read journal on %s: %s", self.name, m.path, e)
                    continue
                found[m.slot] = [r for _, r in jrnl.parse_ring(area, uuid)]
        plan, nxt = jrnl.plan_replay(found, set(by_slot))
        for r in plan:
            m = by_slot[r.slot]
            base = r.stripe * self.geo.chunk + r.lo
            self._mwrite(m, base, r.payload)
        if plan:
            log.warning("raid %s: replayed %d journal records (%d stripe updates)", self.name,
                        len(plan), len({r.seq for r in plan}))
        self.journal_replayed = len(plan)
        self._jseq = max(self._jseq, nxt)
        self._journal_checkpoint()

    def _journal_write(self, s: int, lo: int, blocks: list[tuple[Member, Any]]) -> None:
        """Write one record per member (its new rows) durably, before the home writes."""
        assert self.journal is not None
        start, end = self.journal
        size = jrnl.HEADER + len(blocks[0][1]) if blocks else 0
        size = -(-size // jrnl.HEADER) * jrnl.HEADER   # records start on 4 KiB boundaries
        if self._jpos + size > end:
            self._journal_checkpoint()
        seq = self._jseq
        self._jseq += 1
        slots = tuple(m.slot for m, _ in blocks)
        if blocks:
            self._jlive.setdefault(s, []).append((lo, lo + len(blocks[0][1])))
        uuid = self.template.set_uuid
        for m, blk in blocks:
            try:
                assert m.dev is not None
                if len(blk) >= SPLIT_RECORD and not self.journal_fua:   # two writes, no copy
                    m.dev.write(self._jpos, jrnl.encode_header(
                        uuid, seq, self._jupto, s, lo, m.slot, slots, blk), fua=self.journal_fua)
                    m.dev.write(self._jpos + jrnl.HEADER, blk, fua=self.journal_fua)
                else:
                    m.dev.write(self._jpos, jrnl.encode_record(
                        uuid, seq, self._jupto, s, lo, m.slot, slots, blk), fua=self.journal_fua)
            except OSError as e:
                self._fail(m, f"journal write failed: {e}")
        self._jpos += size

    # ------------------------------------------------------------ failures
    def _check_alive(self) -> None:
        slots = self.slots()
        red = REDUNDANCY[self.geo.level]
        if self.geo.level == 1:
            alive = any(m is not None and m.state == IN_SYNC for m in slots)
        elif self.geo.level == 10:
            alive = all(any(slots[d] is not None and slots[d].state == IN_SYNC
                            for d, _ in self.geo.raid10_copies(c))
                        for c in range(self.geo.raid_disks))
        else:
            alive = self.degraded() <= red
        if not alive and not self.failed:
            log.error("raid %s: too many failed members, array FAILED", self.name)
        self.failed = not alive

    def _fail(self, m: Member, reason: str) -> None:
        """md_error: mark ``m`` faulty, tell the others, start recovery onto a spare."""
        with self.lock:
            if m.state == FAULTY:
                return
            log.warning("raid %s: member %s (slot %d) marked faulty: %s", self.name, m.path,
                        m.slot, reason)
            was = m.state
            m.state = FAULTY
            if was == IN_SYNC:
                for r in self._replacements(m.slot):
                    r.state = RECOVERING     # md: the replacement carries on as a recovery
                    r.bitmap_recovery = False
            self._check_alive()
            if self.failed:
                return  # md stops updating superblocks of a dead array
            if was == RECOVERING and self.sync is not None and self.sync.action == "recover":
                pass  # the worker notices the member is gone
            self._sync_sbs()
            self._maybe_recover()

    def fail(self, path: str) -> None:
        """Admin: mark a member faulty (mdadm --fail)."""
        with self.lock:
            m = self._member(path)
            if m.state == FAULTY:
                raise RaidError(f"{path} is already faulty")
            if m.state in (IN_SYNC, RECOVERING):
                old = m.state
                m.state = FAULTY
                self._check_alive()
                dead = self.failed
                m.state = old
                self._check_alive()
                if dead:
                    raise RaidError(f"failing {path} would stop raid{self.geo.level} "
                                    f"array {self.name}")
            self._fail(m, "failed by admin")

    def remove(self, path: str) -> Member:
        """Admin: take a faulty or spare member out of the array (mdadm --remove)."""
        with self.lock:
            m = self._member(path)
            if m.state in (IN_SYNC, RECOVERING):
                raise RaidError(f"{path} is active; fail it first")
            self.members.remove(m)
            self._sync_sbs()
            if m.dev is not None:
                m.dev.close()
            return m

    def add(self, dev: BlockDevice, path: str) -> Member:
        """Admin: add a device as a spare (it takes a missing slot at once)."""
        with self.lock:
            if any(m.path == path for m in self.members):
                raise RaidError(f"{path} is already a member of {self.name}")
            need = (self.template.data_offset * SECTOR + self.geo.member_bytes)
            if dev.size < need:
                raise RaidError(f"{path} is too small: {dev.size} bytes, need {need}")
            readd = self._readd_slot(dev)
            used = {m.dev_number for m in self.members}
            number = next(i for i in range(len(used) + 1) if i not in used)
            sb = Superblock(**{**self.template.__dict__, "dev_number": number,
                               "data_size": dev.size // SECTOR - self.template.data_offset,
                               "device_uuid": _new_uuid(), "feature_map": 0,
                               "recovery_offset": 0, "cnt_corrected_read": 0})
            if self.journal is not None:
                dev.write(jrnl.JOURNAL_START, jrnl.encode_area(
                    self.template.set_uuid, *self.journal, self.journal_fua), fua=True)
            m = Member(path, dev, sb, SPARE)
            if readd is not None:
                # md's re-add: the old slot, recovering only what the bitmap says changed
                m.state, m.slot, m.bitmap_recovery = RECOVERING, readd, True
                log.info("raid %s: re-added %s to slot %d (bitmap-based recovery)", self.name,
                         path, readd)
            self.members.append(m)
            self._sync_sbs()
            self._maybe_recover()
            return m

    def replace(self, path: str, dev: BlockDevice, new_path: str) -> Member:
        """Admin: hot-replace ``path`` by ``dev`` (md's want_replacement).

        The new device takes the same slot as a *replacement*: it receives
        every write at once and a background copy fills in the rest, while
        the old member keeps serving, so redundancy never drops.  When the
        copy is done the old member is marked faulty (remove it then); if
        the old member fails meanwhile, the copy carries on as a recovery.
        """
        with self.lock:
            old = self._member(path)
            if old.state != IN_SYNC:
                raise RaidError(f"{path} is not an in-sync member ({old.state})")
            if self.geo.level == 0:
                raise RaidError("raid0 cannot replace members (no redundancy to copy with)")
            if self._replacements(old.slot):
                raise RaidError(f"slot {old.slot} is already being replaced")
            m = self.add(dev, new_path)
            if m.state == SPARE:
                m.state, m.slot, m.recovery_offset = REPLACING, old.slot, 0
                log.info("raid %s: replacing %s (slot %d) by %s", self.name, path, old.slot,
                         new_path)
                self._sync_sbs()
                self._maybe_recover()
            return m

    def _readd_slot(self, dev: BlockDevice) -> int | None:
        """The slot ``dev`` may rejoin with a bitmap-based recovery, or None (md re-add rules).

        It must carry this array's superblock with an active role whose slot is
        missing now, and ``events`` no older than the bitmap's ``events_cleared``
        (nothing it lacks was cleared from the bitmap since it left).
        """
        if self.bitmap is None:
            return None
        try:
            old = read_superblock(dev)
        except (OSError, SuperblockError):
            return None
        if old.set_uuid != self.template.set_uuid or old.events > self.events:
            return None
        role = old.role
        if role >= self.geo.raid_disks or old.feature_map & FEATURE_RECOVERY_OFFSET:
            return None
        if self.slots()[role] is not None or old.events < self.bitmap.events_cleared:
            return None
        return role

    def _member(self, path: str) -> Member:
        for m in self.members:
            if m.path == path:
                return m
        raise RaidError(f"{path} is not a member of {self.name}")

    # ------------------------------------------------------------ member I/O
    def _usable(self, slot: int, off: int, length: int) -> Member | None:
        m = self._slot_member(slot)
        if m is None:
            return None
        if m.state == IN_SYNC or (m.state == RECOVERING and off + length <= m.recovery_offset):
            return m
        return None

    def _slot_member(self, slot: int) -> Member | None:
        for m in self.members:
            if m.slot == slot and m.state in (IN_SYNC, RECOVERING):
                return m
        return None

    def _writable(self, slot: int) -> Member | None:
        return self._slot_member(slot)

    def _mread(self, m: Member, off: int, length: int) -> bytes:
        try:
            assert m.dev is not None
            return m.dev.read(m.data_offset + off, length)
        except OSError as e:
            raise _MemberIOError(m, True, e) from e

    def _mwrite(self, m: Member, off: int, data: bytes | bytearray | memoryview,
                fua: bool = False) -> bool:
        """Write to a member; a failure marks it faulty (md_error) and returns False."""
        try:
            assert m.dev is not None
            m.dev.write(m.data_offset + off, data, fua=fua)
        except OSError as e:
            self._fail(m, f"write error: {e}")
            return False
        if m.state != REPLACING:
            for r in self._replacements(m.slot):   # a hot replacement sees every write
                try:
                    assert r.dev is not None
                    r.dev.write(r.data_offset + off, data, fua=fua)
                except OSError as e:
                    self._fail(r, f"write error: {e}")
        return True

    def _replacements(self, slot: int) -> list[Member]:
        return [r for r in self.members if r.state == REPLACING and r.slot == slot]

    def _read_error(self, m: Member, off: int, good: bytes) -> None:
        """fix_read_error: rewrite reconstructed data; fail the member if that fails."""
        m.corrected += 1
        if m.corrected > MAX_CORRECTED_READ_ERRORS:
            self._fail(m, "too many read errors")
            return
        if self._mwrite(m, off, good):
            try:
                assert m.dev is not None
                if m.dev.read(m.data_offset + off, len(good)) == bytes(good):
                    log.info("raid %s: read error corrected on %s at %d", self.name, m.path, off)
                    return
            except OSError:
                pass
            self._fail(m, "read error not corrected by rewrite")

    def _die(self) -> None:
        if self._closed:
            raise BlockDeviceError(errno.EBADF, f"raid array {self.name} is stopped")
        if self.failed:
            raise BlockDeviceError(errno.EIO, f"raid array {self.name} has failed")

    # ------------------------------------------------------------ parity stripes
    def _stripe_read(self, s: int, lo: int, hi: int, want: set[int] | None = None,
                     parity: bool = False) -> tuple[list[bytes], bytes | None, bytes | None]:
        """Data rows [lo, hi) of stripe ``s`` (reconstructing missing ones), and P/Q if asked.

        With ``want``, only those data indices are guaranteed in the result
        (others may be None unless needed for reconstruction).  ``parity``
        returns the P/Q as stored (None where the member is unusable).
        """
        geo = self.geo
        sm = geo.stripe(s)
        nd = len(sm.data)
        base = s * geo.chunk
        length = hi - lo
        data: list[Any] = [None] * nd
        bad: list[tuple[Member, int]] = []   # read errors to repair: (member, data index)
        missing: list[int] = []
        wanted = range(nd) if want is None else sorted(want)
        for k in wanted:
            m = self._usable(sm.data[k], base + lo, length)
            if m is None:
                missing.append(k)
                continue
            try:
                data[k] = self._mread(m, base + lo, length)
            except _MemberIOError:
                missing.append(k)
                bad.append((m, k))
        p = q = None
        if not missing and not parity:
            return data, None, None
        # Everything else is needed to rebuild.
        for k in range(nd):
            if data[k] is None and k not in missing:
                m = self._usable(sm.data[k], base + lo, length)
                if m is None:
                    missing.append(k)
                    continue
                try:
                    data[k] = self._mread(m, base + lo, length)
                except _MemberIOError:
                    missing.append(k)
                    bad.append((m, k))
        bad_p: Member | None = None
        bad_q: Member | None = None
        mp = self._usable(sm.pd, base + lo, length)
        if mp is not None:
            try:
                p = self._mread(mp, base + lo, length)
            except _MemberIOError:
                bad_p = mp
        mq = self._usable(sm.qd, base + lo, length) if sm.qd >= 0 else None
        if mq is not None:
            try:
                q = self._mread(mq, base + lo, length)
            except _MemberIOError:
                bad_q = mq
        if missing:
            self._reconstruct(sm.qexp, data, missing, p, q, length)
        if bad_p is not None or bad_q is not None:
            full = [bytes(d) for d in data]
            pn, qn = self._parity(sm.qexp, full, length)
            if bad_p is not None:
                self._read_error(bad_p, base + lo, pn)
                p = pn
            if bad_q is not None and qn is not None:
                self._read_error(bad_q, base + lo, qn)
                q = qn
        for m, k in bad:
            self._read_error(m, base + lo, data[k])
        return data, p, q

    def _reconstruct(self, qexp: tuple[int, ...], data: list[Any], missing: list[int],
                     p: bytes | None, q: bytes | None, length: int) -> None:
        nd = len(data)
        if len(missing) == 1 and p is not None:
            k = missing[0]
            out = bytearray(length)
            fastio.xor_gen(out, [p] + [data[i] for i in range(nd) if i != k])
            data[k] = out
            return
        if self.geo.level == 6 and q is not None:
            blocks: list[Any] = [None] * (nd + 2)
            for k in range(nd):
                blocks[qexp[k]] = data[k] if k not in missing else bytearray(length)
            if len(missing) == 1 and p is None:
                blocks[nd] = bytearray(length)
                blocks[nd + 1] = q
                fastio.raid6_recov_datap(blocks, qexp[missing[0]])
                data[missing[0]] = blocks[qexp[missing[0]]]
                return
            if len(missing) == 2 and p is not None:
                blocks[nd], blocks[nd + 1] = p, q
                fastio.raid6_recov_2data(blocks, qexp[missing[0]], qexp[missing[1]])
                for k in missing:
                    data[k] = blocks[qexp[k]]
                return
        self._check_alive()
        raise BlockDeviceError(errno.EIO, f"raid array {self.name}: stripe cannot be "
                               "reconstructed (too many members missing)")

    def _parity(self, qexp: tuple[int, ...], data: list[Any], length: int
                ) -> tuple[bytearray, bytearray | None]:
        p = bytearray(length)
        if self.geo.level != 6:
            fastio.xor_gen(p, data)
            return p, None
        q = bytearray(length)
        ordered: list[Any] = [None] * len(data)
        for k, d in enumerate(data):
            ordered[qexp[k]] = d
        fastio.pq_gen(p, q, ordered)
        return p, q

    def _stripe_write(self, s: int, lo: int, hi: int, pieces: list[tuple[int, int, memoryview]],
                      fua: bool) -> None:
        """Write rows [lo, hi) of stripe ``s``; pieces = (k, off in chunk, data).

        With the journal, the rows that the request writes on *every* data
        chunk (a full-stripe write of those rows) go home without journal
        records: no acknowledged data shares their parity, so a torn update
        there can only affect the unacknowledged data being written (md's
        PPL skips full-stripe writes for the same reason; this holds for
        RAID-6 and for a degraded array too, since the parity of those rows
        depends on nothing else).  Only the partial head/tail rows, which are
        read-modify/reconstruct-writes mixing old and new data, are journaled.
        """
        if self.journal is None:
            self._stripe_update(s, lo, hi, pieces, fua, False)
            return
        f_lo, f_hi = lo, lo
        if len(pieces) > 1 and len(pieces) == self.geo.data_disks and \
                len({k for k, _, _ in pieces}) == self.geo.data_disks:
            f_lo = max(a for _, a, _ in pieces)
            f_hi = min(a + len(d) for _, a, d in pieces)
        if f_lo >= f_hi:
            self._journaled(s, lo, hi, pieces, fua)
            return
        for sub_lo, sub_hi, full in ((lo, f_lo, False), (f_lo, f_hi, True), (f_hi, hi, False)):
            part = _clip(pieces, sub_lo, sub_hi)
            if not part:
                continue
            if full:
                self._stripe_update(s, sub_lo, sub_hi, part, fua, False)
            else:
                self._journaled(s, min(a for _, a, _ in part),
                                max(a + len(d) for _, a, d in part), part, fua)

    def _journaled(self, s: int, lo: int, hi: int, pieces: list[tuple[int, int, memoryview]],
                   fua: bool) -> None:
        """A journaled partial-stripe update, split into records of at most MAX_RECORD rows."""
        if hi - lo <= jrnl.MAX_RECORD:
            self._stripe_update(s, lo, hi, pieces, fua, True)
            return
        for sub in range(lo, hi, jrnl.MAX_RECORD):
            part = _clip(pieces, sub, min(sub + jrnl.MAX_RECORD, hi))
            if part:
                self._stripe_update(s, min(a for _, a, _ in part),
                                    max(a + len(d) for _, a, d in part), part, fua, True)

    def _stripe_update(self, s: int, lo: int, hi: int, pieces: list[tuple[int, int, memoryview]],
                       fua: bool, journaled: bool) -> None:
        """Reconstruct-write of rows [lo, hi) of stripe ``s`` (journaled first if asked)."""
        geo = self.geo
        sm = geo.stripe(s)
        nd = len(sm.data)
        length = hi - lo
        full = {k: d for k, a, d in pieces if a == lo and a + len(d) == hi}
        need = {k for k in range(nd) if k not in full}
        old, _, _ = self._stripe_read(s, lo, hi, need) if need else ([None] * nd, None, None)
        blocks: list[Any] = []
        for k in range(nd):
            if k in full:
                blocks.append(full[k])        # the caller's bytes as they are: no copy
            else:
                blocks.append(bytearray(old[k]) if old[k] is not None else bytearray(length))
        changed = set()
        for k, a, d in pieces:
            if k not in full:
                blocks[k][a - lo:a - lo + len(d)] = d
            changed.add(k)
        p, q = self._parity(sm.qexp, blocks, length)
        base = s * geo.chunk + lo
        if self.journal is not None and not journaled and not self.failed and \
                self._jlive_overlaps(s, lo, hi):
            # Records of an earlier update of these rows are still live: replaying
            # them after this unjournaled write would bring old data back.
            self._journal_checkpoint()
        if journaled:
            targets: list[tuple[Member, Any]] = []
            for slot, blk in [(sm.data[k], blocks[k]) for k in sorted(changed)] + \
                    [(sm.pd, p)] + ([(sm.qd, q)] if q is not None else []):
                m = self._writable(slot)
                if m is not None:
                    targets.append((m, blk))
            # A member failing in between must not checkpoint the ring (that would
            # retire this update's records before its home writes are done).
            self._jbusy = True
            try:
                self._journal_write(s, lo, targets)
                self._home_writes(sm, base, changed, blocks, p, q, fua)
            finally:
                self._jbusy = False
            if self._jdeferred:
                self._jdeferred = False
                if not self.failed:
                    self._journal_checkpoint()
            return
        self._home_writes(sm, base, changed, blocks, p, q, fua)

    def _home_writes(self, sm: Any, base: int, changed: set[int], blocks: list[Any],
                     p: Any, q: Any, fua: bool) -> None:
        for k in sorted(changed):
            m = self._writable(sm.data[k])
            if m is not None:
                self._mwrite(m, base, blocks[k], fua)
        m = self._writable(sm.pd)
        if m is not None:
            self._mwrite(m, base, p, fua)
        if q is not None:
            m = self._writable(sm.qd)
            if m is not None:
                self._mwrite(m, base, q, fua)

    # ------------------------------------------------------------ request splitting
    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(array offset, chunk number, offset in chunk, length) of each chunk piece."""
        chunk = self.geo.chunk
        pos, end = offset, offset + length
        while pos < end:
            c, within = divmod(pos, chunk)
            n = min(end - pos, chunk - within)
            yield pos, c, within, n
            pos += n

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockDeviceError(errno.EINVAL, f"raid {self.name}: I/O beyond the end "
                                   f"({offset}+{length} > {self.size})")

    # ------------------------------------------------------------ BlockDevice
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> int:
        length = len(buf)
        self._check_range(offset, length)
        with self.lock:
            self._die()
            self._last_fg = time.monotonic()
            level = self.geo.level
            if level == 1:
                buf[:] = self._mirror_read([(s, 0) for s in range(self.geo.raid_disks)],
                                           offset, length)
                return length
            dd = self.geo.data_disks
            for pos, c, within, n in self._pieces(offset, length):
                dst = buf[pos - offset:pos - offset + n]
                if level == 0:
                    slot, row = c % dd, c // dd
                    m = self._usable(slot, 0, 0)
                    if m is None:
                        raise BlockDeviceError(errno.EIO, f"raid0 {self.name}: member missing")
                    try:
                        dst[:] = self._mread(m, row * self.geo.chunk + within, n)
                    except _MemberIOError as e:
                        raise BlockDeviceError(errno.EIO, f"raid0 {self.name}: {e}") from None
                elif level == 10:
                    copies = self.geo.raid10_copies(c)
                    dst[:] = self._mirror_read([(d, r * self.geo.chunk) for d, r in copies],
                                               within, n)
                else:
                    s, k = divmod(c, dd)
                    data, _, _ = self._stripe_read(s, within, within + n, {k})
                    dst[:] = data[k]
        return length

    def _mirror_read(self, copies: list[tuple[int, int]], off: int, n: int) -> bytes:
        """Read from the first good copy; repair copies that gave read errors."""
        bad: list[tuple[Member, int]] = []
        for slot, base in copies:
            m = self._usable(slot, base + off, n)
            if m is None:
                continue
            try:
                data = self._mread(m, base + off, n)
            except _MemberIOError:
                bad.append((m, base + off))
                continue
            for bm, boff in bad:
                self._read_error(bm, boff, data)
            return data
        self._check_alive()
        raise BlockDeviceError(errno.EIO, f"raid array {self.name}: no readable copy")

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_range(offset, length)
        with self.lock:
            self._die()
            now = time.monotonic()
            self._last_fg = self._last_write = now
            if self.clean:
                self.clean = False
                self.resync_from = None
                self._sync_sbs()
                self._wake.notify_all()
            if self.bitmap is not None and \
                    self.bitmap.mark(self._member_ranges(offset, length), now):
                self._bitmap_to_all()       # bits durable before the data write
                self._die()
            self._write_locked(offset, view, fua)
            self._die()

    def _write_locked(self, offset: int, view: memoryview, fua: bool) -> None:
        level = self.geo.level
        if level == 1:
            ok = False
            for slot in range(self.geo.raid_disks):
                m = self._writable(slot)
                if m is not None and self._mwrite(m, offset, view, fua):
                    ok = True
            if not ok:
                self._check_alive()
                raise BlockDeviceError(errno.EIO, f"raid1 {self.name}: no member took the write")
            return
        dd = self.geo.data_disks
        chunk = self.geo.chunk
        stripe_pieces: dict[int, list[tuple[int, int, memoryview]]] = {}
        order: list[int] = []
        for pos, c, within, n in self._pieces(offset, len(view)):
            piece = view[pos - offset:pos - offset + n]
            if level == 0:
                m = self._writable(c % dd)
                if m is None or not self._mwrite(m, (c // dd) * chunk + within, piece, fua):
                    raise BlockDeviceError(errno.EIO, f"raid0 {self.name}: member write failed")
            elif level == 10:
                ok = False
                for d, r in self.geo.raid10_copies(c):
                    m = self._writable(d)
                    if m is not None and self._mwrite(m, r * chunk + within, piece, fua):
                        ok = True
                if not ok:
                    self._check_alive()
                    raise BlockDeviceError(errno.EIO, f"raid10 {self.name}: write lost")
            else:
                s, k = divmod(c, dd)
                if s not in stripe_pieces:
                    stripe_pieces[s] = []
                    order.append(s)
                stripe_pieces[s].append((k, within, piece))
        for s in order:
            pieces = stripe_pieces[s]
            lo = min(a for _, a, _ in pieces)
            hi = max(a + len(d) for _, a, d in pieces)
            self._stripe_write(s, lo, hi, pieces, fua)
            self._die()

    def flush(self) -> None:
        with self.lock:
            for m in self.members:
                if m.state in (IN_SYNC, RECOVERING) and m.dev is not None:
                    try:
                        m.dev.flush()
                    except OSError as e:
                        self._fail(m, f"flush failed: {e}")
            self._die()

    def discard(self, offset: int, length: int) -> None:
        """Zero the range through the array (keeps parity and mirrors consistent)."""
        step = 1 << 20
        zero = bytes(min(step, length))
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            self.write(pos, zero[:n])
            pos += n

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

    def close(self) -> None:
        """Stop the worker, mark the array clean and close the members (mdadm --stop)."""
        self._stop_worker()
        with self.lock:
            if self._closed:
                return
            if not self.failed and self.sync is None:
                if not self.clean and self.resync_from is None:
                    self.flush()
                    self.clean = True
                    self._sync_sbs()
                self.settle_bitmap(force=True)
            elif self.sync is not None and not self.failed:
                self._checkpoint()
            self._close_members()

    def abandon(self) -> None:
        """Drop everything as a crash would: no clean marking, no checkpoint (for tests)."""
        self._stop_worker()
        with self.lock:
            self._close_members()

    def _close_members(self) -> None:
        self._closed = True
        for m in self.members:
            if m.dev is not None:
                try:
                    m.dev.close()
                except OSError:
                    pass

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


def _clip(pieces: list[tuple[int, int, memoryview]], lo: int, hi: int
          ) -> list[tuple[int, int, memoryview]]:
    """The parts of stripe pieces (k, off in chunk, data) inside rows [lo, hi)."""
    out = []
    for k, a, d in pieces:
        a0, a1 = max(a, lo), min(a + len(d), hi)
        if a0 < a1:
            out.append((k, a0, d[a0 - a:a1 - a]))
    return out


def _diff_sectors(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Mismatch in md's units: 8 sectors for each differing 4 KiB page."""
    out = 0
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            out += 8
    return out


def _new_uuid() -> bytes:
    import uuid
    return uuid.uuid4().bytes
