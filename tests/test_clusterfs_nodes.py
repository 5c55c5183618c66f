"""clusterfs on the real DLM: several cluster nodes in one process on one shared image."""

from __future__ import annotations

import errno
import random
import threading

import pytest

from storaged.cluster.fencing import ManualFencer, TestFencer
from storaged.clusterfs.cluster import LoopThread, dlm_locks, start_node, stop_node
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.memdev import Crashed, MemoryBlockDevice
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


class NodeDevice:
    """One node's path to the shared image: dies (every I/O fails) after ``fail_after``."""

    def __init__(self, shared: MemoryBlockDevice) -> None:
        self.shared = shared
        self.block_size = shared.block_size
        self.read_only = False
        self.fail_after: int | None = None

    @property
    def size(self) -> int:
        return self.shared.size

    def _tick(self) -> None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise Crashed("node killed")
            self.fail_after -= 1

    def read(self, offset: int, length: int) -> bytes:
        return self.shared.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._tick()
        self.shared.write(offset, data, fua)

    def flush(self) -> None:
        self._tick()
        self.shared.flush()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_survivor_replays_a_dead_nodes_journal_only_after_fencing(seed):
    rng = random.Random(seed)
    lt = LoopThread()
    cfg = config(3)
    fencers = {n: ManualFencer() for n in cfg.nodes}
    nodes = [start_node(lt, cfg, n, fencer=fencers[n], wait=False) for n in cfg.nodes]
    try:
        for node in nodes:
            lt.call(node.wait_ready(3, timeout=15))
        shared = MemoryBlockDevice(64 << 20)
        mkfs(shared, 3, rg_data=2048, journal_blocks=64)
        a = ClusterFS(shared, dlm_locks(lt, nodes[0])).mount()
        b = ClusterFS(shared, dlm_locks(lt, nodes[1])).mount()
        cdev = NodeDevice(shared)
        c = ClusterFS(cdev, dlm_locks(lt, nodes[2])).mount()
        a.mkdir("/w", 0o755)
        done: dict[str, bytes] = {}
        cdev.fail_after = rng.randint(20, 300)
        with pytest.raises(OSError) as e:
            for i in range(200):  # node 3 works until its "kill"
                body = rng.randbytes(rng.randint(1, 9000))
                c.create(f"/w/c{i}", 0o644)
                c.write(f"/w/c{i}", body, 0)
                done[f"/w/c{i}"] = body
        assert e.value.errno == errno.EIO
        stop_node(lt, nodes[2], leave=False)  # its cluster node dies too
        # The survivor may replay only once the fencer confirmed: until then the
        # dead node's journal lock is not released.
        result: list = []
        t = threading.Thread(target=lambda: result.append(a.recover(c.slot)))
        t.start()
        t.join(1.5)
        assert t.is_alive() and not result
        nodes[0].fence_ack(3)
        t.join(20)
        assert result and result[0] >= 0
        for name, body in done.items():  # everything node 3 finished is there
            assert b.read(name, 1 << 20, 0) == body
        b.create("/w/after", 0o644)  # and the others carry on
        assert "after" in {n for n, _, _ in a.readdir("/w")}
        a.umount()
        b.umount()
        rep = check(shared)
        assert rep.problems == []  # the recovered slot is marked clean
    finally:
        for node in nodes[:2]:
            stop_node(lt, node)
        lt.stop()
