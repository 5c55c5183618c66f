"""clusterfs grow and add-journal in memory: one process, several "nodes" on one device."""

from __future__ import annotations

import os
import random

import pytest

from storaged.clusterfs import resize
from storaged.clusterfs.format import JOURNAL_INDEX, FormatError, Geometry, read_geometry
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.locks import LocalLocks
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import check, mkfs
from tests.test_clusterfs_glocks import _cluster2


def enlarge(dev: MemoryBlockDevice, extra: int) -> None:
    """The LUN grew by ``extra`` bytes (zeros, as a grown image file reads)."""
    dev.data.extend(bytes(extra))
    dev.durable.extend(bytes(extra))


def small(size: int = 2 << 20, journals: int = 1) -> MemoryBlockDevice:
    dev = MemoryBlockDevice(size)
    mkfs(dev, journals, rg_data=100, journal_blocks=64)
    return dev


def test_grow_adds_groups_other_node_sees_space_and_check_is_clean():
    dev = small(journals=2)
    locks = LocalLocks()
    a = ClusterFS(dev, locks).mount()
    b = ClusterFS(dev, locks).mount()
    before = b.statfs()
    assert before["f_blocks"] == 512
    with pytest.raises(resize.ResizeError, match="nothing to grow"):
        resize.grow(a)
    enlarge(dev, 3 << 20)
    r = resize.grow(a)
    assert (r.old_blocks, r.new_blocks) == (512, 1280) and r.new_groups > r.old_groups
    after = b.statfs()  # the other node, mounted before the grow
    assert after["f_blocks"] == 1280
    assert after["f_bfree"] - before["f_bfree"] == r.added_free > 700
    # b fills more than the old free space: its allocations land in the new groups
    data = os.urandom(3 << 20)
    b.create("/big", 0o644)
    b.write("/big", data, 0)
    assert a.read("/big", len(data), 0) == data  # a reads blocks past the old end
    with pytest.raises(resize.ResizeError, match="nothing to grow"):
        resize.grow(b)
    a.umount()
    b.umount()
    rep = check(dev)
    assert rep.problems == [], rep.problems
    c = ClusterFS(dev, LocalLocks()).mount()
    assert c.read("/big", len(data), 0) == data
    c.umount()


def test_grow_extends_a_short_last_group_without_waste():
    dev = small()
    fs = ClusterFS(dev, LocalLocks()).mount()
    g = fs.geo
    last = g.rg_count - 1
    short = g.rg_data_blocks(last)
    assert short < g.rg_data  # mkfs left the last group short
    enlarge(dev, 4096 * (g.rg_data - short))  # exactly enough to fill it
    r = resize.grow(fs)
    assert r.new_groups == r.old_groups and r.added_free == g.rg_data - short
    assert fs.statfs()["f_blocks"] == r.new_blocks
    fs.umount()
    assert check(dev).problems == []


def test_grow_with_cached_glocks_on_two_cluster_nodes():
    gen = _cluster2(0.005)
    dev, (a, b) = next(gen)
    try:
        b.create("/f", 0o644)
        b.write("/f", b"x" * 8192, 0)  # b caches resource-group headers under glocks
        free0 = b.statfs()["f_bfree"]
        enlarge(dev, 16 << 20)
        r = resize.grow(a)
        assert r.added_free == 4096 - 2 * 2  # two new groups, each header + bitmap
        assert b.statfs()["f_bfree"] == free0 + r.added_free
        payload = os.urandom(20 << 20)  # more than the old free space
        b.write("/f", payload, 8192)
        assert a.read("/f", 1 << 20, 8192 + (19 << 20)) == payload[19 << 20:]
    finally:
        gen.close()
    assert check(dev).problems == []


def test_a_crash_during_grow_leaves_a_consistent_filesystem():
    for fail_after in range(0, 12):
        dev = small()
        fs = ClusterFS(dev, LocalLocks()).mount()
        fs.create("/keep", 0o644)
        fs.write("/keep", b"kept", 0)
        fs.umount()
        fs = ClusterFS(dev, LocalLocks()).mount()
        enlarge(dev, 1 << 20)
        dev.fail_after = fail_after
        try:
            resize.grow(fs)
        except Exception:  # noqa: BLE001 - the simulated crash, at any write
            pass
        img = dev.crash_image(random.Random(fail_after))
        again = ClusterFS(img, LocalLocks()).mount()  # replays slot 0 like a restart
        assert again.statfs()["f_blocks"] in (512, 768)  # the old size or the new one
        try:
            resize.grow(again)  # a second run finishes what the crash interrupted
        except resize.ResizeError:
            pass
        assert again.read("/keep", 4, 0) == b"kept"
        assert again.statfs()["f_blocks"] == 768
        again.umount()
        assert check(img).problems == [], fail_after


def test_add_journal_lets_more_nodes_mount_and_check_stays_clean():
    dev = small(4 << 20)
    locks = LocalLocks()
    a = ClusterFS(dev, locks).mount()
    with pytest.raises(OSError, match="add-journal"):
        ClusterFS(dev, locks).mount()
    free = a.statfs()["f_bfree"]
    assert resize.add_journals(a, 2) == [1, 2]
    assert a.statfs()["f_bfree"] == free - 2 * 64
    geo = read_geometry(dev)
    assert geo.journals == 3 and len(geo.extra_journals) == 2
    b = ClusterFS(dev, locks).mount()
    c = ClusterFS(dev, locks).mount()
    assert (b.slot, c.slot) == (1, 2)
    b.create("/from-b", 0o644)
    b.write("/from-b", b"journaled in an added slot", 0)
    assert c.read("/from-b", 100, 0) == b"journaled in an added slot"
    for m in (a, b, c):
        m.umount()
    rep = check(dev)
    assert rep.problems == [] and rep.used_blocks >= 2 * 64


def test_add_journal_refuses_without_space_and_changes_nothing():
    dev = small(1 << 20)  # 256 blocks: two groups of 100 and 89 data blocks
    fs = ClusterFS(dev, LocalLocks()).mount()
    fs.create("/fill", 0o644)
    fs.write("/fill", os.urandom(4096 * 150), 0)
    assert fs.statfs()["f_bfree"] < 64
    block0 = dev.read(0, 4096)
    with pytest.raises(resize.ResizeError, match="no space"):
        resize.add_journals(fs, 1)
    assert dev.read(0, 4096) == block0
    with pytest.raises(resize.ResizeError, match="at least 1"):
        resize.add_journals(fs, 0)
    fs.umount()
    assert check(dev).problems == []


def test_journal_index_golden_bytes():
    raw = JOURNAL_INDEX.pack({"count": 1, "starts": (4242).to_bytes(8, "little")})
    assert raw[:8] == b"SDJX\x01\x00\x00\x00" and raw[8:16] == (4242).to_bytes(8, "little")
    assert JOURNAL_INDEX.size == 252 and raw[16:248] == bytes(232)
    assert raw[248:].hex() == "52fd2635"  # CRC32C of bytes 0..247
    geo = Geometry({"block_size": 4096, "total_blocks": 1, "journals": 2,
                    "journal_blocks": 64, "journal_start": 1, "rg_start": 129, "rg_count": 1,
                    "rg_data": 1, "root_ino": 131, "uuid": b""}, (4242,))
    assert [geo.journal_block(s) for s in range(geo.journals)] == [1, 65, 4242]


def test_a_corrupt_journal_index_is_a_format_error_not_a_crash():
    dev = small(4 << 20)
    fs = ClusterFS(dev, LocalLocks()).mount()
    resize.add_journals(fs, 1)
    fs.umount()
    raw = bytearray(dev.read(0, 4096))
    raw[264:272] = (1 << 40).to_bytes(8, "little")  # a start past the end, CRC redone
    raw[256:508] = JOURNAL_INDEX.pack({"count": 1, "starts": bytes(raw[264:272])})
    dev.write(0, bytes(raw))
    with pytest.raises(FormatError, match="outside the data area"):
        ClusterFS(dev, LocalLocks())
    assert any("outside the data area" in p for p in check(dev).problems)
    raw[300] ^= 0xFF  # and a flipped byte fails the CRC
    dev.write(0, bytes(raw))
    assert any("checksum" in p for p in check(dev).problems)
