"""Stripe write journal that closes the RAID-4/5/6 write hole (storaged-private format).

The write hole: a crash between the member writes of one stripe update
leaves parity that matches neither the old nor the new data; if a member
is then lost, reconstructing it from that parity corrupts data that was
acknowledged long before.  md answers with a journal device or, for
RAID-5 only, a partial parity log.  storaged keeps a small write-ahead
journal on every member, in the otherwise unused space between the
bitmap and ``data_offset`` (``JOURNAL_START`` .. data offset, 896 KiB
with mdadm's 1 MiB data offset), so no extra device is needed and it
works for RAID-6 (P and Q) as well.

Protocol, per stripe update (rows ``[lo, hi)`` of one stripe):

1. Every member that will be written (changed data, P, Q) gets a record
   holding *its own* new block: a 4 KiB header (sequence number, the
   slots taking part, ``durable_upto``, CRC32C of header and payload)
   then the payload.
2. Only then are the home locations written.

Rows a write covers on every data chunk of a stripe (a full-stripe write
of those rows) get no records: no acknowledged data shares their parity,
so tearing them can only affect the unacknowledged data being written
(md's PPL makes the same exception).  ``RaidArray`` splits requests into
such full rows and journaled partial rows, and checkpoints the ring first
when full rows overlap rows that still have live records.

Two modes.  ``sync`` writes records with FUA and flushes every member
before the ring is reused, so the order "record durable, then home
write" holds across a power cut.  ``async`` (the default) leaves both to
the page cache: it closes the hole for a daemon crash (kill -9, where
the kernel keeps every write) at a fraction of the cost, but after a
power cut it is only as good as the kernel's write-back order.

Replay (on assembly, before any I/O is served): for every sequence number
``>= durable_upto`` of the newest record, if every *present* member of
the slots taking part holds its record, all present records are copied
home.  If a present member lacks its record the journal phase was torn,
so no home location was touched and the stripe is still the old,
consistent one: the update is dropped (it was never acknowledged).  A
lost member's block is then reconstructed from the replayed survivors,
which are consistent with either the old or the new stripe contents.

The ring is reused from the start once full: members are flushed (so
every home write of the old records is durable) and a checkpoint record
(no slots, ``durable_upto`` = its own sequence) is written on every
member; the same happens whenever the set of members changes.

The format is private: md ignores this area (``mdadm --examine`` stays
valid, without md's JOURNAL/PPL feature bits), and a Linux host that
assembles the members after an unclean stop simply resyncs parity.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from storaged import fastio

JOURNAL_MAGIC = b"SDJ1"            # journal area superblock
RECORD_MAGIC = b"SDJ2"                # "SDJR" (zlib CRC-32) in the first version
JOURNAL_START = 128 << 10          # bytes from the member start
HEADER = 4096
MAX_RECORD = 128 << 10             # payload per record (longer updates are split)
MAX_SLOTS = (HEADER - 64) // 2

# area superblock: magic, version, flags, set uuid, ring start, ring end
_AREA = struct.Struct("<4sII16sQQ")
FLAG_SYNC = 1                      # records written with FUA, ring reuse after a flush
# record header: magic, crc, set uuid, seq, durable_upto, stripe, lo, length, slot, nslots
_REC = struct.Struct("<4sI16sQQQIIHH")


class JournalError(ValueError):
    """Not a journal area or record."""


def encode_area(uuid: bytes, start: int, end: int, sync: bool) -> bytes:
    """The 4 KiB journal area superblock written at ``JOURNAL_START``."""
    out = bytearray(HEADER)
    _AREA.pack_into(out, 0, JOURNAL_MAGIC, 1, FLAG_SYNC if sync else 0, uuid, start, end)
    return bytes(out)


def decode_area(raw: bytes, uuid: bytes) -> tuple[int, int, bool] | None:
    """(ring start, ring end, sync mode) of a journal area of array ``uuid``, or None."""
    magic, version, flags, u, start, end = _AREA.unpack_from(raw)
    if magic != JOURNAL_MAGIC or version != 1 or u != uuid or not start < end:
        return None
    return start, end, bool(flags & FLAG_SYNC)


@dataclass
class Record:
    """One member's journal record: its new rows ``[lo, lo+len)`` of stripe ``stripe``."""

    seq: int
    durable_upto: int
    stripe: int
    lo: int
    slot: int                      # the slot this payload belongs to
    slots: tuple[int, ...]         # every slot written by this update (empty: checkpoint)
    payload: bytes = b""

    def encode(self, uuid: bytes) -> bytes:
        return bytes(encode_record(uuid, self.seq, self.durable_upto, self.stripe, self.lo,
                                   self.slot, self.slots, self.payload))

    @property
    def size(self) -> int:
        return HEADER + len(self.payload)


def encode_header(uuid: bytes, seq: int, durable_upto: int, stripe: int, lo: int, slot: int,
                  slots: tuple[int, ...], payload: bytes | bytearray | memoryview) -> bytearray:
    """Only the 4 KiB header of a record (CRC over header and ``payload`` included).

    For large payloads the caller writes the header and the payload as two
    writes (header at the record offset, payload right after it) instead of
    copying the payload into one image: same bytes on disk, one copy less.
    A record torn between the two writes fails its CRC and is ignored.
    """
    if len(slots) > MAX_SLOTS:
        raise JournalError("too many slots in one record")
    head = bytearray(HEADER)
    _REC.pack_into(head, 0, RECORD_MAGIC, 0, uuid, seq, durable_upto, stripe, lo, len(payload),
                   slot, len(slots))
    struct.pack_into(f"<{len(slots)}H", head, _REC.size, *slots)
    struct.pack_into("<I", head, 4, fastio.crc32c(payload, fastio.crc32c(head)))
    return head


def encode_record(uuid: bytes, seq: int, durable_upto: int, stripe: int, lo: int, slot: int,
                  slots: tuple[int, ...], payload: bytes | bytearray | memoryview) -> bytearray:
    """One record image (header + payload) built in a single buffer.

    The checksum is CRC32C (Castagnoli, the iSCSI digest of RFC 3720
    section 12.1; ``storaged.fastio.crc32c``, hardware-assisted when
    compiled, about 6x zlib's CRC-32 here) over the header (CRC field zero)
    followed by the payload, i.e. the whole image in one pass: the
    per-record cost is one copy of the payload and one checksum.
    """
    if len(slots) > MAX_SLOTS:
        raise JournalError("too many slots in one record")
    n = len(payload)
    out = bytearray(HEADER + n)
    _REC.pack_into(out, 0, RECORD_MAGIC, 0, uuid, seq, durable_upto, stripe, lo, n, slot,
                   len(slots))
    struct.pack_into(f"<{len(slots)}H", out, _REC.size, *slots)
    out[HEADER:] = payload
    struct.pack_into("<I", out, 4, fastio.crc32c(out))
    return out


def encode_records(uuid: bytes, seq: int, durable_upto: int, stripe: int, lo: int,
                   slots: tuple[int, ...], payloads: list[bytes | bytearray | memoryview]
                   ) -> list[bytearray]:
    """The records of one update, one per slot in ``slots`` (``payloads`` in the same
    order), byte for byte what :func:`encode_record` gives for each: the header is
    packed once and only its slot and CRC fields differ."""
    if len(slots) > MAX_SLOTS:
        raise JournalError("too many slots in one record")
    head = bytearray(HEADER)
    struct.pack_into(f"<{len(slots)}H", head, _REC.size, *slots)
    out = []
    for slot, payload in zip(slots, payloads, strict=True):
        n = len(payload)
        rec = bytearray(HEADER + n)
        _REC.pack_into(head, 0, RECORD_MAGIC, 0, uuid, seq, durable_upto, stripe, lo, n, slot,
                       len(slots))
        rec[:HEADER] = head
        rec[HEADER:] = payload
        struct.pack_into("<I", rec, 4, fastio.crc32c(rec))
        out.append(rec)
    return out


def parse_ring(area: bytes | memoryview, uuid: bytes) -> list[tuple[int, Record]]:
    """Every valid record in a ring image: (offset in the image, record).

    Scans each 4 KiB boundary: members not taking part in an update keep
    older bytes where it was written, so records need not be contiguous.
    """
    out: list[tuple[int, Record]] = []
    view = memoryview(area)
    for off in range(0, len(view) - HEADER + 1, HEADER):
        if bytes(view[off:off + 4]) != RECORD_MAGIC:
            continue
        (_m, crc, u, seq, upto, stripe, lo, length, slot,
         nslots) = _REC.unpack_from(view, off)
        if u != uuid or nslots > MAX_SLOTS or off + HEADER + length > len(view):
            continue
        head = bytearray(view[off:off + HEADER])
        struct.pack_into("<I", head, 4, 0)
        payload = bytes(view[off + HEADER:off + HEADER + length])
        if fastio.crc32c(payload, fastio.crc32c(head)) != crc:
            continue
        slots = struct.unpack_from(f"<{nslots}H", view, off + _REC.size)
        out.append((off, Record(seq, upto, stripe, lo, slot, tuple(slots), payload)))
    return out


def plan_replay(found: dict[int, list[Record]], present: set[int]
                ) -> tuple[list[Record], int]:
    """Which records to copy home, in order, and the next sequence number.

    ``found`` maps a present slot to the records read from its member;
    ``present`` is every slot with a member now.  See the module docstring
    for the rule.
    """
    allrecs = [r for recs in found.values() for r in recs]
    if not allrecs:
        return [], 1
    newest = max(allrecs, key=lambda r: r.seq)
    floor = max(r.durable_upto for r in allrecs if r.seq == newest.seq)
    by_seq: dict[int, dict[int, Record]] = {}
    for slot, recs in found.items():
        for r in recs:
            if r.seq >= floor and r.slots and r.slot == slot:
                by_seq.setdefault(r.seq, {})[slot] = r
    plan: list[Record] = []
    for seq in sorted(by_seq):
        have = by_seq[seq]
        slots = next(iter(have.values())).slots
        if all(s in have for s in slots if s in present):
            plan.extend(have[s] for s in slots if s in have)
    return plan, newest.seq + 1
