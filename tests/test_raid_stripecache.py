"""The RAID-4/5/6 stripe cache (storaged.raid.stripecache).

* Differential: one random stream of small writes (every length and
  alignment, hot stripes, writes across chunk boundaries, a few large
  writes that bypass the cache, flushes) through an array with the cache
  and one without leaves identical member data areas; parity checks clean;
  ``mdadm --examine`` accepts the members.  The same stream through the
  pure-Python parity kernels gives the same bytes as the compiled ones.
* Crash/recovery: writes acknowledged from the cache (their pages still
  dirty, not yet written home) survive a crash plus the loss of a member;
  a write torn in its journal phase or a destage torn half-way leaves every
  acknowledged block intact and the torn region old-or-new.
* Pressure: a small cache evicts (destaging dirty stripes) and stays within
  its size; hits issue no member reads; without a journal the cache is
  write-through.
"""

from __future__ import annotations

import os
import random

import pytest

from storaged import _purefastio
from storaged.control.ops import ConfigError
from storaged.raid import assemble, create
from storaged.raid import journal as jrnl
from storaged.raid import stripecache as scm
from storaged.raid import stripes as stripes_mod
from storaged.raid.service import RaidService
from storaged.state import Store
from tests.test_raid_journal import Budget, TornDevice
from tests.test_raid_mdadm import examine

CHUNK = 16 * 1024
SIZE = 2 << 20                    # member bytes: 1 MiB of data after the 1 MiB data offset

CASES = [(5, 4, None), (5, 3, "right-asymmetric"), (4, 3, None), (6, 5, None),
         (6, 4, "parity-last")]


def _make(tmp, tag: str, level: int, n: int, layout: str | None, cache: int,
          journal: bool | str | None = None):  # noqa: ANN202
    paths = [os.path.join(tmp, f"{tag}{i}") for i in range(n)]
    arr = create(tag, paths, level, chunk=CHUNK, layout=layout, size=SIZE, start_worker=False,
                 journal=journal, bitmap_chunk=64 * 1024)
    arr.stripe_cache_size = cache
    return arr, paths


def _stream(seed: int, size: int, count: int) -> list[tuple[str, int, bytes]]:
    """A write stream: small writes of odd sizes, hot stripes, chunk-crossers, some big."""
    rnd = random.Random(seed)
    hot = [rnd.randrange(size // CHUNK) * CHUNK for _ in range(3)]
    ops: list[tuple[str, int, bytes]] = []
    for i in range(count):
        r = rnd.random()
        if r < 0.03:
            ops.append(("flush", 0, b""))
            continue
        if r < 0.08:
            n = rnd.choice([3 * CHUNK, 5 * CHUNK + 512, 64 * 1024 + 4096])
        elif r < 0.2:
            n = rnd.choice([1024, 4096, 6144])
            off = rnd.choice(hot) + CHUNK - n // 2          # across a chunk boundary
            if off + n <= size:
                ops.append(("write", off, rnd.randbytes(n)))
            continue
        else:
            n = rnd.choice([512, 1536, 4096, 4096, 8192, 12288, 20480])
        if r < 0.5:
            off = rnd.choice(hot) + rnd.randrange(CHUNK // 512) * 512
        elif r < 0.7:
            off = (i * 4096) % (size - n)                    # a sequential run
        else:
            off = rnd.randrange((size - n) // 512) * 512
        off = min(off, size - n)
        ops.append(("write", off, rnd.randbytes(n)))
    return ops


def _run(arr, ops, model: bytearray) -> None:  # noqa: ANN001
    for op, off, data in ops:
        if op == "flush":
            arr.flush()
        else:
            arr.write(off, data)
            model[off:off + len(data)] = data


def _data_areas(arr, paths) -> list[bytes]:  # noqa: ANN001
    """Every member's data area, read from the member files."""
    out = []
    for m in sorted(arr.members, key=lambda m: m.slot):
        with open(m.path, "rb") as f:
            f.seek(m.data_offset)
            out.append(f.read(arr.geo.member_bytes))
    return out


def _check_clean(paths: list[str], model: bytes | None) -> None:
    arr = assemble(paths, start_worker=False)
    try:
        if model is not None:
            assert arr.read(0, len(model)) == model
        arr.speed_limit_min = arr.speed_limit_max = 10**9
        arr.run_pending()                  # a resync first, after a crash
        arr.start_sync("check")
        arr.run_pending()
        assert arr.mismatch_cnt == 0
    finally:
        arr.close()


@pytest.mark.peer
@pytest.mark.parametrize("level,n,layout", CASES)
def test_cache_and_no_cache_write_identical_members(tmp_path, level, n, layout):
    a, pa = _make(str(tmp_path), "a", level, n, layout, 0)
    b, pb = _make(str(tmp_path), "b", level, n, layout, 64)
    ops = _stream(level * 10 + n, a.size, 500)
    ma, mb = bytearray(a.size), bytearray(b.size)
    _run(a, ops, ma)
    _run(b, ops, mb)
    st = b.status()["stripe_cache"]
    assert st["hits"] > 0 and st["evicted"] > 0 and st["destaged"] > 0, st
    assert b.read(0, b.size) == bytes(mb)          # reads through the cache
    a.close()
    b.close()
    assert _data_areas(a, pa) == _data_areas(b, pb)
    _check_clean(pb, bytes(mb))
    for p in pb:
        f = examine(p)
        assert f["Raid Level"] == f"raid{level}"
        assert f["Checksum"].endswith("correct")
        assert f["State"] == "clean"


def test_pure_and_compiled_kernels_write_identical_members(tmp_path, monkeypatch):
    """The cached path through the pure-Python parity reference gives the same bytes."""
    out = []
    for tag in ("c", "p"):
        if tag == "p":
            monkeypatch.setattr(scm, "fastio", _purefastio)
            monkeypatch.setattr(stripes_mod, "fastio", _purefastio)
        for level, n in ((5, 4), (6, 5)):
            arr, paths = _make(str(tmp_path), f"{tag}{level}", level, n, None, 64)
            _run(arr, _stream(7 + level, arr.size, 200), bytearray(arr.size))
            arr.close()
            out.append(_data_areas(arr, paths))
    assert out[0] == out[2] and out[1] == out[3]


@pytest.mark.parametrize("level,n", [(5, 4), (6, 5), (4, 3)])
def test_acknowledged_cached_writes_survive_crash_and_member_loss(tmp_path, level, n):
    arr, paths = _make(str(tmp_path), "x", level, n, None, 1024)
    rnd = random.Random(level)
    model = bytearray(rnd.randbytes(arr.size))
    arr.write(0, bytes(model))
    for _ in range(150):
        ln = rnd.choice([512, 4096, 8192])
        off = rnd.randrange((arr.size - ln) // 512) * 512
        blob = rnd.randbytes(ln)
        arr.write(off, blob)
        model[off:off + ln] = blob
    assert arr.status()["stripe_cache"]["dirty"] > 0      # not all home yet
    arr.abandon()                                         # crash: no destage
    crashed = [open(p, "rb").read() for p in paths]
    for lost in range(n):                                 # the same crash, each member lost
        for p, img in zip(paths, crashed, strict=True):
            with open(p, "wb") as f:
                f.write(img)
        keep = [p for i, p in enumerate(paths) if i != lost]
        arr = assemble(keep, start_worker=False)
        assert arr.read(0, arr.size) == bytes(model), f"lost member {lost}"
        arr.abandon()
    for p, img in zip(paths, crashed, strict=True):
        with open(p, "wb") as f:
            f.write(img)
    _check_clean(paths, bytes(model))


def _torn_setup(tmp, level: int, n: int, seed: int):  # noqa: ANN202
    arr, paths = _make(tmp, "t", level, n, None, 1024)
    rnd = random.Random(seed)
    model = bytearray(rnd.randbytes(arr.size))
    arr.write(0, bytes(model))
    hot = CHUNK * rnd.randrange(8)        # a hot stripe row, dirty in the cache
    for _ in range(12):
        ln = rnd.choice([512, 4096, 2048])
        off = hot + rnd.randrange((2 * CHUNK - ln) // 512) * 512
        blob = rnd.randbytes(ln)
        arr.write(off, blob)
        model[off:off + ln] = blob
    budget = Budget()
    for m in arr.members:
        m.dev = TornDevice(m.dev, budget)
    return arr, paths, rnd, model, hot, budget


@pytest.mark.parametrize("level,n", [(5, 4), (6, 5)])
def test_torn_cached_write_then_member_loss(tmp_path, level, n):
    checked = 0
    for k in range(4):                # crash after k of the update's record writes
        for lost in range(n):
            arr, paths, rnd, model, hot, budget = _torn_setup(str(tmp_path), level, n,
                                                              k * 31 + lost)
            off, ln = hot + CHUNK - 1024, 3072
            new = rnd.randbytes(ln)
            budget.left = k
            arr.write(off, new)
            arr.abandon()
            arr = assemble([p for i, p in enumerate(paths) if i != lost], start_worker=False)
            got = arr.read(0, arr.size)
            arr.abandon()
            assert got[:off] == model[:off] and got[off + ln:] == model[off + ln:], \
                f"acknowledged data lost: k={k} lost={lost}"
            for s in range(0, ln, 512):
                assert got[off + s:off + s + 512] in (model[off + s:off + s + 512],
                                                      new[s:s + 512]), f"k={k} lost={lost}"
            checked += 1
    assert checked == 4 * n


@pytest.mark.parametrize("level,n", [(5, 4), (6, 5)])
def test_torn_destage_then_member_loss(tmp_path, level, n):
    """A crash half-way through writing dirty stripes home loses nothing acknowledged."""
    for k in range(0, 7, 2):
        lost = k % n
        arr, paths, _rnd, model, _hot, budget = _torn_setup(str(tmp_path), level, n, 100 + k)
        assert arr.status()["stripe_cache"]["dirty"] > 0
        budget.left = k
        arr.flush()                    # destage: only the first k member writes land
        arr.abandon()
        arr = assemble([p for i, p in enumerate(paths) if i != lost], start_worker=False)
        assert arr.read(0, arr.size) == bytes(model), f"k={k} lost={lost}"
        arr.abandon()


class CountingDevice:
    """Counts member reads and writes outside the journal area."""

    def __init__(self, dev, counts: dict[str, int], data_offset: int) -> None:  # noqa: ANN001
        self.dev, self.counts, self.data_offset = dev, counts, data_offset

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.dev, name)

    def read(self, offset: int, length: int) -> bytes:
        self.counts["reads"] += 1
        return self.dev.read(offset, length)

    def write(self, offset: int, data, fua: bool = False) -> None:  # noqa: ANN001
        kind = "home" if offset >= self.data_offset else \
            "journal" if offset >= jrnl.JOURNAL_START else "meta"   # superblock, bitmap
        self.counts[kind] += 1
        self.dev.write(offset, data, fua)


def _counted(arr) -> dict[str, int]:  # noqa: ANN001
    counts = {"reads": 0, "home": 0, "journal": 0, "meta": 0}
    for m in arr.members:
        m.dev = CountingDevice(m.dev, counts, m.data_offset)
    return counts


def test_hits_read_nothing_and_home_writes_wait_for_destage(tmp_path):
    arr, _paths = _make(str(tmp_path), "h", 5, 4, None, 1024)
    counts = _counted(arr)
    arr.write(4 * CHUNK + 8192, os.urandom(4096))         # a first miss: written as before
    assert counts["reads"] == 2 and counts["home"] == 2 and counts["journal"] == 2
    assert arr.status()["stripe_cache"]["bypassed"] == 1
    counts.update(reads=0, home=0, journal=0)
    arr.write(4 * CHUNK + 8192, os.urandom(4096))         # its second miss: now cached
    assert counts["reads"] == 2 and counts["home"] == 0 and counts["journal"] == 2
    for _ in range(5):
        counts.update(reads=0, journal=0)
        arr.write(4 * CHUNK + 8192 + 512, os.urandom(1024))   # hit, partial page
        assert counts["reads"] == 0 and counts["journal"] == 2 and counts["home"] == 0
    counts.update(reads=0)
    for i in range(48):            # a sequential run of 4 KiB writes over 5 stripes
        arr.write(8 * CHUNK + i * 4096, os.urandom(4096))
    # Per stripe: its first page is a first miss (2 reads, written home at once), the
    # rest of the chunk's rows are read ahead (3 reads), the next chunk's first row
    # missed before (3 reads) and everything else hits.  Without the cache: 2 reads
    # and 2 home writes per write (96 each).
    assert counts["reads"] <= 8 * 5, counts
    assert counts["home"] <= 2 * 5, counts
    counts.update(home=0)
    arr.flush()
    # Destage: each member's run of dirty pages in a stripe goes home in one write (at
    # most 3 data + P for each of the 6 stripes), not 2 writes per request (107).
    assert 0 < counts["home"] <= 4 * 6, counts
    arr.close()


def test_small_cache_evicts_and_stays_within_its_size(tmp_path):
    arr, paths = _make(str(tmp_path), "e", 6, 5, None, scm.MIN_STRIPE_CACHE_SIZE)
    rnd = random.Random(3)
    model = bytearray(arr.size)
    for _ in range(400):
        ln = rnd.choice([512, 4096, 6144])
        off = rnd.randrange((arr.size - ln) // 512) * 512
        blob = rnd.randbytes(ln)
        arr.write(off, blob)
        model[off:off + ln] = blob
        assert arr.status()["stripe_cache"]["cached"] <= scm.MIN_STRIPE_CACHE_SIZE
    st = arr.status()["stripe_cache"]
    assert st["evicted"] > 100 and st["destaged"] > 0
    assert arr.read(0, arr.size) == bytes(model)
    arr.stripe_cache_size = 0                               # off: everything home first
    assert arr.status()["stripe_cache"] is None
    arr.abandon()
    _check_clean(paths, bytes(model))


def test_without_journal_the_cache_writes_through(tmp_path):
    arr, paths = _make(str(tmp_path), "w", 5, 4, None, 1024, journal=False)
    counts = _counted(arr)
    rnd = random.Random(9)
    model = bytearray(arr.size)
    for _ in range(60):
        ln = rnd.choice([512, 4096])
        off = rnd.randrange(4) * CHUNK + rnd.randrange(CHUNK // 512 - 8) * 512
        blob = rnd.randbytes(ln)
        counts.update(home=0)
        arr.write(off, blob)
        model[off:off + ln] = blob
        assert counts["home"] == 2 and counts["journal"] == 0    # data page + parity page
        assert arr.status()["stripe_cache"]["dirty"] == 0
    arr.abandon()                      # a crash right after: every write is home
    arr = assemble(paths, start_worker=False, force=True)
    assert arr.read(0, arr.size) == bytes(model)
    arr.close()


def test_cache_size_is_recorded_and_checked(tmp_path):
    store = Store(str(tmp_path / "state"))
    try:
        svc = RaidService(store, start_workers=False)
        members = [str(tmp_path / f"m{i}") for i in range(3)]
        svc.create("vol", 5, members, chunk="16K", size=str(SIZE))
        assert svc.status("vol")[0]["stripe_cache"]["size"] == scm.DEFAULT_STRIPE_CACHE_SIZE
        assert svc.cache("vol", 64)["stripe_cache"]["size"] == 64
        with pytest.raises(ConfigError, match="32..32768"):
            svc.cache("vol", 5)
        svc.stop_all()
        svc = RaidService(store, start_workers=False)
        assert svc.status("vol")[0]["stripe_cache"]["size"] == 64   # applied at assembly
        assert svc.cache("vol", 0)["stripe_cache"] is None
        svc.create("mirror", 1, [str(tmp_path / f"r{i}") for i in range(2)], size=str(SIZE))
        with pytest.raises(ConfigError, match="no stripe cache"):
            svc.cache("mirror", 64)
        svc.stop_all()
    finally:
        store.close()


@pytest.mark.slow
def test_raid_lun_flushed_writes_survive_sigkill(tmp_path):
    """The demo's RAID-5 LUN, its stripes dirty in the cache: writes with FUA, or
    followed by an acknowledged SYNCHRONIZE CACHE, survive kill -9 of the daemon,
    and so does every other acknowledged write; the array then checks clean."""
    from tests.support import running
    from tests.test_integration_daemon import block, session, sync_cache

    directory = str(tmp_path / "demo")
    durable: dict[int, bytes] = {}
    with running(directory, 47010 + os.getpid() % 900, plain=False) as d:
        ini = session(d.port)
        pending: dict[int, bytes] = {}
        for i in range(400):
            lba = (i * 7919) % 4096 * 8            # 4 KiB-aligned, all over 16 MiB
            data = block(lba, i)
            fua = i % 5 == 0
            status, _d, _s = ini.write10(lba, data, fua=fua)
            assert status == 0
            (durable if fua else pending)[lba] = data
            if i % 16 == 15:
                assert sync_cache(ini) == 0
                durable.update(pending)
                pending.clear()
        for lba in pending:                        # newer unflushed data may replace it
            durable.pop(lba, None)
        d.kill()
        ini.close()
    with running(directory, 47010 + os.getpid() % 900, plain=False) as d:
        ini = session(d.port)
        for lba, data in sorted(durable.items()):
            status, got, _s = ini.read10(lba, 1)
            assert status == 0 and got == data, f"acknowledged LBA {lba} lost"
        ini.logout()
    members = sorted(str(p) for p in (tmp_path / "demo").glob("demo-disk*.img"))
    _check_clean(members, None)
