"""Per-node redo journal: one checksummed record, committed then checkpointed.

Commit order (ordered mode, docs/clusterfs.md "Journaling"): the caller has
written and flushed the data blocks; :meth:`Journal.commit` writes the record
(descriptor + block images) and flushes (the commit point), writes the images
in place and flushes, then advances the header's ``seq`` and flushes.  Only
after that may the caller release its locks: from then on this journal never
replays an image another node may have overwritten.
"""

from __future__ import annotations

import struct
import threading

from storaged.block.base import BlockDevice
from storaged.clusterfs.format import (
    JH_CLEAN,
    JOURNAL_HEADER,
    JOURNAL_RECORD,
    FormatError,
    Geometry,
)
from storaged.fastio import crc32c


class JournalFull(Exception):
    """A transaction changes more metadata blocks than one record holds."""


def record_crc(head: bytes, targets: bytes, images: list[bytes]) -> int:
    """CRC32C over the descriptor's first 16 bytes, the target list and every image."""
    value = crc32c(head[:16])
    value = crc32c(targets, value)
    for img in images:
        value = crc32c(img, value)
    return value


class Journal:
    """Journal slot ``slot`` of the filesystem on ``dev``."""

    def __init__(self, dev: BlockDevice, geo: Geometry, slot: int) -> None:
        self.dev = dev
        self.geo = geo
        self.slot = slot
        self.bs = geo.bs
        self.start = geo.journal_block(slot)
        self.capacity = min((self.bs - JOURNAL_RECORD.size) // 8, geo.journal_blocks - 2)
        self.mutex = threading.Lock()
        self.seq = 0
        self.commits = 0
        self.unckpt = False        # the record at block 1 is committed, not checkpointed
        self.inplace_dirty = False  # its in-place writes are not flushed yet
        self.checkpoints = 0

    def _read(self, block: int, count: int = 1) -> bytes:
        return self.dev.read(block * self.bs, count * self.bs)

    def header(self) -> dict:
        """The decoded journal header (FormatError if it is corrupt)."""
        return JOURNAL_HEADER.unpack(self._read(self.start))

    def write_header(self, seq: int, clean: bool) -> None:
        """Write and flush the header: ``seq`` next, and the clean-unmount flag."""
        raw = JOURNAL_HEADER.pack({"slot": self.slot, "seq": seq,
                                   "flags": JH_CLEAN if clean else 0}, self.bs)
        self.dev.write(self.start * self.bs, raw)
        self.dev.flush()
        self.seq = seq

    def note_flushed(self) -> None:
        """The caller flushed the device: earlier in-place writes are durable."""
        self.inplace_dirty = False

    def checkpoint(self) -> None:
        """Flush the last record's in-place writes and advance the header past it, so
        this journal never replays it again.  Must happen before another node may
        change one of its blocks (before a lock it covers is given up)."""
        with self.mutex:
            if not self.unckpt:
                return
            if self.inplace_dirty:
                self.dev.flush()
            self.write_header(self.seq + 1, False)
            self.unckpt = self.inplace_dirty = False
            self.checkpoints += 1

    def commit(self, images: dict[int, bytes], checkpoint: bool = True) -> None:
        """Make ``images`` (block number -> new contents) durable, journaled (see module doc).

        ``checkpoint=False`` (the mount keeps its locks: glocks) leaves the record
        un-checkpointed: its in-place writes are flushed by the next commit before
        that one overwrites the record, and :meth:`checkpoint` runs before a lock is
        given up.  A replay then applies the latest record again, which is harmless
        while this node still holds every lock that covers its blocks."""
        if not images:
            return
        if len(images) > self.capacity:
            raise JournalFull(f"{len(images)} metadata blocks, a record holds {self.capacity}")
        targets = sorted(images)
        tbytes = struct.pack(f"<{len(targets)}Q", *targets)
        blobs = [bytes(images[t]) for t in targets]
        with self.mutex:
            if self.inplace_dirty:  # the record about to be overwritten must be in place
                self.dev.flush()
                self.inplace_dirty = False
            seq = self.seq
            head = JOURNAL_RECORD.pack({"count": len(targets), "seq": seq})
            crc = record_crc(head, tbytes, blobs)
            desc = bytearray(self.bs)
            desc[:JOURNAL_RECORD.size] = head
            struct.pack_into("<I", desc, 16, crc)
            desc[JOURNAL_RECORD.size:JOURNAL_RECORD.size + len(tbytes)] = tbytes
            self.dev.write((self.start + 1) * self.bs, bytes(desc) + b"".join(blobs))
            self.dev.flush()                      # commit point
            for t, blob in zip(targets, blobs, strict=True):
                self.dev.write(t * self.bs, blob)
            self.commits += 1
            if not checkpoint:
                self.unckpt = self.inplace_dirty = True
                return
            self.dev.flush()                      # in place
            self.write_header(seq + 1, False)     # checkpoint: never replay this again
            self.unckpt = False

    def pending(self) -> tuple[int, dict[int, bytes]] | None:
        """The committed but not checkpointed record, as (seq, images), or None."""
        hdr = self.header()
        raw = self._read(self.start + 1)
        try:
            desc = JOURNAL_RECORD.unpack(raw[:JOURNAL_RECORD.size])
        except FormatError:
            return None
        n = desc["count"]
        if desc["seq"] != hdr["seq"] or n == 0 or n > self.capacity:
            return None
        tbytes = raw[JOURNAL_RECORD.size:JOURNAL_RECORD.size + 8 * n]
        data = self._read(self.start + 2, n)
        blobs = [data[i * self.bs:(i + 1) * self.bs] for i in range(n)]
        if record_crc(raw[:JOURNAL_RECORD.size], tbytes, blobs) != desc["crc"]:
            return None  # torn record: it never committed, nothing was written in place
        targets = struct.unpack(f"<{n}Q", tbytes)
        if any(t >= self.geo.total_blocks or t == 0 for t in targets):
            raise FormatError("journal record targets a block outside the filesystem")
        return desc["seq"], dict(zip(targets, blobs, strict=True))

    def replay(self) -> int:
        """Apply a pending record (idempotent), checkpoint; returns the blocks replayed."""
        with self.mutex:
            hdr = self.header()
            rec = self.pending()
            self.seq = hdr["seq"]
            if rec is None:
                return 0
            seq, images = rec
            for t, blob in images.items():
                self.dev.write(t * self.bs, blob)
            self.dev.flush()
            self.write_header(seq + 1, bool(hdr["flags"] & JH_CLEAN))
            return len(images)
