"""md's internal write-intent bitmap (bitmap superblock version 4), encoded and tracked.

On disk (md-bitmap.h ``bitmap_super_t``, all little-endian) a 256-byte
superblock sits ``bitmap_offset`` sectors after the md superblock
(metadata 1.2: 8 sectors, i.e. 8 KiB from the start of the member), with
``feature_map`` bit MD_FEATURE_BITMAP_OFFSET set.  The bits follow it
directly: bit ``i`` (little-endian bit order, version 4) says "member
bytes ``[i*chunksize, (i+1)*chunksize)`` may differ between members".
``mdadm --examine`` then shows "Internal Bitmap" and ``mdadm -X MEMBER``
decodes the bitmap.

Semantics follow md (drivers/md/md-bitmap.c):

* A bit is set, and the bitmap written durably to every member, before
  a write to its region reaches any member.
* Bits are cleared lazily once writes have settled for ``daemon_sleep``
  seconds, and only while every slot has an in-sync member: a region
  written while a member is missing stays dirty, so that member can be
  re-added later and recover only the dirty regions.  ``events_cleared``
  records the array ``events`` when bits were last cleared; a returning
  member whose superblock ``events`` is at least that is "close enough"
  for a bitmap-based recovery (md's super_1_validate), otherwise it gets
  a full recovery.
* After an unclean shutdown only dirty regions are resynced.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

BITMAP_MAGIC = 0x6D746962          # "bitm" little-endian
BITMAP_MAJOR_HI = 4                # version 4: little-endian bit order
BITMAP_SB_SIZE = 256
BITMAP_OFFSET_SECTORS = 8          # after the md superblock (mdadm's internal bitmap)
BITMAP_STALE = 1 << 1              # state bits (md-bitmap.h enum bitmap_state)
DEFAULT_DAEMON_SLEEP = 5           # seconds, md's default
DEFAULT_BITMAP_CHUNK = 64 << 20    # mdadm's default chunk for internal bitmaps

_SB = struct.Struct(
    "<"
    "I"      # 0   magic
    "I"      # 4   version
    "16s"    # 8   uuid (the array's set uuid)
    "Q"      # 24  events
    "Q"      # 32  events_cleared
    "Q"      # 40  sync_size (sectors per member)
    "I"      # 48  state
    "I"      # 52  chunksize (bytes)
    "I"      # 56  daemon_sleep (seconds)
    "I"      # 60  write_behind
    "I"      # 64  sectors_reserved
    "I"      # 68  nodes
    "64s"    # 72  cluster_name
    "120s"   # 136 pad
)
assert _SB.size == BITMAP_SB_SIZE


class BitmapError(ValueError):
    """Not a version-4 md bitmap."""


def default_chunk(member_bytes: int, max_bits: int) -> int:
    """mdadm's default bitmap chunk: 64 MiB, or the smallest power of two that fits.

    Same rule as mdadm's ``add_internal_bitmap1`` (super1.c): start at 4 KiB,
    double until the bits fit in the reserved space (``max_bits``), then take
    at least 64 MiB.  Small members therefore get few bits (a 1 GiB member:
    16), which is what keeps a sequential write from paying a durable bitmap
    update every few MiB.
    """
    chunk = 4096
    while -(-member_bytes // chunk) > max_bits:
        chunk *= 2
    return max(chunk, DEFAULT_BITMAP_CHUNK)


@dataclass
class WriteIntentBitmap:
    """The bitmap superblock fields plus the in-memory bits and their last-write times."""

    uuid: bytes
    sync_size: int                   # sectors per member
    chunksize: int                   # bytes per bit
    sectors_reserved: int
    events: int = 0
    events_cleared: int = 0
    state: int = 0
    daemon_sleep: int = DEFAULT_DAEMON_SLEEP
    write_behind: int = 0
    bits: set[int] = field(default_factory=set)
    last_write: dict[int, float] = field(default_factory=dict)

    @property
    def nbits(self) -> int:
        return -(-self.sync_size * 512 // self.chunksize)

    # ------------------------------------------------------------ codec
    def encode(self) -> bytes:
        """Superblock plus bits, padded to whole 512-byte sectors."""
        nbytes = -(-self.nbits // 8)
        raw = bytearray(-(-(BITMAP_SB_SIZE + nbytes) // 512) * 512)
        _SB.pack_into(raw, 0, BITMAP_MAGIC, BITMAP_MAJOR_HI, self.uuid, self.events,
                      self.events_cleared, self.sync_size, self.state, self.chunksize,
                      self.daemon_sleep, self.write_behind, self.sectors_reserved, 0,
                      bytes(64), bytes(120))
        for b in self.bits:
            raw[BITMAP_SB_SIZE + b // 8] |= 1 << (b % 8)
        return bytes(raw)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> WriteIntentBitmap:
        if len(raw) < BITMAP_SB_SIZE:
            raise BitmapError("short bitmap superblock")
        (magic, version, uuid, events, events_cleared, sync_size, state, chunksize,
         daemon_sleep, write_behind, sectors_reserved, _nodes, _cname, _pad) = _SB.unpack_from(raw)
        if magic != BITMAP_MAGIC:
            raise BitmapError(f"bad bitmap magic 0x{magic:08x}")
        if version != BITMAP_MAJOR_HI:
            raise BitmapError(f"unsupported bitmap version {version}")
        if chunksize < 512 or chunksize & (chunksize - 1):
            raise BitmapError(f"bad bitmap chunksize {chunksize}")
        bm = cls(uuid=bytes(uuid), sync_size=sync_size, chunksize=chunksize,
                 sectors_reserved=sectors_reserved, events=events,
                 events_cleared=events_cleared, state=state, daemon_sleep=daemon_sleep,
                 write_behind=write_behind)
        nbytes = -(-bm.nbits // 8)
        body = bytes(raw[BITMAP_SB_SIZE:BITMAP_SB_SIZE + nbytes])
        for i, byte in enumerate(body):
            if byte:
                for j in range(8):
                    if byte >> j & 1 and i * 8 + j < bm.nbits:
                        bm.bits.add(i * 8 + j)
        return bm

    # ------------------------------------------------------------ tracking
    def bits_for(self, lo: int, hi: int) -> range:
        """Bit numbers covering member bytes [lo, hi)."""
        return range(lo // self.chunksize, -(-hi // self.chunksize))

    def mark(self, ranges: list[tuple[int, int]], now: float | None = None) -> bool:
        """Note writes to member byte ranges; True if a bit went from clear to set."""
        now = time.monotonic() if now is None else now
        new = False
        for lo, hi in ranges:
            for b in self.bits_for(lo, hi):
                if b not in self.bits:
                    self.bits.add(b)
                    new = True
                self.last_write[b] = now
        return new

    def settled(self, delay: float, now: float | None = None) -> set[int]:
        """Set bits whose last write is at least ``delay`` seconds old."""
        now = time.monotonic() if now is None else now
        return {b for b in self.bits if now - self.last_write.get(b, 0.0) >= delay}

    def dirty(self, lo: int, hi: int) -> bool:
        """Whether any bit covering member bytes [lo, hi) is set."""
        return any(b in self.bits for b in self.bits_for(lo, hi))
