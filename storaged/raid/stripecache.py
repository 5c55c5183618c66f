"""The RAID-4/5/6 stripe cache (md's ``stripe_cache_size``): small writes
without re-reading the stripe, and their home writes merged per stripe.

md keeps a pool of *stripe heads*, one 4 KiB page of every member at one
row of a stripe (``STRIPE_SIZE``).  A small write finds its stripe head
in the pool (or reads it in once), updates the data page and the parity
from the cached pages, and later writes the changed pages home.  storaged
does the same with :class:`StripeHead` entries keyed by (stripe, page):

* **Hits need no reads.**  A write to a cached page updates parity from
  the cached old data: ``P ^= old ^ new`` (and for RAID-6
  ``Q ^= g**i * (old ^ new)``, md's ``ops_run_prexor`` /
  ``async_gen_syndrome`` with the read-modify-write sources).  A miss
  reads the rows of every data member once (reconstructing a missing one
  from parity, as a reconstruct-write does), computes P/Q from them, and
  keeps them; a miss next to a cached page reads ``READAHEAD`` pages at
  once, so a sequential stream of small writes costs one read per member
  every 64 KiB instead of two reads per write.
* **Home writes are deferred and merged** when the array has the write-hole
  journal: a small write is acknowledged once its journal records (new
  data and new parity of the pages it changed, storaged.raid.journal) are
  on every member taking part, exactly as before, but the home locations
  are written later, when the stripe is *destaged*: every run of
  adjacent dirty pages goes to its member in one write, data first, then
  P and Q, so parity is written once for all the writes that landed in
  the stripe meanwhile.  A crash before the destage loses nothing: the
  records are replayed at assembly like any other complete update.
  Without a journal the cache is write-through (pages are written home by
  the write that changed them), so an acknowledged write is on the
  members when it returns, as before.
* **Destage** happens before the journal ring is reused (a checkpoint
  retires records, so what they protect must be home first), when a dirty
  page is evicted (least recently used first, the whole stripe goes at
  once), on flush / FUA / stop, when the array becomes clean (md's safe
  mode), before the background worker touches a stripe, and before a
  large (uncached) write or a member change.
* **Large writes bypass the cache**: a request that spans more than
  ``MAX_CACHED_ROWS`` of a stripe's rows takes the existing path (full
  rows written without reads or journal records, partial rows as
  journaled reconstruct-writes) after the stripe's dirty pages are
  destaged and the pages it overwrites are dropped.  Reads come from the
  cache where it holds a page, from the members otherwise.

Cache size: ``stripe_cache_size`` stripe heads (md's unit; memory is
``stripe_cache_size * 4 KiB * raid_disks``), 0 turns the cache off.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from storaged import fastio
from storaged._pureraid import GF_EXP
from storaged.raid import journal as jrnl

PAGE = 4096                       # md's STRIPE_SIZE: one page of every member per head
READAHEAD = 16                    # pages read at once on a sequential miss (64 KiB)
MAX_CACHED_ROWS = 64 << 10        # requests spanning more rows of a stripe bypass the cache
DEFAULT_STRIPE_CACHE_SIZE = 1024  # stripe heads (md's default is 256)
MIN_STRIPE_CACHE_SIZE = 32        # at least two read-ahead windows (md's minimum is 17)
MAX_STRIPE_CACHE_SIZE = 32768     # md's limit


def check_cache_size(size: int) -> int:
    """Validate a ``stripe_cache_size`` (0 = off); ValueError names the bounds."""
    if isinstance(size, bool) or not isinstance(size, int) or \
            not (size == 0 or MIN_STRIPE_CACHE_SIZE <= size <= MAX_STRIPE_CACHE_SIZE):
        raise ValueError(f"stripe_cache_size must be 0 (off) or {MIN_STRIPE_CACHE_SIZE}.."
                         f"{MAX_STRIPE_CACHE_SIZE} stripe heads, got {size!r}")
    return size


class StripeHead:
    """One page of every member at one row of a stripe: data pages, then P (and Q).

    ``dirty`` is a bit mask over ``blocks``: pages newer than their home location."""

    __slots__ = ("blocks", "dirty")

    def __init__(self, blocks: list[bytearray]) -> None:
        self.blocks = blocks
        self.dirty = 0


class StripeCache:
    """The pool of stripe heads: LRU order, per-stripe indexes and counters (no I/O)."""

    def __init__(self, size: int) -> None:
        self.size = check_cache_size(size)
        self.heads: OrderedDict[tuple[int, int], StripeHead] = OrderedDict()
        self.by_stripe: dict[int, set[int]] = {}     # stripe -> cached pages
        self.dirty: dict[int, set[int]] = {}         # stripe -> dirty pages
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self.destaged = 0          # stripe destages
        self.home_writes = 0       # member writes issued by destages
        self.last = (-1, -1, -1)   # (stripe, data index, offset) just after the last write
        # Pages that missed once lately (2Q's "A1out"): a page is cached on its second
        # miss, so a stream that never comes back costs no more than without a cache.
        self.ghosts: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.bypassed = 0          # writes that took the uncached path (first misses)

    def admit(self, s: int, p0: int, p1: int) -> bool:
        """Whether a write to pages [p0, p1) of stripe ``s``, none cached and not
        sequential, should be cached (it missed before) or just written."""
        seen = False
        for pg in range(p0, p1):
            if self.ghosts.pop((s, pg), False) is None:
                seen = True
        if seen:
            return True
        for pg in range(p0, p1):
            self.ghosts[(s, pg)] = None
        while len(self.ghosts) > 4 * self.size:
            self.ghosts.popitem(last=False)
        self.bypassed += 1
        return False

    def get(self, s: int, pg: int) -> StripeHead | None:
        h = self.heads.get((s, pg))
        if h is not None:
            self.heads.move_to_end((s, pg))
        return h

    def put(self, s: int, pg: int, head: StripeHead) -> None:
        self.heads[(s, pg)] = head
        self.by_stripe.setdefault(s, set()).add(pg)

    def mark_dirty(self, s: int, pg: int) -> None:
        self.dirty.setdefault(s, set()).add(pg)

    def drop(self, s: int, pg: int) -> None:
        """Forget a clean head."""
        if self.heads.pop((s, pg), None) is None:
            return
        pages = self.by_stripe.get(s)
        if pages is not None:
            pages.discard(pg)
            if not pages:
                del self.by_stripe[s]

    def lru(self) -> tuple[int, int]:
        return next(iter(self.heads))

    def dirty_count(self) -> int:
        return sum(len(v) for v in self.dirty.values())

    def describe(self) -> dict[str, Any]:
        """The cache part of ``storaged raid status --json``."""
        return {"size": self.size, "cached": len(self.heads), "dirty": self.dirty_count(),
                "hits": self.hits, "misses": self.misses, "bypassed": self.bypassed,
                "evicted": self.evicted, "destaged": self.destaged,
                "home_writes": self.home_writes}


class StripeCaching:
    """Cached small writes, destage and cached reads of raid4/5/6.

    A part of :class:`~storaged.raid.array.RaidArray` (a mixin): its methods use the
    array's state and run under its lock, like the rest of the array."""

    # ------------------------------------------------------------ configuration
    @property
    def stripe_cache_size(self) -> int:
        return self._sc.size if self._sc is not None else 0

    @stripe_cache_size.setter
    def stripe_cache_size(self, size: int) -> None:
        check_cache_size(size)
        with self.lock:
            if self.geo.level not in (4, 5, 6):
                return                    # no parity stripes: nothing to cache
            if self._sc is not None:
                self._sc_destage_all()
                if size == 0:
                    self._sc = None
                    return
                self._sc.size = size
                self._sc_shrink(set())
            elif size:
                self._sc = StripeCache(size)

    def _sc_wanted(self, lo: int, hi: int, pieces: list[tuple[int, int, memoryview]]) -> bool:
        """Whether a write of rows [lo, hi) of one stripe goes through the cache: small,
        and with no row written on every data chunk (full rows need no reads and no
        journal records on the uncached path: md's full-stripe write)."""
        if self._sc is None or hi - lo > MAX_CACHED_ROWS or self.failed:
            return False
        nd = self.geo.data_disks
        if len(pieces) == nd and nd > 1 and len({k for k, _, _ in pieces}) == nd and \
                max(a for _, a, _ in pieces) < min(a + len(d) for _, a, d in pieces):
            return False
        return True

    # ------------------------------------------------------------ loading heads
    def _sc_nblocks(self) -> int:
        return self.geo.data_disks + (2 if self.geo.level == 6 else 1)

    def _sc_fill(self, s: int, p0: int, p1: int, preset: dict[int, Any] | None = None) -> None:
        """Read pages [p0, p1) of stripe ``s`` into new heads (P/Q computed from the data).

        ``preset`` gives whole data blocks (data index -> new bytes for the
        whole range) that need not be read: a reconstruct-write's own data."""
        sc = self._sc
        assert sc is not None
        lo, hi = p0 * PAGE, p1 * PAGE
        sm = self.geo.stripe(s)
        nd = len(sm.data)
        need = {k for k in range(nd) if not preset or k not in preset}
        data, _, _ = self._stripe_read(s, lo, hi, need) if need else ([None] * nd, None, None)
        if preset:
            for k, blk in preset.items():
                data[k] = blk
        p, q = self._parity(sm.qexp, data, hi - lo)
        cols = [memoryview(d) for d in data] + [memoryview(p)] + \
            ([memoryview(q)] if q is not None else [])
        for i, pg in enumerate(range(p0, p1)):
            a = i * PAGE
            sc.put(s, pg, StripeHead([bytearray(c[a:a + PAGE]) for c in cols]))

    def _sc_load(self, s: int, p0: int, p1: int, sequential: bool = False) -> list[StripeHead]:
        """The heads of pages [p0, p1) of stripe ``s``, reading the missing ones (and
        up to ``READAHEAD`` pages beyond, when the writes are ``sequential``)."""
        sc = self._sc
        assert sc is not None
        pages_per_chunk = self.geo.chunk // PAGE
        out: list[StripeHead | None] = [sc.get(s, pg) for pg in range(p0, p1)]
        i = 0
        while i < len(out):
            if out[i] is not None:
                sc.hits += 1
                i += 1
                continue
            j = i
            while j < len(out) and out[j] is None:
                j += 1
            a, b = p0 + i, p0 + j
            if sequential and b == p1:    # read ahead over uncached pages
                lim = min(a + READAHEAD, pages_per_chunk)
                while b < lim and (s, b) not in sc.heads:
                    b += 1
            sc.misses += j - i
            self._sc_fill(s, a, b)
            for x in range(i, j):
                out[x] = sc.heads[(s, p0 + x)]
            i = j
        heads = [h for h in out if h is not None]
        self._sc_shrink({(s, pg) for pg in range(p0, p1)})
        return heads

    def _sc_shrink(self, keep: set[tuple[int, int]]) -> None:
        """Evict least recently used heads beyond the cache size (destaging dirty ones)."""
        sc = self._sc
        assert sc is not None
        while len(sc.heads) > sc.size:
            key = sc.lru()
            if key in keep:
                sc.heads.move_to_end(key)
                if all(k in keep for k in sc.heads):
                    return
                continue
            s, pg = key
            if sc.heads[key].dirty:
                self._sc_destage(s)        # the whole stripe: its neighbours go in the same writes
            sc.drop(s, pg)
            sc.evicted += 1

    # ------------------------------------------------------------ writes
    def _sc_write(self, s: int, lo: int, hi: int, pieces: list[tuple[int, int, memoryview]],
                  fua: bool) -> None:
        """A small write of rows [lo, hi) of stripe ``s`` through the cache."""
        sc = self._sc
        assert sc is not None
        p0, p1 = lo // PAGE, -(-hi // PAGE)
        # Sequential: this write continues the last one in the same data chunk.
        sequential = sc.last == (s, pieces[0][0], pieces[0][1])
        k_end, a_end, d_end = pieces[-1]
        sc.last = (s, k_end, a_end + len(d_end))
        cached = sc.by_stripe.get(s)
        fresh = not cached or all(pg not in cached for pg in range(p0, p1))
        if fresh and not sequential and not sc.admit(s, p0, p1):
            # A first miss: the plain reconstruct-write (no other row of the stripe is
            # involved, so its cached pages stay as they are).
            self._stripe_write(s, lo, hi, pieces, fua)
            return
        geo = self.geo
        sm = geo.stripe(s)
        nd = len(sm.data)
        plo, phi = p0 * PAGE, p1 * PAGE
        raid6 = geo.level == 6
        whole = len(pieces) == 1 and pieces[0][1] == plo and len(pieces[0][2]) == phi - plo
        if whole and not sequential and fresh:
            # Whole pages, none cached: a reconstruct-write that keeps what it read.
            k, _, d = pieces[0]
            self._sc_reserve(phi - plo)
            sc.misses += p1 - p0
            self._sc_fill(s, p0, p1, {k: d})
            heads = [sc.heads[(s, pg)] for pg in range(p0, p1)]
            self._sc_shrink({(s, pg) for pg in range(p0, p1)})
        else:
            heads = self._sc_load(s, p0, p1, sequential)
            self._sc_reserve(phi - plo)
            for k, a, d in pieces:
                self._sc_apply(sm.qexp[k], k, nd, raid6, heads, p0, a, d)
        changed = sorted({k for k, _, _ in pieces})
        mask = 0
        for k in changed:
            mask |= 1 << k
        mask |= (1 << nd) | ((1 << (nd + 1)) if raid6 else 0)
        idx = [(sm.data[k], k) for k in changed] + [(sm.pd, nd)] + \
            ([(sm.qd, nd + 1)] if raid6 else [])
        if self.journal is not None and not self.failed:
            targets = []
            for slot, b in idx:
                m = self._writable(slot)
                if m is not None:
                    blk = heads[0].blocks[b] if len(heads) == 1 else \
                        b"".join(h.blocks[b] for h in heads)
                    targets.append((m, blk))
            self._jbusy = True
            try:
                self._journal_write(s, plo, targets)
            finally:
                self._jbusy = False
            for i, h in enumerate(heads):
                h.dirty |= mask
                sc.mark_dirty(s, p0 + i)
            if fua and not self.journal_fua:
                self._sc_destage(s, fua=True)
            if self._jdeferred:
                self._jdeferred = False
                if not self.failed:
                    self._journal_checkpoint()
            return
        # No journal: write-through, the changed pages go home now.
        for i, h in enumerate(heads):
            h.dirty |= mask
            sc.mark_dirty(s, p0 + i)
        self._sc_destage(s, fua=fua)

    def _sc_apply(self, qexp: int, k: int, nd: int, raid6: bool, heads: list[StripeHead],
                  p0: int, a: int, d: memoryview) -> None:
        """Put data ``d`` at ``a`` of data index ``k`` into the heads, updating P (and Q)."""
        pos, end = a, a + len(d)
        coef = GF_EXP[qexp]
        while pos < end:
            pg = pos // PAGE
            x = pos - pg * PAGE
            y = min(PAGE, end - pg * PAGE)
            h = heads[pg - p0]
            new = d[pos - a:pos - a + (y - x)]
            old = memoryview(h.blocks[k])[x:y]
            p = memoryview(h.blocks[nd])[x:y]
            if raid6:
                delta = bytearray(y - x)
                fastio.xor_gen(delta, [old, new])
                fastio.xor_gen(p, [p, delta])
                fastio.gf_mul(memoryview(h.blocks[nd + 1])[x:y], delta, coef, True)
            else:
                fastio.xor_gen(p, [p, old, new])
            old[:] = new
            pos += y - x

    def _sc_reserve(self, length: int) -> None:
        """Make room in the journal ring for a record of ``length`` bytes *before* the
        cache changes (a checkpoint destages everything, and must not write home
        pages whose new contents have no records yet)."""
        if self.journal is None or self.failed:
            return
        _start, end = self.journal
        size = -(-(jrnl.HEADER + length) // jrnl.HEADER) * jrnl.HEADER
        if self._jpos + size > end:
            self._journal_checkpoint()

    # ------------------------------------------------------------ destage
    def _sc_destage(self, s: int, fua: bool = False) -> None:
        """Write the dirty pages of stripe ``s`` home: one write per run of adjacent
        dirty pages per member, data before P and Q."""
        sc = self._sc
        if sc is None:
            return
        pages = sc.dirty.pop(s, None)
        if not pages:
            return
        sc.destaged += 1
        sm = self.geo.stripe(s)
        slots = list(sm.data) + [sm.pd] + ([sm.qd] if self.geo.level == 6 else [])
        order = sorted(pages)
        heads = [sc.heads[(s, pg)] for pg in order]
        base = s * self.geo.chunk
        was = self._jbusy
        self._jbusy = True                # a member failing here must not checkpoint yet
        try:
            for b, slot in enumerate(slots):
                bit = 1 << b
                i = 0
                while i < len(order):
                    if not heads[i].dirty & bit:
                        i += 1
                        continue
                    j = i + 1
                    while j < len(order) and order[j] == order[j - 1] + 1 and \
                            heads[j].dirty & bit:
                        j += 1
                    m = self._writable(slot)
                    if m is not None:
                        buf = heads[i].blocks[b] if j == i + 1 else \
                            b"".join(h.blocks[b] for h in heads[i:j])
                        self._mwrite(m, base + order[i] * PAGE, buf, fua)
                        sc.home_writes += 1
                    i = j
            for h in heads:
                h.dirty = 0
        finally:
            self._jbusy = was
        if not was and self._jdeferred:
            self._jdeferred = False
            if not self.failed:
                self._journal_checkpoint()

    def _sc_destage_all(self, fua: bool = False) -> None:
        sc = self._sc
        if sc is None or self.failed:
            return
        for s in sorted(sc.dirty):
            self._sc_destage(s, fua)

    def _sc_forget(self, s: int, lo: int, hi: int) -> None:
        """Before an uncached write of rows [lo, hi) of stripe ``s``: destage the
        stripe and drop the heads the write makes stale."""
        sc = self._sc
        if sc is None or s not in sc.by_stripe:
            return
        self._sc_destage(s)
        for pg in [pg for pg in sc.by_stripe.get(s, ()) if pg * PAGE < hi and lo < (pg + 1) * PAGE]:
            sc.drop(s, pg)

    # ------------------------------------------------------------ reads
    def _sc_read(self, s: int, k: int, lo: int, hi: int) -> Any:
        """Data index ``k`` of stripe ``s``, rows [lo, hi): cached pages from the cache,
        the rest from the members (whose copy is current for every uncached page)."""
        sc = self._sc
        assert sc is not None
        cached = sc.by_stripe.get(s)
        p0, p1 = lo // PAGE, -(-hi // PAGE)
        if cached and all(pg in cached for pg in range(p0, p1)):
            if p1 - p0 == 1:
                h = sc.heads[(s, p0)]
                sc.hits += 1
                return memoryview(h.blocks[k])[lo - p0 * PAGE:hi - p0 * PAGE]
            buf = b"".join(sc.heads[(s, pg)].blocks[k] for pg in range(p0, p1))
            sc.hits += p1 - p0
            return memoryview(buf)[lo - p0 * PAGE:hi - p0 * PAGE]
        data, _, _ = self._stripe_read(s, lo, hi, {k})
        out = data[k]
        if not cached:
            return out
        out = bytearray(out)
        for pg in range(p0, p1):
            if pg in cached:
                a, b = max(lo, pg * PAGE), min(hi, (pg + 1) * PAGE)
                out[a - lo:b - lo] = memoryview(sc.heads[(s, pg)].blocks[k])[
                    a - pg * PAGE:b - pg * PAGE]
        return out
