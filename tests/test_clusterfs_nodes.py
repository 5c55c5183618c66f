"""clusterfs on the real DLM: several cluster nodes in one process on one shared image."""

from __future__ import annotations

import errno
import random
import threading

import pytest

from storaged.cluster.fencing import TestFencer
from storaged.clusterfs.cluster import LoopThread, dlm_locks, start_node, stop_node
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import check, mkfs
from tests.test_cluster_nodes import config


@pytest.fixture
def cluster3():
    """Three cluster nodes on 127.0.0.x, each mounting one shared in-memory image."""
    lt = LoopThread()
    cfg = config(3)
    nodes = []
    try:
        for n in cfg.nodes:
            nodes.append(start_node(lt, cfg, n, fencer=TestFencer(), wait=False))
        for node in nodes:
            lt.call(node.wait_ready(3, timeout=15))
        dev = MemoryBlockDevice(64 << 20)
        mkfs(dev, 3, rg_data=2048, journal_blocks=64)
        mounts = [ClusterFS(dev, dlm_locks(lt, node)).mount() for node in nodes]
        yield dev, mounts
        for m in mounts:
            m.umount()
    finally:
        for node in nodes:
            stop_node(lt, node)
        lt.stop()


@pytest.mark.slow
def test_what_one_node_writes_the_others_read(cluster3):
    dev, (a, b, c) = cluster3
    assert sorted(m.slot for m in (a, b, c)) == [0, 1, 2]
    a.mkdir("/shared", 0o755)
    a.create("/shared/f", 0o644)
    a.write("/shared/f", b"from a", 0)
    assert b.read("/shared/f", 100, 0) == b"from a"
    b.write("/shared/f", b"B", 0)
    c.chmod("/shared/f", 0o600)
    c.chown("/shared/f", 1000, 1000)
    assert a.read("/shared/f", 100, 0) == b"Brom a"
    sa, sb = a.getattr("/shared/f"), b.getattr("/shared/f")
    assert sa == sb and sa["st_mode"] & 0o777 == 0o600 and sa["st_uid"] == 1000
    c.rename("/shared/f", "/g")
    assert [n for n, _, _ in a.readdir("/shared")] == [".", ".."]
    assert sorted(n for n, _, _ in b.readdir("/")) == [".", "..", "g", "shared"]
    with pytest.raises(OSError) as e:
        b.getattr("/shared/f")
    assert e.value.errno == errno.ENOENT
    a.setxattr("/g", "user.who", b"a")
    assert c.getxattr("/g", "user.who") == b"a"


@pytest.mark.slow
def test_concurrent_operations_from_three_nodes_stay_consistent(cluster3):
    dev, mounts = cluster3
    mounts[0].mkdir("/d", 0o755)
    mounts[0].create("/counter", 0o644)
    mounts[0].write("/counter", b"0" * 8, 0)
    errors: list = []

    def worker(k: int, fs: ClusterFS) -> None:
        rng = random.Random(k)
        try:
            for i in range(25):
                name = f"/d/n{k}-{i}"
                fs.create(name, 0o644)
                fs.write(name, f"{k}:{i}".encode(), 0)
                if rng.random() < 0.3:
                    fs.rename(name, name + "-r")
                # every node writes its own bytes of one shared file
                fs.write("/counter", bytes([65 + k]), 8 + k * 25 + i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, fs))
               for k, fs in enumerate(mounts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    names = {n for n, _, _ in mounts[1].readdir("/d")} - {".", ".."}
    assert len(names) == 75
    for n in names:
        k, i = n[1:].split("-")[:2]
        assert mounts[2].read(f"/d/{n}", 100, 0) == f"{k}:{i}".encode()
    assert mounts[0].getattr("/d")["st_nlink"] == 2
    assert mounts[1].read("/counter", 100, 0) == b"0" * 8 + b"A" * 25 + b"B" * 25 + b"C" * 25
    for m in mounts:
        m.umount()
    rep = check(dev)
    assert rep.problems == [], rep.problems
    for m in mounts:  # the fixture unmounts again: remount so that is harmless
        m.mount()
