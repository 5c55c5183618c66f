"""Write-intent bitmap: md's on-disk format (checked with the real mdadm) and its use.

* ``mdadm --examine`` shows "Internal Bitmap" and ``mdadm -X`` (on a
  read-only loop device over the member file, since mdadm treats a regular
  file as an external bitmap file) decodes our bitmap: uuid, chunk, sync
  size and the number of dirty bits.
* After an unclean shutdown only dirty regions are resynced.
* A member re-added after a short absence recovers only the regions
  written while it was missing; one whose absence outlived a bitmap clear
  gets a full recovery.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from storaged.raid import assemble, create
from storaged.raid.bitmap import WriteIntentBitmap
from storaged.raid.manage import open_member
from tests.support import require_tool

FAST = 10**9
BCHUNK = 64 * 1024


def _fast(arr):  # noqa: ANN001, ANN202
    arr.speed_limit_min = arr.speed_limit_max = FAST
    return arr


def mdadm_x(path: str) -> dict[str, str]:
    """``mdadm -X`` on a read-only loop device over ``path``."""
    mdadm = require_tool("mdadm", "mdadm")
    losetup = require_tool("losetup", "mount")
    loop = subprocess.run([losetup, "-f", "--show", "-r", path], capture_output=True,
                          text=True, timeout=30)
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    try:
        out = subprocess.run([mdadm, "-X", dev], capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run([losetup, "-d", dev], timeout=30)
    assert out.returncode == 0, out.stderr
    fields = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:\s*(.*)$", line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def test_bitmap_codec_roundtrip() -> None:
    bm = WriteIntentBitmap(uuid=bytes(range(16)), sync_size=8192, chunksize=65536,
                           sectors_reserved=240, events=7, events_cleared=5)
    bm.bits = {0, 9, 63}
    raw = bm.encode()
    assert raw[:4] == b"bitm" and raw[4] == 4          # magic "bitm", version 4
    assert raw[256] == 0x01 and raw[257] == 0x02 and raw[263] == 0x80   # LE bit order
    back = WriteIntentBitmap.decode(raw)
    assert (back.bits, back.events, back.events_cleared, back.nbits) == ({0, 9, 63}, 7, 5, 64)


@pytest.mark.peer
@pytest.mark.parametrize("level,n", [(1, 2), (5, 4), (6, 4), (10, 4)])
def test_mdadm_sees_internal_bitmap(tmp_path, level: int, n: int) -> None:
    mdadm = require_tool("mdadm", "mdadm")
    paths = [str(tmp_path / f"d{i}") for i in range(n)]
    arr = create("bm", paths, level, chunk=64 * 1024, size=8 << 20, start_worker=False,
                 bitmap_chunk=BCHUNK)
    member_kib = arr.geo.member_bytes // 1024
    arr.write(0, os.urandom(4096))
    arr.write(arr.size - 8192, os.urandom(8192))
    dirty = len(arr.bitmap.bits)
    assert dirty >= 2
    f = mdadm_x(paths[0])
    assert f["Magic"] == "6d746962" and f["Version"] == "4"
    assert f["UUID"] == arr.uuid
    assert f["Chunksize"] == "64 KB"
    assert f["Sync Size"].split()[0] == str(member_kib)
    assert f["Bitmap"].startswith(f"{arr.bitmap.nbits} bits (chunks), {dirty} dirty")
    arr.close()                      # clean stop clears every bit
    for p in paths:
        f = mdadm_x(p)
        assert f["Bitmap"].startswith(f"{member_kib * 1024 // BCHUNK} bits (chunks), 0 dirty")
        assert int(f["Events Cleared"]) <= int(f["Events"])
        ex = subprocess.run([mdadm, "--examine", p], capture_output=True, text=True,
                            timeout=30)
        assert ex.returncode == 0, ex.stderr
        assert re.search(r"Internal Bitmap : 8 sectors from superblock", ex.stdout), ex.stdout
        assert "Feature Map : 0x1" in ex.stdout
        assert re.search(r"Checksum : \w+ - correct", ex.stdout)


@pytest.mark.parametrize("level,n", [(1, 2), (5, 4), (6, 5), (10, 4)])
def test_unclean_shutdown_resyncs_only_dirty_regions(tmp_path, level: int, n: int) -> None:
    paths = [str(tmp_path / f"d{i}") for i in range(n)]
    arr = _fast(create("bm", paths, level, chunk=16 * 1024, size=8 << 20, start_worker=False,
                       bitmap_chunk=BCHUNK))
    data = os.urandom(arr.size)
    arr.write(0, data)
    arr.settle_bitmap(force=True)
    assert not arr.bitmap.bits
    hot = os.urandom(12288)
    arr.write(300 * 1024, hot)
    data = data[:300 * 1024] + hot + data[300 * 1024 + len(hot):]
    dirty = set(arr.bitmap.bits)
    assert 1 <= len(dirty) <= 4
    arr.abandon()                                   # crash: array left dirty
    arr = _fast(assemble(paths, start_worker=False))
    assert arr.bitmap.bits >= dirty and "resync" in arr._want
    arr.run_pending()
    assert arr.last_sync["action"] == "resync" and arr.last_sync["by_bitmap"]
    assert arr.last_sync["bytes"] == len(arr.bitmap.bits) * BCHUNK < arr.geo.member_bytes
    assert arr.read(0, arr.size) == data
    arr.start_sync("check")
    arr.run_pending()
    assert arr.mismatch_cnt == 0
    arr.close()


@pytest.mark.parametrize("level,n", [(1, 2), (4, 3), (5, 4), (6, 5), (10, 4)])
def test_readd_recovers_only_dirty_regions(tmp_path, level: int, n: int) -> None:
    paths = [str(tmp_path / f"d{i}") for i in range(n)]
    arr = _fast(create("bm", paths, level, chunk=16 * 1024, size=8 << 20, start_worker=False,
                       bitmap_chunk=BCHUNK))
    data = bytearray(os.urandom(arr.size))
    arr.write(0, bytes(data))
    arr.settle_bitmap(force=True)
    victim = paths[1]
    arr.fail(victim)
    arr.run_pending()
    for off in (5000, arr.size // 2):                # written while the member is missing
        blob = os.urandom(6000)
        arr.write(off, blob)
        data[off:off + len(blob)] = blob
    assert arr.settle_bitmap(force=True) == 0        # degraded: bits stay set
    dirty = len(arr.bitmap.bits)
    arr.remove(victim)
    arr.add(open_member(victim), victim)
    st = arr.status()
    me = [m for m in st["members"] if m["path"] == victim][0]
    assert me["state"] == "recovering" and me["slot"] == 1
    arr.run_pending()
    assert arr.last_sync == {"action": "recover", "completed": True,
                             "bytes": dirty * BCHUNK, "by_bitmap": True}
    assert arr.degraded() == 0
    # The re-added member now carries its share: lose another one and read it all.
    arr.fail(paths[0])
    arr.run_pending()
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()


def test_readd_after_bitmap_cleared_is_full_recovery(tmp_path) -> None:
    paths = [str(tmp_path / f"d{i}") for i in range(5)]
    arr = _fast(create("bm", paths, 5, chunk=16 * 1024, spares=1, size=8 << 20,
                       start_worker=False, bitmap_chunk=BCHUNK))
    data = bytearray(os.urandom(arr.size))
    arr.write(0, bytes(data))
    arr.fail(paths[0])                 # the spare takes slot 0 (full recovery)
    arr.run_pending()
    assert arr.last_sync["by_bitmap"] is False
    arr.write(100, b"z" * 100)
    data[100:200] = b"z" * 100
    assert arr.settle_bitmap(force=True) > 0       # whole again: bits cleared, events_cleared up
    arr.fail(paths[1])
    arr.run_pending()
    arr.remove(paths[0])
    arr.add(open_member(paths[0]), paths[0])       # too old for the bitmap: a spare, full copy
    arr.run_pending()
    assert arr.last_sync["action"] == "recover" and not arr.last_sync["by_bitmap"]
    assert arr.last_sync["bytes"] == arr.geo.member_bytes
    arr.fail(paths[2])
    arr.run_pending()
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()


def test_worker_clears_bits_lazily_but_not_while_degraded(tmp_path) -> None:
    """With the background worker, bits clear after daemon_sleep, never while degraded."""
    import time

    paths = [str(tmp_path / f"d{i}") for i in range(4)]
    arr = create("bm", paths, 5, chunk=16 * 1024, size=8 << 20, bitmap_chunk=BCHUNK)
    try:
        arr.bitmap_clear_delay = 0.3
        arr.write(0, os.urandom(8192))
        assert arr.bitmap.bits
        deadline = time.monotonic() + 10
        while arr.bitmap.bits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not arr.bitmap.bits and arr.bitmap.events_cleared == arr.events
        arr.fail(paths[3])
        arr.write(65536, os.urandom(4096))      # array chunk 4 = member row 1: bit 0
        time.sleep(1.0)
        assert arr.bitmap.bits == {0}                # degraded: kept for a re-add
    finally:
        arr.close()
