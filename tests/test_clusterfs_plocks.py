"""POSIX byte-range locks and flock of clusterfs on the DLM (no FUSE).

The range algebra (POSIX merge/split), the multiple-granularity mapping onto
DLM modes, and two real cluster nodes in one process: conflicts, F_GETLK,
a blocked F_SETLKW woken by the other node's unlock, flock, and a ping_pong
equivalent (lock i+1, read-increment-write byte i, unlock i) whose data
increment must be 2 on both nodes.
"""

from __future__ import annotations

import errno
import fcntl
import threading
import time

import pytest

from storaged.cluster.fencing import TestFencer
from storaged.clusterfs.cluster import LoopThread, dlm_locks, start_node, stop_node
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import mkfs
from storaged.clusterfs.plocks import GRANULES, INF, READ, WRITE, PosixLocks, apply, needed, sup
from storaged.dlm.api import SyncLockspace
from storaged.dlm.modes import COMPAT, Mode
from tests.test_cluster_nodes import config


def test_ranges_merge_split_and_convert_as_posix_says():
    r = apply([], 0, 10, WRITE)
    r = apply(r, 3, 5, None)                      # unlock the middle: split
    assert r == [(0, 3, WRITE), (5, 10, WRITE)]
    r = apply(r, 3, 5, WRITE)                     # lock it again: merged
    assert r == [(0, 10, WRITE)]
    r = apply(r, 4, 6, READ)                      # convert a part
    assert r == [(0, 4, WRITE), (4, 6, READ), (6, 10, WRITE)]
    assert apply(r, 0, INF, None) == []


def _conflict(a: list, b: list) -> bool:
    na, nb = needed(a), needed(b)
    return any(not COMPAT[na[k]][nb[k]] for k in set(na) & set(nb))


@pytest.mark.parametrize("a,b,want", [
    ([(3, 4, WRITE)], [(3, 4, WRITE)], True),
    ([(3, 4, WRITE)], [(4, 5, WRITE)], False),
    ([(3, 4, READ)], [(3, 4, READ)], False),
    ([(3, 4, WRITE)], [(0, INF, READ)], True),       # whole-file read vs a byte written
    ([(3, 4, READ)], [(0, INF, READ)], False),
    ([(0, INF, READ)], [(0, INF, WRITE)], True),
    ([(100, 200, WRITE)], [(0, INF, READ)], True),
    ([(100, 200, READ)], [(150, 160, READ)], False),
    ([(GRANULES + 5, GRANULES + 6, WRITE)], [(2, 3, WRITE)], False),
])
def test_overlapping_locks_meet_on_a_resource_in_conflicting_modes(a, b, want):
    assert _conflict(a, b) is want


def test_mode_join():
    assert sup(Mode.CW, Mode.PR) == Mode.PW
    assert sup(Mode.CR, Mode.EX) == Mode.EX and sup(Mode.NL, Mode.CR) == Mode.CR


@pytest.fixture
def two_nodes():
    lt = LoopThread()
    cfg = config(2)
    nodes = []
    mounts: list[ClusterFS] = []
    try:
        for n in cfg.nodes:
            nodes.append(start_node(lt, cfg, n, fencer=TestFencer(), wait=False))
        for node in nodes:
            lt.call(node.wait_ready(2, timeout=15))
        dev = MemoryBlockDevice(16 << 20)
        mkfs(dev, 2, rg_data=1024, journal_blocks=64)
        mounts = [ClusterFS(dev, dlm_locks(lt, node)).mount() for node in nodes]
        pls = [PosixLocks(SyncLockspace(node.lockspace("default"), lt.loop), mounts[0].tag)
               for node in nodes]
        yield mounts, pls
        for p in pls:
            p.drop_all()
    finally:
        for m in mounts:
            m.umount()
        for node in nodes:
            stop_node(lt, node)
        lt.stop()


def test_locks_exclude_across_nodes_and_an_unlock_wakes_a_waiter(two_nodes):
    (a, _b), (pa, pb) = two_nodes
    ino = a.create("/f", 0o644)
    pa.setlk(ino, 1, WRITE, 0, 10, wait=False)
    with pytest.raises(OSError) as e:
        pb.setlk(ino, 7, WRITE, 5, 6, wait=False)
    assert e.value.errno == errno.EAGAIN
    pb.setlk(ino, 7, WRITE, 10, 11, wait=False)          # next to it: free
    assert pb.getlk(ino, 7, READ, 0, INF) == (WRITE, 0, INF)
    assert pb.getlk(ino, 7, WRITE, 12, 13) is None
    pa.setlk(ino, 2, READ, 12, 13, wait=False)            # another owner on node 1
    assert pb.getlk(ino, 7, WRITE, 12, 13) == (READ, 12, 13)
    got = []
    waiter = threading.Thread(target=lambda: (pb.setlk(ino, 7, WRITE, 3, 4, wait=True),
                                              got.append(time.monotonic())))
    waiter.start()
    time.sleep(0.3)
    assert not got
    t0 = time.monotonic()
    pa.setlk(ino, 1, None, 0, INF, wait=False)            # owner 1 lets go of everything
    waiter.join(10)
    assert got and got[0] >= t0
    pa.flock(ino, 100, fcntl.LOCK_SH)
    pb.flock(ino, 200, fcntl.LOCK_SH | fcntl.LOCK_NB)     # shared: both
    with pytest.raises(BlockingIOError):
        pb.flock(ino, 200, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pa.flock(ino, 100, fcntl.LOCK_UN)
    pb.flock(ino, 200, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_ping_pong_data_increment_is_two_on_both_nodes(two_nodes):
    mounts, pls = two_nodes
    ino = mounts[0].create("/pp", 0o644)
    mounts[0].truncate("/pp", 4)
    incs: dict[int, list[int]] = {}
    start = threading.Barrier(2)

    def ping_pong(k: int) -> None:
        fs, pl, n, val, seen = mounts[k], pls[k], 3, [0] * 3, []
        start.wait(10)  # both ask for lock 0 at once: from then on they alternate
        pl.setlk(ino, 1, WRITE, 0, 1, wait=True)
        i = 0
        for _ in range(60):
            nxt = (i + 1) % n
            pl.setlk(ino, 1, WRITE, nxt, nxt + 1, wait=True)
            c = fs.read("/pp", 1, i)[0]
            seen.append((c - val[i]) % 256)
            val[i] = c
            fs.write("/pp", bytes([(c + 1) % 256]), i)
            pl.setlk(ino, 1, None, i, i + 1, wait=False)
            i = nxt
        pl.setlk(ino, 1, None, 0, INF, wait=False)
        incs[k] = seen

    threads = [threading.Thread(target=ping_pong, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(incs) == {0, 1}
    for k in (0, 1):  # once both run, each sees the other's increment every time
        assert incs[k][10:-10] == [2] * (len(incs[k]) - 20), incs[k]
