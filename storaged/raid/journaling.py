"""The array's use of the write-hole journal (storaged.raid.journal is its
on-disk format): records written before a partial-stripe update, checkpoints,
and replay at assembly."""

from __future__ import annotations

import logging
from typing import Any

from storaged.raid import journal as jrnl
from storaged.raid.members import (
    IN_SYNC,
    RECOVERING,
    REPLACING,
    SPARE,
    SPLIT_RECORD,
    Member,
)

log = logging.getLogger("storaged.raid")

class Journaling:
    """The write-hole journal of raid4/5/6.

    A part of :class:`~storaged.raid.array.RaidArray` (a mixin): its methods use the
    array's state and run under its lock, like the rest of the array."""

    # ------------------------------------------------------------ stripe journal
    def _journal_members(self) -> list[Member]:
        return [m for m in self.members
                if m.state in (IN_SYNC, RECOVERING, REPLACING, SPARE) and m.dev is not None]

    def _journal_checkpoint(self) -> None:
        """Flush members and restart the ring: every earlier record is durable at home."""
        assert self.journal is not None
        self._sc_destage_all()            # what the records protect goes home first
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
        if blocks and (len(blocks[0][1]) < SPLIT_RECORD or self.journal_fua):
            # Small records: one image each, the header packed once for all of them.
            recs = jrnl.encode_records(uuid, seq, self._jupto, s, lo, slots,
                                       [blk for _, blk in blocks])
            for (m, _), rec in zip(blocks, recs, strict=True):
                try:
                    assert m.dev is not None
                    m.dev.write(self._jpos, rec, fua=self.journal_fua)
                except OSError as e:
                    self._fail(m, f"journal write failed: {e}")
            self._jpos += size
            return
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
