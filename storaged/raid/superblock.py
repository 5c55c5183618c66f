"""The Linux md version-1 superblock (metadata 1.2), encoded and decoded.

Layout follows ``struct mdp_superblock_1`` in the kernel's
include/uapi/linux/raid/md_p.h: a 256-byte fixed part (all integers
little-endian) followed by ``max_dev`` 16-bit ``dev_roles``.  Metadata 1.2
puts it 4 KiB (8 sectors) from the start of every member; the data area
starts ``data_offset`` sectors in.  The checksum is md's ``calc_sb_1_csum``
(drivers/md/md.c): the sum of the little-endian 32-bit words of the first
``256 + 2*max_dev`` bytes (a trailing 16-bit half word added as is), with
``sb_csum`` itself taken as zero, folded once from 64 to 32 bits.

All sizes and offsets in the superblock are in 512-byte sectors.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

MD_SB_MAGIC = 0xA92B4EFC
SECTOR = 512
SB_OFFSET_SECTORS = 8          # metadata 1.2: 4 KiB from the start
SB_MAX_SIZE = 4096             # md reads and writes at most one 4 KiB block
SB_FIXED = 256
MAX_DEVS = (SB_MAX_SIZE - SB_FIXED) // 2   # 1920, as in mdadm and md (4096-256)/2
DEFAULT_DATA_OFFSET = 2048     # sectors (1 MiB): mdadm's usual data offset
BITMAP_OFFSET = 8              # sectors after the superblock (mdadm's internal bitmap)
MAX_SECTOR = 0xFFFFFFFFFFFFFFFF  # md's MaxSector: "no resync needed"

# dev_roles special values (md_p.h)
ROLE_SPARE = 0xFFFF
ROLE_FAULTY = 0xFFFE
ROLE_JOURNAL = 0xFFFD

# feature_map bits (md_p.h MD_FEATURE_*)
FEATURE_BITMAP_OFFSET = 1
FEATURE_RECOVERY_OFFSET = 2
FEATURE_RESHAPE_ACTIVE = 4
FEATURE_BAD_BLOCKS = 8
FEATURE_REPLACEMENT = 16
FEATURE_RESHAPE_BACKWARDS = 32
FEATURE_NEW_OFFSET = 64
FEATURE_RECOVERY_BITMAP = 128
FEATURE_CLUSTERED = 256
FEATURE_JOURNAL = 512
FEATURE_PPL = 1024
FEATURE_MULTIPLE_PPLS = 2048
FEATURE_RAID0_LAYOUT = 4096

# devflags
DEVFLAG_WRITE_MOSTLY = 1
DEVFLAG_FAILFAST = 2

# The fixed 256 bytes.  Offsets in comments are from md_p.h.
_FIXED = struct.Struct(
    "<"
    "I"    # 0   magic
    "I"    # 4   major_version (1)
    "I"    # 8   feature_map
    "I"    # 12  pad0
    "16s"  # 16  set_uuid
    "32s"  # 32  set_name
    "Q"    # 64  ctime: seconds in the low 40 bits, microseconds above
    "i"    # 72  level (signed: -1 linear, -4 multipath)
    "I"    # 76  layout
    "Q"    # 80  size: sectors used on each member
    "I"    # 88  chunksize (sectors)
    "I"    # 92  raid_disks
    "i"    # 96  bitmap_offset (signed, sectors from the superblock) / ppl
    "I"    # 100 new_level
    "Q"    # 104 reshape_position
    "i"    # 112 delta_disks
    "I"    # 116 new_layout
    "I"    # 120 new_chunk
    "i"    # 124 new_offset
    "Q"    # 128 data_offset
    "Q"    # 136 data_size
    "Q"    # 144 super_offset
    "Q"    # 152 recovery_offset / journal_tail
    "I"    # 160 dev_number
    "I"    # 164 cnt_corrected_read
    "16s"  # 168 device_uuid
    "B"    # 184 devflags
    "B"    # 185 bblog_shift
    "H"    # 186 bblog_size
    "I"    # 188 bblog_offset
    "Q"    # 192 utime
    "Q"    # 200 events
    "Q"    # 208 resync_offset
    "I"    # 216 sb_csum
    "I"    # 220 max_dev
    "32s"  # 224 pad3
)
assert _FIXED.size == SB_FIXED
_CSUM_OFFSET = 216


class SuperblockError(ValueError):
    """Not an md 1.x superblock, or a damaged one."""


def md_time(t: float | None = None) -> int:
    """md's 64-bit timestamp: seconds in the low 40 bits, microseconds in the top 24."""
    t = time.time() if t is None else t
    sec = int(t)
    usec = int((t - sec) * 1_000_000) & 0xFFFFFF
    return (sec & ((1 << 40) - 1)) | (usec << 40)


def calc_sb_1_csum(raw: bytes | bytearray | memoryview, max_dev: int) -> int:
    """md's ``calc_sb_1_csum`` over an encoded superblock (its sb_csum taken as 0).

    Sums ``256 + 2*max_dev`` bytes as little-endian u32 words (a trailing
    2-byte half word as a u16), in 64 bits, then adds the high 32 bits into
    the low 32 bits once (md does not fold a second time).
    """
    size = SB_FIXED + 2 * max_dev
    buf = bytearray(raw[:size])
    if len(buf) < size:
        raise SuperblockError("superblock shorter than its dev_roles")
    buf[_CSUM_OFFSET:_CSUM_OFFSET + 4] = b"\0\0\0\0"
    words = size // 4
    total = sum(struct.unpack_from(f"<{words}I", buf, 0))
    if size % 4 == 2:
        total += struct.unpack_from("<H", buf, words * 4)[0]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


@dataclass
class Superblock:
    """One member's md v1.2 superblock (every field of ``mdp_superblock_1``)."""

    set_uuid: bytes
    set_name: str
    level: int
    layout: int
    size: int                      # sectors used per member
    chunksize: int                 # sectors (0 for RAID-1)
    raid_disks: int
    data_offset: int = DEFAULT_DATA_OFFSET
    data_size: int = 0             # sectors available for data on this member
    super_offset: int = SB_OFFSET_SECTORS
    dev_number: int = 0
    device_uuid: bytes = field(default_factory=lambda: uuidlib.uuid4().bytes)
    dev_roles: list[int] = field(default_factory=list)
    events: int = 0
    resync_offset: int = MAX_SECTOR
    recovery_offset: int = 0
    feature_map: int = 0
    ctime: int = field(default_factory=md_time)
    utime: int = field(default_factory=md_time)
    bitmap_offset: int = 0
    new_level: int = 0
    reshape_position: int = 0
    delta_disks: int = 0
    new_layout: int = 0
    new_chunk: int = 0
    new_offset: int = 0
    cnt_corrected_read: int = 0
    devflags: int = 0
    bblog_shift: int = 0
    bblog_size: int = 0
    bblog_offset: int = 0
    max_dev: int = 0               # 0: len(dev_roles) when encoding
    major_version: int = 1
    sb_csum: int = 0               # as read; recomputed by encode()

    # ------------------------------------------------------------ codec
    def encode(self) -> bytes:
        """The 4 KiB block written at ``super_offset``, checksum filled in."""
        max_dev = max(self.max_dev, len(self.dev_roles))
        if max_dev > MAX_DEVS:
            raise SuperblockError(f"at most {MAX_DEVS} devices")
        name = self.set_name.encode()
        if len(name) > 32:
            raise SuperblockError("set name longer than 32 bytes")
        fixed = _FIXED.pack(
            MD_SB_MAGIC, self.major_version, self.feature_map, 0,
            self.set_uuid, name, self.ctime, self.level, self.layout, self.size,
            self.chunksize, self.raid_disks, self.bitmap_offset, self.new_level,
            self.reshape_position, self.delta_disks, self.new_layout, self.new_chunk,
            self.new_offset, self.data_offset, self.data_size, self.super_offset,
            self.recovery_offset, self.dev_number, self.cnt_corrected_read,
            self.device_uuid, self.devflags, self.bblog_shift, self.bblog_size,
            self.bblog_offset, self.utime, self.events, self.resync_offset, 0, max_dev,
            bytes(32))
        roles = list(self.dev_roles) + [ROLE_SPARE] * (max_dev - len(self.dev_roles))
        buf = bytearray(SB_MAX_SIZE)
        buf[:SB_FIXED] = fixed
        struct.pack_into(f"<{max_dev}H", buf, SB_FIXED, *roles)
        self.sb_csum = calc_sb_1_csum(buf, max_dev)
        struct.pack_into("<I", buf, _CSUM_OFFSET, self.sb_csum)
        return bytes(buf)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, verify: bool = True) -> Superblock:
        """Parse a superblock; SuperblockError if the magic, version or checksum is wrong."""
        if len(raw) < SB_FIXED:
            raise SuperblockError("short superblock")
        v = _FIXED.unpack_from(raw, 0)
        (magic, major, feature_map, _pad0, set_uuid, set_name, ctime, level, layout, size,
         chunksize, raid_disks, bitmap_offset, new_level, reshape_position, delta_disks,
         new_layout, new_chunk, new_offset, data_offset, data_size, super_offset,
         recovery_offset, dev_number, cnt_corrected_read, device_uuid, devflags, bblog_shift,
         bblog_size, bblog_offset, utime, events, resync_offset, sb_csum, max_dev,
         _pad3) = v
        if magic != MD_SB_MAGIC:
            raise SuperblockError(f"bad magic 0x{magic:08x}")
        if major != 1:
            raise SuperblockError(f"unsupported major version {major}")
        if max_dev > MAX_DEVS or SB_FIXED + 2 * max_dev > len(raw):
            raise SuperblockError(f"bad max_dev {max_dev}")
        if verify and calc_sb_1_csum(raw, max_dev) != sb_csum:
            raise SuperblockError("superblock checksum mismatch")
        roles = list(struct.unpack_from(f"<{max_dev}H", raw, SB_FIXED))
        return cls(
            set_uuid=set_uuid, set_name=set_name.rstrip(b"\0").decode(errors="replace"),
            level=level, layout=layout, size=size, chunksize=chunksize,
            raid_disks=raid_disks, data_offset=data_offset, data_size=data_size,
            super_offset=super_offset, dev_number=dev_number, device_uuid=device_uuid,
            dev_roles=roles, events=events, resync_offset=resync_offset,
            recovery_offset=recovery_offset, feature_map=feature_map, ctime=ctime,
            utime=utime, bitmap_offset=bitmap_offset, new_level=new_level,
            reshape_position=reshape_position, delta_disks=delta_disks,
            new_layout=new_layout, new_chunk=new_chunk, new_offset=new_offset,
            cnt_corrected_read=cnt_corrected_read, devflags=devflags,
            bblog_shift=bblog_shift, bblog_size=bblog_size, bblog_offset=bblog_offset,
            max_dev=max_dev, major_version=major, sb_csum=sb_csum)

    # ------------------------------------------------------------ helpers
    @property
    def role(self) -> int:
        """This member's own role: a slot number, ROLE_SPARE or ROLE_FAULTY."""
        if self.dev_number < len(self.dev_roles):
            return self.dev_roles[self.dev_number]
        return ROLE_SPARE

    @property
    def uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(bytes=self.set_uuid)

    @property
    def clean(self) -> bool:
        """md's "clean": no resync pending (resync_offset == MaxSector)."""
        return self.resync_offset == MAX_SECTOR


def mdadm_uuid(raw16: bytes) -> str:
    """A uuid in mdadm's ``xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx`` form (as --examine prints)."""
    h = raw16.hex()
    return ":".join(h[i:i + 8] for i in range(0, 32, 8))


def read_superblock(dev, verify: bool = True) -> Superblock:  # noqa: ANN001 - BlockDevice
    """Read and decode the v1.2 superblock of a member BlockDevice."""
    raw = dev.read(SB_OFFSET_SECTORS * SECTOR, SB_MAX_SIZE)
    return Superblock.decode(raw, verify=verify)


def write_superblock(dev, sb: Superblock, sync: bool = True) -> None:  # noqa: ANN001
    """Encode ``sb`` and write it at 4 KiB on ``dev`` (durably unless ``sync`` is false)."""
    dev.write(sb.super_offset * SECTOR, sb.encode(), fua=sync)


def new_set_uuid() -> bytes:
    """16 random bytes, as mdadm uses for a new array."""
    return os.urandom(16)
