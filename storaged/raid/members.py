"""Array members: who they are, their states, and failing, adding, removing and
replacing them (md's md_error, hot add/remove and want_replacement), and the
member I/O every other part goes through."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.raid import journal as jrnl
from storaged.raid.layout import REDUNDANCY
from storaged.raid.superblock import (
    FEATURE_RECOVERY_OFFSET,
    SECTOR,
    Superblock,
    SuperblockError,
    read_superblock,
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


def _new_uuid() -> bytes:
    import uuid
    return uuid.uuid4().bytes


class MemberOps:
    """Member management and member I/O.

    A part of :class:`~storaged.raid.array.RaidArray` (a mixin): its methods use the
    array's state and run under its lock, like the rest of the array."""

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
