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
  compute P/Q with the ``storaged.fastio`` kernels, write); small ones go
  through the stripe cache (``storaged.raid.stripecache``, md's
  ``stripe_cache_size``), which keeps the pages it read and merges the
  home writes of a stripe.

All I/O and every state change runs under one lock; the background worker
takes it for one step at a time, so foreground I/O interleaves.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

from storaged.block.base import BlockDeviceError
from storaged.block.open import redact
from storaged.raid.bitmap import BITMAP_OFFSET_SECTORS, WriteIntentBitmap
from storaged.raid.journaling import Journaling
from storaged.raid.layout import Geometry, layout_name
from storaged.raid.members import (
    FAULTY,
    IN_SYNC,
    RECOVERING,
    REPLACING,
    SAFE_MODE_DELAY,
    SPARE,
    SPEED_LIMIT_MAX,
    SPEED_LIMIT_MIN,
    Member,
    MemberOps,
    _MemberIOError,
)
from storaged.raid.stripecache import (
    DEFAULT_STRIPE_CACHE_SIZE,
    MAX_CACHED_ROWS,
    StripeCache,
    StripeCaching,
)
from storaged.raid.stripes import StripeIO
from storaged.raid.superblock import (
    FEATURE_BITMAP_OFFSET,
    FEATURE_RECOVERY_OFFSET,
    FEATURE_REPLACEMENT,
    MAX_SECTOR,
    ROLE_FAULTY,
    ROLE_SPARE,
    SECTOR,
    Superblock,
    md_time,
    mdadm_uuid,
    write_superblock,
)
from storaged.raid.sync import SyncState, SyncWorker

log = logging.getLogger("storaged.raid")


class RaidArray(MemberOps, StripeIO, StripeCaching, Journaling, SyncWorker):
    """A running md array; implements the BlockDevice protocol.

    The array's parts live in their own modules as mixins over this class's
    state: members (storaged.raid.members), stripe I/O (stripes), the stripe
    cache (stripecache), the write-hole journal (journaling) and the
    background worker (sync)."""

    def __init__(self, name: str, geometry: Geometry, members: list[Member], template: Superblock,
                 block_size: int = 512, start_worker: bool = True,
                 bitmap: WriteIntentBitmap | None = None,
                 journal: tuple[int, int] | None = None, journal_sync: bool = False,
                 stripe_cache_size: int = DEFAULT_STRIPE_CACHE_SIZE) -> None:
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
        self._sc: StripeCache | None = None
        if geometry.level in (4, 5, 6) and stripe_cache_size:
            self._sc = StripeCache(stripe_cache_size)
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
                members.append({"path": redact(m.path), "dev_number": m.dev_number,
                                "state": m.state,
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
                "stripe_cache": None if self._sc is None else self._sc.describe(),
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
                    if self._sc is not None:
                        dst[:] = self._sc_read(s, k, within, within + n)
                        continue
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
        if self._sc is not None:
            c, within = divmod(offset, chunk)
            n = len(view)
            if within + n <= chunk and n <= MAX_CACHED_ROWS:
                # The common small write: one chunk, straight to the stripe cache.
                s, k = divmod(c, dd)
                self._sc_write(s, within, within + n, [(k, within, view)], fua)
                return
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
            if self._sc is not None:
                if self._sc_wanted(lo, hi, pieces):
                    self._sc_write(s, lo, hi, pieces, fua)
                    self._die()
                    continue
                self._sc_forget(s, lo, hi)
            self._stripe_write(s, lo, hi, pieces, fua)
            self._die()

    def flush(self) -> None:
        with self.lock:
            self._sc_destage_all()        # cached pages home first, then fdatasync
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
            self._sc_destage_all()
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


