"""On-disk structures of clusterfs as declarative tables (docs/clusterfs.md has the bytes).

Each :class:`Layout` is a list of ``(name, struct code)`` fields packed
little-endian from offset 0; a field named ``crc`` holds the CRC32C of every
byte before it.  ``pack`` takes a dict and returns the bytes of one block
(zero padded), ``unpack`` returns the dict and raises :class:`FormatError`
on a bad magic or CRC, so corrupt metadata becomes EIO instead of a crash.
"""

from __future__ import annotations

import struct
from typing import Any

from storaged.fastio import crc32c

MAGIC_SB = b"SDCLUSFS"
VERSION = 1


class FormatError(ValueError):
    """A block does not hold the structure expected (bad magic, CRC or value)."""


class Layout:
    """A little-endian struct from a field table; optional ``magic`` and trailing ``crc``."""

    def __init__(self, name: str, fields: list[tuple[str, str]], magic: bytes | None = None
                 ) -> None:
        self.name = name
        self.fields = fields
        self.names = [f for f, _ in fields]
        self.st = struct.Struct("<" + "".join(code for _, code in fields))
        self.size = self.st.size
        self.magic = magic
        self.has_crc = self.names[-1] == "crc"
        self.offsets: dict[str, int] = {}
        off = 0
        for fname, code in fields:
            self.offsets[fname] = off
            off += struct.calcsize("<" + code)

    def pack(self, values: dict[str, Any], block_size: int = 0) -> bytes:
        """The bytes of ``values`` (missing fields are 0), padded to ``block_size``."""
        vals = []
        for fname, code in self.fields:
            if fname == "magic":
                vals.append(self.magic)
            elif fname == "crc":
                vals.append(0)
            else:
                vals.append(values.get(fname, b"" if code.endswith("s") else 0))
        raw = bytearray(self.st.pack(*vals))
        if self.has_crc:
            struct.pack_into("<I", raw, self.size - 4, crc32c(bytes(raw[:self.size - 4])))
        if block_size > len(raw):
            raw += bytes(block_size - len(raw))
        return bytes(raw)

    def unpack(self, raw: bytes | memoryview) -> dict[str, Any]:
        """Decode the structure at the start of ``raw``; FormatError if it is not one."""
        if len(raw) < self.size:
            raise FormatError(f"{self.name}: {len(raw)} bytes, need {self.size}")
        head = bytes(raw[:self.size])
        vals = dict(zip(self.names, self.st.unpack(head), strict=True))
        if self.magic is not None and vals.get("magic") != self.magic:
            raise FormatError(f"{self.name}: bad magic {vals.get('magic')!r}")
        if self.has_crc and crc32c(head[:-4]) != vals["crc"]:
            raise FormatError(f"{self.name}: checksum mismatch")
        return vals


SUPERBLOCK = Layout("superblock", [
    ("magic", "8s"), ("version", "I"), ("block_size", "I"), ("total_blocks", "Q"),
    ("journals", "I"), ("journal_blocks", "I"), ("journal_start", "Q"), ("rg_start", "Q"),
    ("rg_count", "I"), ("rg_data", "I"), ("root_ino", "Q"), ("uuid", "16s"),
    ("label", "32s"), ("crc", "I"),
], MAGIC_SB)

JOURNAL_HEADER = Layout("journal header", [
    ("magic", "4s"), ("slot", "I"), ("seq", "Q"), ("flags", "I"), ("crc", "I"),
], b"SDJH")
JH_CLEAN = 1

#: Record descriptor head; ``count`` u64 targets follow it.  Its crc covers more
#: than the head (targets and images), so it is computed by the journal, not here.
JOURNAL_RECORD = Layout("journal record", [
    ("magic", "4s"), ("count", "I"), ("seq", "Q"), ("crc", "I"), ("reserved", "I"),
], b"SDJR")

RGRP = Layout("resource group", [
    ("magic", "4s"), ("index", "I"), ("data_start", "Q"), ("data_blocks", "I"),
    ("free", "I"), ("crc", "I"),
], b"SDRG")

INODE = Layout("inode", [
    ("magic", "4s"), ("mode", "I"), ("uid", "I"), ("gid", "I"), ("nlink", "I"),
    ("dir_depth", "I"), ("size", "Q"), ("blocks", "Q"), ("atime_ns", "Q"), ("mtime_ns", "Q"),
    ("ctime_ns", "Q"), ("generation", "Q"), ("xattr_block", "Q"), ("parent", "Q"),
    ("rdev", "Q"), ("reserved", "28s"), ("crc", "I"),
], b"SDIN")
INODE_HEAD = 128
assert INODE.size == 128

DIR_BUCKET_HEAD = struct.Struct("<4sI")
DIR_MAGIC = b"SDDB"
DIRENT_HEAD = struct.Struct("<QBB")
XATTR_HEAD = struct.Struct("<4sI")
XATTR_MAGIC = b"SDXA"
XATTR_ENTRY = struct.Struct("<BH")

NAME_MAX = 255

#: Journals added after mkfs (``fs add-journal``) live in the data area; their
#: first blocks are listed here, in block 0 after the superblock (zeros = none).
JINDEX_OFFSET = 256
JINDEX_MAX = 30
JOURNAL_INDEX = Layout("journal index", [
    ("magic", "4s"), ("count", "I"), ("starts", f"{8 * JINDEX_MAX}s"), ("crc", "I"),
], b"SDJX")
assert JINDEX_OFFSET + JOURNAL_INDEX.size <= 512  # fits block 0 at the smallest block size


def pointers_per_block(block_size: int) -> int:
    """How many u64 block pointers one block holds."""
    return block_size // 8


def direct_count(block_size: int) -> int:
    """Direct pointers in an inode block (the rest after the head, less two tree roots)."""
    return (block_size - INODE_HEAD) // 8 - 2


def max_file_blocks(block_size: int) -> int:
    """Largest file in blocks: direct + single + double indirect."""
    p = pointers_per_block(block_size)
    return direct_count(block_size) + p + p * p


class Geometry:
    """Where everything is, computed from the superblock fields."""

    def __init__(self, sb: dict[str, Any], extra_journals: tuple[int, ...] = ()) -> None:
        self.sb = sb
        self.extra_journals = tuple(extra_journals)
        self.bs: int = sb["block_size"]
        self.total_blocks: int = sb["total_blocks"]
        self.base_journals: int = sb["journals"]
        self.journals: int = sb["journals"] + len(self.extra_journals)
        self.journal_blocks: int = sb["journal_blocks"]
        self.journal_start: int = sb["journal_start"]
        self.rg_start: int = sb["rg_start"]
        self.rg_count: int = sb["rg_count"]
        self.rg_data: int = sb["rg_data"]
        self.root_ino: int = sb["root_ino"]
        self.uuid: bytes = sb["uuid"]

    def journal_block(self, slot: int) -> int:
        """First block (the header) of journal ``slot`` (mkfs's, then the added ones)."""
        if slot >= self.base_journals:
            return self.extra_journals[slot - self.base_journals]
        return self.journal_start + slot * self.journal_blocks

    def rg_block(self, k: int) -> int:
        """Header block of resource group ``k`` (its bitmap is the next block)."""
        return self.rg_start + k * (self.rg_data + 2)

    def rg_of(self, block: int) -> int:
        """The resource group that manages data block ``block``."""
        return (block - self.rg_start) // (self.rg_data + 2)

    def rg_data_blocks(self, k: int) -> int:
        """Data blocks of group ``k`` (the last one may be short)."""
        first = self.rg_block(k) + 2
        return max(0, min(self.rg_data, self.total_blocks - first))


def unpack_journal_index(block0: bytes) -> tuple[int, ...]:
    """First blocks of the journals added after mkfs (none if the area is zeros)."""
    raw = block0[JINDEX_OFFSET:JINDEX_OFFSET + JOURNAL_INDEX.size]
    if len(raw) < JOURNAL_INDEX.size or not any(raw):
        return ()
    ji = JOURNAL_INDEX.unpack(raw)
    if ji["count"] > JINDEX_MAX:
        raise FormatError(f"journal index: {ji['count']} entries, at most {JINDEX_MAX}")
    return struct.unpack_from(f"<{ji['count']}Q", ji["starts"])


def read_geometry(dev: Any) -> Geometry:
    """The superblock and journal index of ``dev`` (FormatError if they are corrupt)."""
    sb = SUPERBLOCK.unpack(dev.read(0, max(SUPERBLOCK.size, 512)))
    geo = Geometry(sb, unpack_journal_index(dev.read(0, 512)))
    for start in geo.extra_journals:  # added journals lie inside the data area
        if not geo.rg_start <= start <= geo.total_blocks - geo.journal_blocks:
            raise FormatError(f"journal index: journal at block {start} is outside the "
                              "data area")
    return geo


def pack_block0(geo: Geometry, sb: dict[str, Any], extra_journals: tuple[int, ...]) -> bytes:
    """Block 0 (superblock + journal index) as ``fs grow``/``add-journal`` rewrite it."""
    raw = bytearray(SUPERBLOCK.pack(sb, geo.bs))
    if extra_journals:
        starts = struct.pack(f"<{len(extra_journals)}Q", *extra_journals)
        raw[JINDEX_OFFSET:JINDEX_OFFSET + JOURNAL_INDEX.size] = JOURNAL_INDEX.pack(
            {"count": len(extra_journals), "starts": starts})
    return bytes(raw)
