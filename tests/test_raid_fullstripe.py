"""Full-stripe writes skip the stripe journal; the write-hole guarantee still holds.

A write that covers every data chunk of some stripe rows leaves no
acknowledged data sharing those rows' parity, so those rows go home
without journal records (only the partial head/tail rows are journaled).
These tests tear such writes at every member-write boundary and check:

* with a member lost in the crash (dirty degraded): every block outside
  the written range reads back exactly, and inside it every sector on a
  surviving member, and every sector of a journaled (partial) row, is old
  or new;
* with the array restarted complete (its bitmap-driven resync runs) and a
  member lost afterwards: every sector of the written range is old or new;
* a full-stripe write over rows that still have live journal records
  retires them, so a replay cannot bring the older data back;
* full-stripe rows really write no records.
"""

from __future__ import annotations

import os
import random

import pytest

from storaged.raid import assemble, create
from tests.test_raid_journal import CHUNK, FAST, Budget, TornDevice


def _shapes(nd: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    stripe = nd * chunk
    return [(2 * stripe, stripe),                              # exactly one full stripe
            (stripe + chunk // 2, 2 * stripe)]                 # partial head, full, partial tail


def _full_row(nd: int, o: int, off: int, length: int, chunk: int = CHUNK) -> bool:
    """Whether array byte ``o`` lies in a row the write covers on every data chunk."""
    s, r = divmod(o, nd * chunk)
    r %= chunk
    return all(off <= s * nd * chunk + k * chunk + r < off + length for k in range(nd))


def _torn_full(tmp: str, level: int, n: int, k: int, lost: tuple[int, ...], off: int,
               length: int, lose_after_restart: bool, chunk: int = CHUNK) -> list[str]:
    """One torn write; the list of violations (empty: guarantee held)."""
    paths = [os.path.join(tmp, f"d{i}") for i in range(n)]
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
    arr = create("fs", paths, level, chunk=chunk, size=(1 << 20) + 4 * chunk,
                 start_worker=False, bitmap_chunk=64 * 1024)
    nd = arr.geo.data_disks
    rnd = random.Random(k * 17 + sum(lost) + level)
    old = rnd.randbytes(arr.size)
    arr.write(0, old)
    budget = Budget()
    for m in arr.members:
        m.dev = TornDevice(m.dev, budget)
    new = rnd.randbytes(length)
    budget.left = k
    arr.write(off, new)
    arr.abandon()
    if lose_after_restart:
        arr = assemble(paths, start_worker=False)
        arr.speed_limit_min = arr.speed_limit_max = FAST
        arr.run_pending()                 # the dirty-region resync
        for i in lost:
            arr.fail(paths[i])
        arr.run_pending()
    else:
        arr = assemble([p for i, p in enumerate(paths) if i not in lost], start_worker=False)
        arr.speed_limit_min = arr.speed_limit_max = FAST
    got = arr.read(0, arr.size)
    bad = []
    if got[:off] != old[:off] or got[off + length:] != old[off + length:]:
        bad.append("acknowledged data outside the write changed")
    for o in range(off, off + length, 512):
        if got[o:o + 512] in (old[o:o + 512], new[o - off:o - off + 512]):
            continue
        c = o // chunk
        slot = arr.geo.stripe(c // nd).data[c % nd]
        if lose_after_restart or slot not in lost or not _full_row(nd, o, off, length, chunk):
            bad.append(f"sector {o // 512} (slot {slot}) neither old nor new")
            break
    arr.abandon()
    return bad


@pytest.mark.parametrize("level,n", [(5, 4), (6, 5)])
@pytest.mark.parametrize("after_restart", [False, True])
def test_torn_full_stripe_then_member_loss(tmp_path, level: int, n: int,
                                           after_restart: bool) -> None:
    losses: list[tuple[int, ...]] = [(i,) for i in range(n)]
    if level == 6:
        losses += [(0, 2), (1, 4), (2, 3)]
    checked = 0
    for off, length in _shapes(n - (1 if level == 5 else 2)):
        for k in range(24):
            lost = losses[k % len(losses)]
            bad = _torn_full(str(tmp_path), level, n, k, lost, off, length, after_restart)
            assert not bad, f"k={k} lost={lost} off={off}: {bad}"
            checked += 1
    assert checked == 48


@pytest.mark.slow
def test_torn_large_records(tmp_path) -> None:
    """64 KiB partial rows: records big enough to be written as header + payload apart."""
    from storaged.raid.members import SPLIT_RECORD
    chunk = 64 * 1024
    assert chunk // 2 >= SPLIT_RECORD
    checked = 0
    for off, length in _shapes(3, chunk):
        for k in range(30):
            for lost, after in [((i,), False) for i in range(4)] + [((k % 4,), True)]:
                bad = _torn_full(str(tmp_path), 5, 4, k, lost, off, length, after, chunk)
                assert not bad, f"k={k} lost={lost} off={off} after={after}: {bad}"
                checked += 1
    assert checked == 300


def test_full_stripe_write_retires_older_records(tmp_path) -> None:
    """Journaled update, then a full-stripe write of the same rows, then a crash."""
    paths = [str(tmp_path / f"d{i}") for i in range(4)]
    arr = create("fs", paths, 5, chunk=CHUNK, size=2 << 20, start_worker=False)
    stripe = 3 * CHUNK
    first = os.urandom(4096)
    arr.write(stripe + 8192, first)                   # partial: journaled
    assert arr._jlive_overlaps(1, 8192, 8192 + 4096)
    second = os.urandom(stripe)
    arr.write(stripe, second)                         # full stripe: no records
    expect = arr.read(0, arr.size)
    arr.abandon()                                     # crash: journal replayed at assembly
    arr = assemble(paths, start_worker=False)
    assert arr.read(stripe, stripe) == second
    assert arr.read(0, arr.size) == expect
    arr.close()


def test_full_stripe_rows_write_no_records(tmp_path) -> None:
    paths = [str(tmp_path / f"d{i}") for i in range(5)]
    arr = create("fs", paths, 6, chunk=CHUNK, size=2 << 20, start_worker=False)
    lo, hi = arr.journal
    seen: list[tuple[int, int]] = []

    class Spy(TornDevice):
        def write(self, offset: int, data, fua: bool = False) -> None:  # noqa: ANN001
            if lo <= offset < hi:
                seen.append((offset, len(data)))
            super().write(offset, data, fua)

    budget = Budget()
    for m in arr.members:
        m.dev = Spy(m.dev, budget)
    stripe = 3 * CHUNK
    arr.write(4 * stripe, os.urandom(2 * stripe))     # two full stripes
    assert seen == []
    arr.write(4 * stripe + 512, os.urandom(1024))     # partial: one record per member written
    assert len(seen) == 3                             # data member, P, Q
    arr.close()
