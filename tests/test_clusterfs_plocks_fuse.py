"""Cluster-wide fcntl and flock locks on two real FUSE mounts of one image (two nodes).

ctdb's ping_pong runs on both mounts at once: lock coherence (the lock rate
of two contending nodes) and ``-rw`` data coherence (``data increment = 2``
on both, i.e. every increment of the other node was seen).  Then fcntl and
flock semantics across the nodes, and ``-o localflocks`` (node-local locks).
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.test_clusterfs_fuse import ROOT, env, mount_pids, need_fuse, storaged, teardown_mounts

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(150)]
__all__ = ["env"]  # the fixture, re-exported for this module's tests


def cfs_ports() -> list[int]:
    """Two ports free on 127.0.0.1 and 127.0.0.2 inside this task's range 43000-43999."""
    for _ in range(100):
        base = random.randrange(43000, 43998)
        ok = True
        for i, p in enumerate((base, base + 1)):
            with socket.socket() as s:
                try:
                    s.bind((f"127.0.0.{i + 1}", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return [base, base + 1]
    raise RuntimeError("no free ports in 43000-43999")


def need_ping_pong() -> str:
    path = shutil.which("ping_pong")
    if path is None:
        pytest.fail("ping_pong is missing: install the Debian package ctdb")
    return path


def _two_mounts(tmp_path, env, options: str = ""):
    need_fuse()
    img = str(tmp_path / "img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    storaged("fs", "mkfs", img, "--journals", "2", env=env)
    ports = cfs_ports()
    mnts: list[str] = []
    pids: list[int] = []
    try:
        procs = []
        for i in (1, 2):
            d = tmp_path / f"node{i}"
            d.mkdir()
            storaged("--dir", str(d), "cluster", "init", "shared",
                     "--node", f"1=127.0.0.1:{ports[0]}", "--node", f"2=127.0.0.2:{ports[1]}",
                     "--id", str(i), "--two-node", "--token-ms", "300", "--fencer", "test",
                     env=env)
            mnt = str(tmp_path / f"mnt{i}")
            os.mkdir(mnt)
            mnts.append(mnt)
        for i, mnt in enumerate(mnts, 1):
            extra = ["-o", options] if options else []
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "storaged", "fs", "mount", img, mnt, "--cluster",
                 str(tmp_path / f"node{i}"), *extra], env=env, cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, out + err
        pids = mount_pids(env)
        yield img, mnts
    finally:
        pids = mount_pids(env) or pids
        teardown_mounts(mnts, env, pids)


@pytest.fixture
def two_mounts(tmp_path, env):
    yield from _two_mounts(tmp_path, env)


@pytest.fixture
def two_mounts_localflocks(tmp_path, env):
    yield from _two_mounts(tmp_path, env, "localflocks")


def run_ping_pong(files: list[str], seconds: float, rw: bool) -> list[str]:
    """ping_pong on each file at once (3 locks: nodes + 1); the output of each."""
    exe = need_ping_pong()
    args = ["-rw"] if rw else []
    procs = [subprocess.Popen([exe, *args, f, "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for f in files]
    try:
        time.sleep(seconds)
    finally:
        for p in procs:
            p.terminate()
    return [p.communicate(timeout=20)[0].decode(errors="replace") for p in procs]


def rates(out: str) -> list[int]:
    return [int(x) for x in re.findall(r"(\d+) locks/sec", out)]


def test_ping_pong_locks_and_data_coherent_across_two_mounts(two_mounts):
    _img, (m1, m2) = two_mounts
    f1, f2 = os.path.join(m1, "pp"), os.path.join(m2, "pp")
    open(f1, "wb").close()
    outs = run_ping_pong([f1, f2], 6, rw=False)
    for out in outs:
        assert rates(out) and max(rates(out)) > 0, out
    outs = run_ping_pong([f1, f2], 8, rw=True)
    for out in outs:
        incs = re.findall(r"data increment = (\d+)", out)
        # ping_pong prints the increment when it changes: 1 while it runs alone at
        # the start, then 2 (it saw the other node's increment every time) to the end
        assert incs and incs[-1] == "2", out
        assert rates(out), out


LOCKER = r"""
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)          # bytes 0..9
fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()                           # hold until told
fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
print("unlocked", flush=True)
sys.stdin.readline()
"""


def test_fcntl_and_flock_exclude_across_nodes_and_wake_waiters(two_mounts):
    _img, (m1, m2) = two_mounts
    with open(os.path.join(m1, "lk"), "wb") as f:
        f.write(bytes(100))
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, os.path.join(m1, "lk")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fd = os.open(os.path.join(m2, "lk"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)    # inside 0..9
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 0, 0)    # whole file
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 10)       # 10..14: free
            fcntl.lockf(fd, fcntl.LOCK_UN, 5, 10)
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 3, 1, 0)
            got = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            assert got[0] == fcntl.F_WRLCK                               # held on node 1
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            # a blocking lock on node 2 waits until node 1 unlocks
            t0 = time.monotonic()
            waiter = subprocess.Popen(
                [sys.executable, "-c", "import fcntl,os,sys,time\n"
                 "fd=os.open(sys.argv[1],os.O_RDWR)\n"
                 "fcntl.lockf(fd,fcntl.LOCK_EX,1,3)\nprint(time.monotonic(),flush=True)",
                 os.path.join(m2, "lk")], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            assert waiter.poll() is None  # still waiting
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "unlocked"
            assert waiter.wait(20) == 0
            assert float(waiter.stdout.read()) - t0 >= 0.9
        finally:
            os.close(fd)
    finally:
        holder.kill()  # its death closes the files: the flock must go with it
        holder.wait()
    fd = os.open(os.path.join(m2, "lk"), os.O_RDWR)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "flock of a dead process stayed"
                time.sleep(0.1)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)  # the whole file: all free
    finally:
        os.close(fd)


def test_localflocks_keeps_locks_on_each_node(two_mounts_localflocks):
    _img, (m1, m2) = two_mounts_localflocks
    open(os.path.join(m1, "lk"), "wb").close()
    a = os.open(os.path.join(m1, "lk"), os.O_RDWR)
    b = os.open(os.path.join(m2, "lk"), os.O_RDWR)
    try:
        fcntl.lockf(a, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
        fcntl.lockf(b, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)  # node-local: no conflict
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        c = os.open(os.path.join(m1, "lk"), os.O_RDWR)  # but on one node they exclude
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(c)
    finally:
        os.close(a)
        os.close(b)


def test_bad_lock_mount_options_name_the_problem(tmp_path, env):
    img = tmp_path / "img"
    img.write_bytes(b"")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for opt in ("hold_ms=abc", "hold_ms=-1", "hold_ms"):
        r = storaged("fs", "mount", str(img), str(mnt), "-o", f"local,{opt}", env=env,
                     check=False)
        assert r.returncode == 1 and "minimum lock hold time" in r.stderr, r.stderr
    r = storaged("fs", "mount", str(img), str(mnt), "-o", "local,flocks", env=env, check=False)
    assert r.returncode == 1 and "unknown mount option(s): flocks" in r.stderr, r.stderr
