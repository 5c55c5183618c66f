"""Stripe I/O: reading a stripe (reconstructing what a failed member held),
parity computation, and the reconstruct-write of a partial stripe."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import Any

from storaged import fastio
from storaged.block.base import BlockDeviceError
from storaged.raid import journal as jrnl
from storaged.raid.members import (
    Member,
    _MemberIOError,
)

log = logging.getLogger("storaged.raid")

class StripeIO:
    """Reads and writes of stripes.

    A part of :class:`~storaged.raid.array.RaidArray` (a mixin): its methods use the
    array's state and run under its lock, like the rest of the array."""

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


def _clip(pieces: list[tuple[int, int, memoryview]], lo: int, hi: int
          ) -> list[tuple[int, int, memoryview]]:
    """The parts of stripe pieces (k, off in chunk, data) inside rows [lo, hi)."""
    out = []
    for k, a, d in pieces:
        a0, a1 = max(a, lo), min(a + len(d), hi)
        if a0 < a1:
            out.append((k, a0, d[a0 - a:a1 - a]))
    return out
