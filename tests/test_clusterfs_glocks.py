"""Glocks (cached DLM locks) of clusterfs: two real cluster nodes in one process.

What is proved here: a node keeps its locks and cached metadata between
operations (no DLM traffic for a repeated read), yet what one node writes the
other reads at once, every time; a blocking callback demotes the lock only
after the minimum hold time; an EX holder that changed nothing leaves the LVB
version alone so the other node's cache stays valid; and two nodes
ping-ponging one lock under contention lose no update.
"""

from __future__ import annotations

import threading
import time

import pytest

from storaged.cluster.fencing import TestFencer
from storaged.clusterfs.cluster import LoopThread, dlm_locks, start_node, stop_node
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import check, mkfs
from tests.test_cluster_nodes import config


class CountingDevice(MemoryBlockDevice):
    """A memory device that counts block reads (to see what the cache saved)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return super().read(offset, length)


def _cluster2(hold: float):
    lt = LoopThread()
    cfg = config(2)
    nodes = []
    mounts: list[ClusterFS] = []
    try:
        for n in cfg.nodes:
            nodes.append(start_node(lt, cfg, n, fencer=TestFencer(), wait=False))
        for node in nodes:
            lt.call(node.wait_ready(2, timeout=15))
        dev = CountingDevice(32 << 20)
        mkfs(dev, 2, rg_data=2048, journal_blocks=64)
        mounts = [ClusterFS(dev, dlm_locks(lt, node, hold=hold)).mount() for node in nodes]
        yield dev, mounts
    finally:
        for m in mounts:
            m.umount()
        for node in nodes:
            stop_node(lt, node)
        lt.stop()


@pytest.fixture
def cluster2():
    yield from _cluster2(0.005)


@pytest.fixture
def cluster2_slow_hold():
    yield from _cluster2(0.25)


def test_a_repeated_read_needs_no_dlm_request_and_no_device_read(cluster2):
    dev, (a, _b) = cluster2
    a.mkdir("/d", 0o755)
    a.create("/d/f", 0o644)
    a.write("/d/f", b"x" * 100, 0)
    a.getattr("/d/f")
    requests, reads = a.locks.stats["dlm_requests"], dev.reads
    for _ in range(20):
        assert a.getattr("/d/f")["st_size"] == 100
    assert a.locks.stats["dlm_requests"] == requests  # every glock was cached
    assert dev.reads == reads                          # every inode came from the cache
    assert a.cache is not None and a.cache.stats["hits"] >= 60


def test_what_a_writes_b_reads_at_once_repeatedly(cluster2):
    _dev, (a, b) = cluster2
    a.create("/f", 0o644)
    for i in range(40):
        w, r = (a, b) if i % 2 == 0 else (b, a)
        data = f"round {i} by {'ab'[i % 2]}".encode()
        w.write("/f", data, 0)
        w.truncate("/f", len(data))
        assert r.read("/f", 100, 0) == data
        assert r.getattr("/f")["st_size"] == len(data)
        w.setxattr("/f", "user.round", str(i).encode())
        assert r.getxattr("/f", "user.round") == str(i).encode()
        w.create(f"/n{i}", 0o600)
        assert f"n{i}" in {n for n, _, _ in r.readdir("/")}
    assert a.locks.stats["basts"] > 0 and b.locks.stats["basts"] > 0
    assert a.locks.stats["demotes"] > 0 and b.locks.stats["demotes"] > 0


def test_a_demote_waits_for_the_minimum_hold_time(cluster2_slow_hold):
    _dev, (a, b) = cluster2_slow_hold
    a.create("/f", 0o644)
    b.getattr("/f")  # b caches / and /f in PR; a now wants EX on /f again
    time.sleep(0.3)
    a.write("/f", b"held", 0)  # a granted EX on /f now: it keeps it >= 0.25 s
    t0 = time.monotonic()
    assert b.read("/f", 10, 0) == b"held"
    assert time.monotonic() - t0 >= 0.2


def test_an_unchanged_lock_keeps_the_other_nodes_cache_valid(cluster2):
    dev, (a, b) = cluster2
    a.mkdir("/d", 0o755)
    a.create("/d/f", 0o644)
    assert b.readdir("/d")[2][0] == "f"  # b caches /d's inode and bucket
    hits = b.locks.stats["lvb_hits"]
    with pytest.raises(FileExistsError):
        a.create("/d/f", 0o644)  # EX on /d (b is demoted to NL) but no change
    reads = dev.reads
    assert [n for n, _, _ in b.readdir("/d")] == [".", "..", "f"]
    assert b.locks.stats["lvb_hits"] > hits  # LVB version unchanged: cache kept
    assert dev.reads == reads                # ...so nothing was read again
    a.create("/d/g", 0o644)                  # a real change bumps the version
    assert [n for n, _, _ in b.readdir("/d")][2:] in (["f", "g"], ["g", "f"])


def test_lock_ping_pong_under_contention_loses_no_update(cluster2):
    dev, (a, b) = cluster2
    a.create("/shared", 0o644)
    a.write("/shared", bytes(200), 0)
    a.mkdir("/d", 0o755)
    errors: list[BaseException] = []

    def worker(k: int, fs: ClusterFS) -> None:
        try:
            for i in range(100):
                fs.write("/shared", bytes([65 + k]), k * 100 + i)  # one inode, both nodes
                if i % 10 == 0:
                    fs.create(f"/d/{k}-{i}", 0o644)              # one directory, both
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, fs)) for k, fs in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    want = b"A" * 100 + b"B" * 100
    assert a.read("/shared", 300, 0) == want and b.read("/shared", 300, 0) == want
    names = sorted(n for n, _, _ in b.readdir("/d"))[2:]
    assert names == sorted(f"{k}-{i}" for k in range(2) for i in range(0, 100, 10))
    assert a.locks.stats["demotes"] + b.locks.stats["demotes"] > 2
    a.umount()
    b.umount()
    rep = check(dev)
    assert rep.problems == [], rep.problems
    a.mount()
    b.mount()


def test_glocks_beyond_the_limit_are_forgotten_and_stay_correct(cluster2):
    _dev, (a, b) = cluster2
    b.locks.max_glocks = 6
    a.mkdir("/d", 0o755)
    for i in range(30):
        a.create(f"/d/f{i}", 0o644)
        a.write(f"/d/f{i}", str(i).encode(), 0)
    for i in range(30):
        assert b.read(f"/d/f{i}", 10, 0) == str(i).encode()
    deadline = time.monotonic() + 5
    while len(b.locks._glocks) > 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(b.locks._glocks) <= 6
    for i in range(30):  # a's writes after b forgot its locks are still seen
        a.write(f"/d/f{i}", b"x", 0)
        assert b.read(f"/d/f{i}", 10, 0)[:1] == b"x"
