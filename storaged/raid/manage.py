"""Creating and assembling md arrays from member BlockDevices (mdadm --create/--assemble).

``create`` writes a fresh v1.2 superblock on every member (mdadm's
defaults: superblock at 4 KiB, data at 1 MiB, 512 KiB chunks,
left-symmetric parity, near-2 RAID-10) and returns the running array.
``assemble`` reads the superblocks back, keeps the members of one array
(by set uuid) whose ``events`` are the freshest, gives each the role the
freshest superblock records (md's super_1_validate), and refuses what md
refuses: too few members, or a dirty degraded parity array without
``force`` (md's start_dirty_degraded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from storaged.block.base import BlockDevice
from storaged.block.file import FileBlockDevice
from storaged.block.open import exists, is_url, open_device
from storaged.raid import journal as jrnl
from storaged.raid.array import RaidArray
from storaged.raid.bitmap import (
    BITMAP_OFFSET_SECTORS,
    BITMAP_SB_SIZE,
    BitmapError,
    WriteIntentBitmap,
    default_chunk,
)
from storaged.raid.layout import DEFAULT_CHUNK, MIN_DISKS, REDUNDANCY, Geometry, layout_code
from storaged.raid.members import FAULTY, IN_SYNC, RECOVERING, REPLACING, SPARE, Member, RaidError
from storaged.raid.superblock import (
    DEFAULT_DATA_OFFSET,
    FEATURE_BITMAP_OFFSET,
    FEATURE_RECOVERY_OFFSET,
    FEATURE_REPLACEMENT,
    MAX_SECTOR,
    ROLE_FAULTY,
    ROLE_SPARE,
    SB_OFFSET_SECTORS,
    SECTOR,
    Superblock,
    SuperblockError,
    new_set_uuid,
    read_superblock,
    write_superblock,
)

log = logging.getLogger("storaged.raid")

Opener = Callable[[str], BlockDevice]


def open_member(path: str, create_size: int | None = None) -> BlockDevice:
    """Open a member: a file or block device (creating a sparse file of
    ``create_size``) or a remote LUN (``iscsi://...``, storaged.block.open)."""
    if create_size is None and not is_url(path) and not os.path.exists(path):
        # FileBlockDevice's own error, as before (callers match on ENOENT).
        return FileBlockDevice(path, block_size=SECTOR)
    return open_device(path, block_size=SECTOR, create_size=create_size)


def member_capacity(dev_bytes: int, level: int, chunk: int,
                    data_offset: int = DEFAULT_DATA_OFFSET) -> int:
    """Usable data bytes per member: after the data offset, rounded down to the chunk."""
    avail = dev_bytes - data_offset * SECTOR
    unit = chunk if level != 1 else 64 * 1024
    return max(avail - avail % unit, 0)


def size_for_capacity(capacity: int, level: int, n: int, chunk: int = DEFAULT_CHUNK,
                      near: int = 2) -> int:
    """Member file size giving an array of at least ``capacity`` bytes."""
    dd = {0: n, 1: 1, 4: n - 1, 5: n - 1, 6: n - 2}.get(level)
    if dd is None:  # raid10 near
        per = -(-capacity * near // n)
    else:
        per = -(-capacity // dd)
    unit = chunk if level != 1 else 64 * 1024
    per = -(-per // unit) * unit
    return per + DEFAULT_DATA_OFFSET * SECTOR


BITMAP_SECTORS_RESERVED = (jrnl.JOURNAL_START - (SB_OFFSET_SECTORS + BITMAP_OFFSET_SECTORS)
                           * SECTOR) // SECTOR
BITMAP_MAX_BITS = (BITMAP_SECTORS_RESERVED * SECTOR - BITMAP_SB_SIZE) * 8


def read_bitmap(dev: BlockDevice, sb: Superblock) -> WriteIntentBitmap | None:
    """A member's internal bitmap (None if the superblock has none or it is unreadable)."""
    if not sb.feature_map & FEATURE_BITMAP_OFFSET:
        return None
    off = (sb.super_offset + sb.bitmap_offset) * SECTOR
    try:
        return WriteIntentBitmap.decode(dev.read(off, BITMAP_SECTORS_RESERVED * SECTOR))
    except (OSError, BitmapError) as e:
        log.warning("raid: bad bitmap at %d: %s", off, e)
        return None


def read_journal_area(dev: BlockDevice, sb: Superblock) -> tuple[int, int, bool] | None:
    """The journal ring (start, end, sync mode) on a member, or None if it has no journal."""
    try:
        return jrnl.decode_area(dev.read(jrnl.JOURNAL_START, jrnl.HEADER), sb.set_uuid)
    except OSError:
        return None


def create(name: str, paths: Sequence[str], level: int, chunk: int = DEFAULT_CHUNK,
           layout: str | None = None, spares: int = 0, size: int | None = None,
           assume_clean: bool | None = None, opener: Callable[..., BlockDevice] | None = None,
           start_worker: bool = True, bitmap: bool | None = None,
           bitmap_chunk: int | None = None, journal: bool | str | None = None) -> RaidArray:
    """mdadm --create: write superblocks on ``paths`` (last ``spares`` are spares).

    ``size`` creates missing members as sparse files of that many bytes.  A
    new array of freshly created (all-zero) members is consistent already
    (parity of zeros is zero), so it starts clean; otherwise it starts dirty
    and resyncs in the background, as md does after --create.

    ``bitmap`` (default: every level but 0) adds md's internal write-intent
    bitmap with ``bitmap_chunk`` bytes per bit; ``journal`` (default: levels
    4/5/6; ``"sync"`` or ``"async"``, True meaning async) adds the stripe
    journal that closes the write hole (``storaged.raid.journal``).
    """
    if level not in MIN_DISKS:
        raise RaidError(f"unsupported raid level {level} (supported: 0, 1, 4, 5, 6, 10)")
    if len(set(paths)) != len(paths):
        raise RaidError("a member is listed twice")
    n = len(paths) - spares
    if spares < 0 or n < MIN_DISKS[level]:
        raise RaidError(f"raid{level} needs at least {MIN_DISKS[level]} active members "
                        f"(got {n} and {spares} spares)")
    if level == 0 and spares:
        raise RaidError("raid0 cannot have spares")
    if level == 1:
        chunk = 0
    elif chunk < 4096 or chunk & (chunk - 1):
        raise RaidError("chunk must be a power of two of at least 4 KiB")
    try:
        code = layout_code(level, layout)
    except ValueError as e:
        raise RaidError(str(e)) from None
    fresh = True
    devs: list[BlockDevice] = []
    try:
        for p in paths:
            existed = exists(p)     # a remote LUN always holds something
            if opener is not None:
                devs.append(opener(p))
            else:
                devs.append(open_member(p, create_size=size))
            if existed:
                fresh = False
        smallest = min(d.size for d in devs)
        member_bytes = member_capacity(smallest, level, chunk or DEFAULT_CHUNK)
        geo = Geometry(level, code, chunk or DEFAULT_CHUNK, n, member_bytes)
        try:
            geo.validate()
        except ValueError as e:
            raise RaidError(str(e)) from None
        if member_bytes <= 0 or geo.size <= 0:
            raise RaidError(f"members too small: {smallest} bytes")
        clean = fresh if assume_clean is None else assume_clean
        uuid = new_set_uuid()
        if bitmap is None:
            bitmap = level != 0
        if journal is None:
            journal = level in (4, 5, 6)
        if journal not in (True, False, "sync", "async"):
            raise RaidError(f"journal must be sync, async or off, not {journal!r}")
        jsync = journal == "sync"
        if bitmap and level == 0:
            raise RaidError("raid0 has no redundancy: no write-intent bitmap")
        if journal and level not in (4, 5, 6):
            raise RaidError("the stripe journal is for raid4/5/6 only")
        bm = None
        if bitmap:
            bc = bitmap_chunk or default_chunk(member_bytes, BITMAP_MAX_BITS)
            if bc < 512 or bc & (bc - 1) or -(-member_bytes // bc) > BITMAP_MAX_BITS:
                raise RaidError(f"bad bitmap chunk {bc}: a power of two, at most "
                                f"{BITMAP_MAX_BITS} bits")
            bm = WriteIntentBitmap(uuid=uuid, sync_size=member_bytes // SECTOR, chunksize=bc,
                                   sectors_reserved=BITMAP_SECTORS_RESERVED)
        ring = (jrnl.JOURNAL_START + jrnl.HEADER, DEFAULT_DATA_OFFSET * SECTOR) \
            if journal else None
        roles = [i if i < n else ROLE_SPARE for i in range(len(paths))]
        template = Superblock(set_uuid=uuid, set_name=name, level=level, layout=code,
                              size=member_bytes // SECTOR, chunksize=chunk // SECTOR,
                              raid_disks=n, dev_roles=roles, max_dev=len(paths),
                              resync_offset=MAX_SECTOR if clean or level == 0 else 0)
        members = []
        for i, (p, d) in enumerate(zip(paths, devs, strict=True)):
            sb = Superblock(**{**template.__dict__, "dev_number": i,
                               "data_size": d.size // SECTOR - DEFAULT_DATA_OFFSET,
                               "device_uuid": os.urandom(16)})
            if bm is not None:
                sb.feature_map |= FEATURE_BITMAP_OFFSET
                sb.bitmap_offset = BITMAP_OFFSET_SECTORS
                d.write((SB_OFFSET_SECTORS + BITMAP_OFFSET_SECTORS) * SECTOR, bm.encode())
            if ring is not None:
                d.write(jrnl.JOURNAL_START, jrnl.encode_area(uuid, *ring, jsync))
            write_superblock(d, sb)
            members.append(Member(p, d, sb, IN_SYNC if i < n else SPARE,
                                   slot=i if i < n else -1))
    except BaseException:
        for d in devs:
            d.close()
        raise
    log.info("raid %s: created raid%d on %d members (+%d spares), %d bytes", name, level, n,
             spares, geo.size)
    return RaidArray(name, geo, members, template, start_worker=start_worker, bitmap=bm,
                     journal=ring, journal_sync=jsync)


def examine(path: str, opener: Opener = open_member) -> Superblock:
    """Read one member's superblock (mdadm --examine)."""
    dev = opener(path)
    try:
        return read_superblock(dev)
    finally:
        dev.close()


def assemble(paths: Sequence[str], name: str | None = None, uuid: bytes | None = None,
             force: bool = False, opener: Opener = open_member,
             start_worker: bool = True) -> RaidArray:
    """mdadm --assemble: build the array from whichever ``paths`` carry its superblock."""
    found: list[tuple[str, BlockDevice, Superblock]] = []
    for p in paths:
        try:
            dev = opener(p)
        except OSError as e:
            log.warning("raid assemble: cannot open %s: %s", p, e)
            continue
        try:
            sb = read_superblock(dev)
        except (OSError, SuperblockError) as e:
            log.warning("raid assemble: %s has no valid md superblock: %s", p, e)
            dev.close()
            continue
        if sb.super_offset != SB_OFFSET_SECTORS:
            dev.close()
            continue
        found.append((p, dev, sb))
    if uuid is None:
        groups: dict[bytes, int] = {}
        for _, _, sb in found:
            if name is None or sb.set_name == name:
                groups[sb.set_uuid] = groups.get(sb.set_uuid, 0) + 1
        if not groups:
            for _, d, _ in found:
                d.close()
            raise RaidError(f"no md superblock{' for ' + name if name else ''} on "
                            f"{', '.join(paths) or 'no devices'}")
        uuid = max(groups, key=lambda u: groups[u])
    mine = [f for f in found if f[2].set_uuid == uuid]
    for f in found:
        if f[2].set_uuid != uuid:
            f[1].close()
    if not mine:
        raise RaidError("no member of that array found")
    fresh = max(mine, key=lambda f: f[2].events)[2]
    members: list[Member] = []
    taken: dict[int, Member] = {}
    for p, dev, sb in sorted(mine, key=lambda f: -f[2].events):
        # md (super_1_validate) accepts a member one event behind while assembling: a
        # crash can interrupt the superblock update that bumped the others.
        if sb.events + 1 < fresh.events:
            if sb.dev_number < len(fresh.dev_roles) and \
                    fresh.dev_roles[sb.dev_number] == ROLE_FAULTY:
                dev.close()   # failed earlier: the others' superblocks say so
                continue
            log.warning("raid %s: kicking non-fresh %s from array (events %d < %d)",
                        fresh.set_name, p, sb.events, fresh.events)
            dev.close()
            continue
        role = fresh.dev_roles[sb.dev_number] if sb.dev_number < len(fresh.dev_roles) \
            else ROLE_SPARE
        if role < fresh.raid_disks and sb.feature_map & FEATURE_REPLACEMENT:
            m = Member(p, dev, sb, REPLACING, slot=role,
                       recovery_offset=sb.recovery_offset * SECTOR
                       if sb.feature_map & FEATURE_RECOVERY_OFFSET else 0,
                       corrected=sb.cnt_corrected_read)
        elif role < fresh.raid_disks:
            if role in taken:
                log.warning("raid %s: %s claims slot %d already taken", fresh.set_name, p, role)
                dev.close()
                continue
            state = RECOVERING if sb.feature_map & FEATURE_RECOVERY_OFFSET else IN_SYNC
            m = Member(p, dev, sb, state, slot=role,
                       recovery_offset=sb.recovery_offset * SECTOR if state == RECOVERING
                       else 0, corrected=sb.cnt_corrected_read)
            taken[role] = m
        elif role == ROLE_SPARE:
            m = Member(p, dev, sb, SPARE)
        else:
            m = Member(p, dev, sb, FAULTY)
        members.append(m)
    for m in members:
        if m.state == REPLACING and m.slot not in taken:
            m.state = RECOVERING     # the replaced member is gone: the copy is a recovery
            taken[m.slot] = m
    # Faulty members are only remembered in the roles table, not kept open.
    for m in [m for m in members if m.state == FAULTY]:
        members.remove(m)
        if m.dev is not None:
            m.dev.close()
    chunk = fresh.chunksize * SECTOR or DEFAULT_CHUNK
    geo = Geometry(fresh.level, fresh.layout, chunk, fresh.raid_disks, fresh.size * SECTOR)
    in_sync = sum(1 for m in members if m.state == IN_SYNC)
    missing = fresh.raid_disks - in_sync
    red = REDUNDANCY.get(fresh.level)
    dirty = fresh.resync_offset != MAX_SECTOR
    template = Superblock(**{**fresh.__dict__, "dev_roles": list(fresh.dev_roles)})

    def close_all() -> None:
        for m in members:
            if m.dev is not None:
                m.dev.close()

    if red is not None and missing > red:
        close_all()
        raise RaidError(f"cannot assemble raid{fresh.level} {fresh.set_name}: {missing} of "
                        f"{fresh.raid_disks} members missing")
    bm = None
    ring: tuple[int, int] | None = None
    jsync = False
    for m in members:
        assert m.dev is not None
        b = read_bitmap(m.dev, m.sb)
        if b is not None and b.uuid == fresh.set_uuid:
            if bm is None or b.events > bm.events:
                bits = bm.bits if bm is not None else set()
                bm = b
                bm.bits |= bits
            else:
                bm.bits |= b.bits     # a torn bitmap update: keep every dirty bit
        if ring is None and m.state in (IN_SYNC, RECOVERING):
            area = read_journal_area(m.dev, m.sb)
            if area is not None:
                ring, jsync = area[:2], area[2]
    if bm is not None:
        bm.last_write = dict.fromkeys(bm.bits, 0.0)
    if missing and dirty and fresh.level in (4, 5, 6) and not force and ring is None:
        close_all()
        raise RaidError(f"cannot start dirty degraded array {fresh.set_name} (data may be "
                        "inconsistent after a crash); use force to start it anyway")
    try:
        arr = RaidArray(name or fresh.set_name, geo, members, template,
                        start_worker=start_worker, bitmap=bm, journal=ring,
                        journal_sync=jsync)
    except Exception:
        close_all()
        raise
    if arr.failed:
        arr.abandon()
        raise RaidError(f"cannot assemble {fresh.set_name}: a mirror set has no member")
    if arr.degraded():
        # Record the missing members so they stay out.  Bump by two: an absent member
        # may be one event ahead of the present ones (a crash interrupted the update
        # that reached it), and must still end up behind, where its role says faulty.
        with arr.lock:
            arr.events += 1
            arr._sync_sbs()
    return arr
