"""clusterfs through real FUSE mounts: POSIX behaviour and two cluster nodes on one image."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.test_cluster_safety import free_ports

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(150)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def storaged(*args: str, env: dict, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "storaged", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"storaged {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def need_fuse() -> None:
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: install the Debian package fuse3")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing (load the fuse module)")


def mount_pids(env: dict) -> list[int]:
    """PIDs of the mount processes the status sockets of this test's run dir name."""
    r = subprocess.run([sys.executable, "-m", "storaged", "fs", "status", "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    try:
        return [m["pid"] for m in json.loads(r.stdout)]
    except ValueError:
        return []


def teardown_mount(mnt: str, env: dict, pids: list[int]) -> None:
    """Unmount whatever is at ``mnt`` and stop its process, whatever state it is in."""
    if os.path.ismount(mnt):
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


def mounted(mnt: str) -> bool:
    """Whether ``mnt`` is in the mount table (also a dead FUSE mount, which
    os.path.ismount misses: its stat fails with ENOTCONN)."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f)


def teardown_mounts(mnts: list[str], env: dict, pids: list[int]) -> None:
    """Unmount every one of ``mnts`` first, then wait for (or kill) the processes:
    waiting for all of them after the first unmount would kill the others."""
    for mnt in mnts:
        if mounted(mnt):
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    for mnt in mnts:
        teardown_mount(mnt, env, pids)
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, STORAGED_FS_RUNDIR=str(tmp_path / "run"))
    os.makedirs(e["STORAGED_FS_RUNDIR"])
    yield e


@pytest.fixture
def local_mount(tmp_path, env):
    need_fuse()
    img, mnt = str(tmp_path / "img"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    os.chmod(tmp_path, 0o755)
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    storaged("fs", "mkfs", img, "--journals", "2", env=env)
    try:
        storaged("fs", "mount", img, mnt, "-o", "local", env=env)
        pids = mount_pids(env)
        yield img, mnt
    finally:
        teardown_mount(mnt, env, pids)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def test_posix_operations_and_errnos_on_a_mount(local_mount, env):
    img, mnt = local_mount
    p = lambda *a: os.path.join(mnt, *a)  # noqa: E731
    os.mkdir(p("d"))
    with open(p("d", "f"), "wb") as f:
        f.write(b"hello world")
    assert open(p("d", "f"), "rb").read() == b"hello world"
    assert errno_of(os.mkdir, p("d")) == errno.EEXIST
    assert errno_of(os.open, p("d", "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.stat, p("nope")) == errno.ENOENT
    assert errno_of(os.rmdir, p("d")) == errno.ENOTEMPTY
    assert errno_of(os.unlink, p("d")) == errno.EISDIR
    assert errno_of(os.open, p("d"), os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.listdir, p("d", "f")) == errno.ENOTDIR
    assert errno_of(os.mkdir, p("d", "f", "x")) == errno.ENOTDIR
    assert errno_of(os.open, p("x" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    # rename across directories, hard links, symlinks
    os.mkdir(p("e"))
    os.rename(p("d", "f"), p("e", "g"))
    assert sorted(os.listdir(p("d"))) == [] and os.listdir(p("e")) == ["g"]
    os.link(p("e", "g"), p("d", "h"))
    assert os.stat(p("e", "g")).st_nlink == 2
    assert os.stat(p("e", "g")).st_ino == os.stat(p("d", "h")).st_ino
    os.symlink("../e/g", p("d", "s"))
    assert os.readlink(p("d", "s")) == "../e/g"
    assert open(p("d", "s"), "rb").read() == b"hello world"
    os.rename(p("d"), p("e", "d"))
    assert os.stat(p("e")).st_nlink == 3
    # truncate, sparse files
    with open(p("sparse"), "wb") as f:
        f.seek(50 << 20)
        f.write(b"end")
    st = os.stat(p("sparse"))
    assert st.st_size == (50 << 20) + 3 and st.st_blocks * 512 < 1 << 20
    with open(p("sparse"), "rb") as f:
        f.seek(10 << 20)
        assert f.read(4) == bytes(4)
    os.truncate(p("e", "g"), 5)
    assert open(p("e", "g"), "rb").read() == b"hello"
    os.truncate(p("e", "g"), 8)
    assert open(p("e", "g"), "rb").read() == b"hello\0\0\0"
    # attributes
    os.chmod(p("e", "g"), 0o640)
    os.chown(p("e", "g"), 1234, 4321)
    os.utime(p("e", "g"), ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(p("e", "g"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 4321)
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    assert st.st_atime_ns == 1_500_000_000_123_456_789
    os.setxattr(p("e", "g"), "user.color", b"blue")
    assert os.getxattr(p("e", "g"), "user.color") == b"blue"
    assert os.listxattr(p("e", "g")) == ["user.color"]
    assert errno_of(os.getxattr, p("e", "g"), "user.none") == errno.ENODATA
    os.removexattr(p("e", "g"), "user.color")
    vfs = os.statvfs(mnt)
    assert vfs.f_bsize == 4096 and 0 < vfs.f_bfree < vfs.f_blocks and vfs.f_namemax == 255
    # EACCES for a non-root user (the kernel checks the modes: default_permissions)
    os.chmod(p("e"), 0o755)
    probe = ("import os, sys\n"
             "for path, mode in ((sys.argv[1], 'w'), (sys.argv[2], 'rb')):\n"
             "    try:\n        open(path, mode)\n        print('ok')\n"
             "    except OSError as e:\n        print(e.errno)\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", probe, p("e", "new"), p("e", "g")],
                       capture_output=True, text=True)
    # creating in a root 0755 directory, and reading a root 0640 file, as nobody
    assert r.stdout.split() == [str(errno.EACCES)] * 2, r.stdout + r.stderr
    # status shows the mount with its PID and journal slot
    st = storaged("fs", "status", "--json", env=env).stdout
    assert '"slot": 0' in st and '"mode": "local"' in st
    r = storaged("fs", "check", img, env=env, check=False)
    assert r.returncode == 1 and "is mounted on" in r.stderr
    storaged("fs", "umount", mnt, env=env)
    r = storaged("fs", "check", img, env=env)
    assert "0 problem(s)" in r.stdout


def test_cli_errors_name_the_problem(tmp_path, env):
    img = str(tmp_path / "img")
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    storaged("fs", "mkfs", img, "-j", "1", env=env)
    r = storaged("fs", "mkfs", img, "-j", "1", env=env, check=False)
    assert r.returncode == 1 and "already holds a clusterfs filesystem" in r.stderr
    assert r.stderr.startswith("storaged: error:")
    storaged("fs", "mkfs", img, "-j", "1", "--force", env=env)
    os.mkdir(tmp_path / "m")
    r = storaged("fs", "mount", img, str(tmp_path / "m"), env=env, check=False)
    assert r.returncode == 1 and "--cluster DIR" in r.stderr
    r = storaged("fs", "mount", img, str(tmp_path / "m"), "-o", "local,bogus", env=env,
                 check=False)
    assert r.returncode == 1 and "unknown mount option(s): bogus" in r.stderr
    r = storaged("fs", "umount", str(tmp_path / "m"), env=env, check=False)
    assert r.returncode == 1 and "no clusterfs mount here" in r.stderr


@pytest.fixture
def two_nodes(tmp_path, env):
    """Two cluster nodes (two mount processes) on 127.0.0.1/2 mounting one image file."""
    need_fuse()
    img = str(tmp_path / "img")
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    storaged("fs", "mkfs", img, "--journals", "2", env=env)
    ports = free_ports(2)
    mnts = []
    procs = []
    try:
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
        for i, mnt in enumerate(mnts, 1):  # both at once: the first waits for quorum
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "storaged", "fs", "mount", img, mnt, "--cluster",
                 str(tmp_path / f"node{i}")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, out + err
        pids = mount_pids(env)
        yield img, mnts
    finally:
        pids = mount_pids(env) or locals().get("pids", [])
        teardown_mounts(mnts, env, pids)


def test_two_nodes_see_each_others_writes(two_nodes, env):
    img, (m1, m2) = two_nodes
    os.mkdir(os.path.join(m1, "dir"))
    with open(os.path.join(m1, "dir", "f"), "wb") as f:
        f.write(b"written on node 1")
    assert open(os.path.join(m2, "dir", "f"), "rb").read() == b"written on node 1"
    with open(os.path.join(m2, "dir", "f"), "r+b") as f:  # overwrite in place on node 2
        f.write(b"WRITTEN")
    assert open(os.path.join(m1, "dir", "f"), "rb").read() == b"WRITTEN on node 1"
    for i in range(50):
        open(os.path.join(m2, "dir", f"n{i}"), "wb").close()
    assert len(os.listdir(os.path.join(m1, "dir"))) == 51
    os.chmod(os.path.join(m1, "dir", "n7"), 0o600)
    os.utime(os.path.join(m1, "dir", "n7"), ns=(10**18, 2 * 10**18))
    s1, s2 = os.stat(os.path.join(m1, "dir", "n7")), os.stat(os.path.join(m2, "dir", "n7"))
    assert stat.S_IMODE(s2.st_mode) == 0o600 and s2.st_mtime_ns == 2 * 10**18
    assert (s1.st_ino, s1.st_size, s1.st_mtime_ns) == (s2.st_ino, s2.st_size, s2.st_mtime_ns)
    os.rename(os.path.join(m2, "dir", "n7"), os.path.join(m2, "moved"))
    assert "moved" in os.listdir(m1) and not os.path.exists(os.path.join(m1, "dir", "n7"))
    os.unlink(os.path.join(m1, "moved"))
    assert not os.path.exists(os.path.join(m2, "moved"))
    # concurrent writers on both nodes in one directory
    script = ("import os,sys\nfor i in range(40):\n"
              " p=os.path.join(sys.argv[1],'dir',f'c{sys.argv[2]}-{i}')\n"
              " open(p,'wb').write(sys.argv[2].encode()*100)\n")
    ws = [subprocess.Popen([sys.executable, "-c", script, m, str(k)])
          for k, m in ((1, m1), (2, m2))]
    for w in ws:
        assert w.wait(120) == 0
    names = os.listdir(os.path.join(m2, "dir"))
    assert len(names) == 50 + 80
    assert open(os.path.join(m1, "dir", "c2-39"), "rb").read() == b"2" * 100
    st = storaged("fs", "status", "--json", env=env).stdout
    assert '"slot": 0' in st and '"slot": 1' in st and "cluster shared node" in st
    for m in (m1, m2):
        storaged("fs", "umount", m, env=env)
    r = storaged("fs", "check", img, env=env)
    assert "0 problem(s)" in r.stdout, r.stdout


def test_touch_sets_now_and_listing_has_inode_numbers(local_mount):
    img, mnt = local_mount
    os.mkdir(os.path.join(mnt, "d"))
    before = time.time_ns()
    subprocess.run(["touch", os.path.join(mnt, "d", "t")], check=True)
    st = os.stat(os.path.join(mnt, "d", "t"))
    assert st.st_mtime_ns >= before - 10**9
    os.utime(os.path.join(mnt, "d", "t"), ns=(5 * 10**17, st.st_mtime_ns))
    subprocess.run(["touch", "-a", os.path.join(mnt, "d", "t")], check=True)  # mtime omitted
    st2 = os.stat(os.path.join(mnt, "d", "t"))
    assert st2.st_mtime_ns == st.st_mtime_ns and st2.st_atime_ns >= before - 10**9
    ents = {e.name: e.inode() for e in os.scandir(os.path.join(mnt, "d"))}
    assert ents == {"t": st.st_ino}


def test_sigkill_of_a_node_survivor_replays_and_fsynced_writes_survive(two_nodes, env):
    img, (m1, m2) = two_nodes
    info = json.loads(storaged("fs", "status", "--json", env=env).stdout)
    victim = next(m["pid"] for m in info if m["mountpoint"] == os.path.realpath(m2))
    os.mkdir(os.path.join(m2, "w"))
    writer = ("import os,sys\ni=0\nwhile True:\n"
              " p=os.path.join(sys.argv[1],'w',f'f{i}')\n"
              " fd=os.open(p,os.O_CREAT|os.O_WRONLY,0o644)\n"
              " os.write(fd,(str(i)*997).encode()[:997*len(str(i))])\n"
              " os.fsync(fd)\n os.close(fd)\n print(p,flush=True)\n i+=1\n")
    w = subprocess.Popen([sys.executable, "-c", writer, m2], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    synced = []
    try:
        while len(synced) < 30:
            line = w.stdout.readline()
            assert line, "writer stopped early"
            synced.append(os.path.basename(line.strip()))
        os.kill(victim, signal.SIGKILL)  # the node's cluster node and mount die together
        t0 = time.monotonic()
    finally:
        w.kill()
        rest = w.communicate()[0]
    synced += [os.path.basename(x) for x in rest.split()]
    # the survivor carries on: its next change waits at most for failure detection,
    # fencing (the test fencer confirms at once) and replay
    open(os.path.join(m1, "alive"), "wb").close()
    stalled = time.monotonic() - t0
    assert stalled < 10, stalled
    names = set(os.listdir(os.path.join(m1, "w")))
    for n in synced:  # every write fsynced before the kill is there
        i = int(n[1:])
        assert n in names
        assert open(os.path.join(m1, "w", n), "rb").read() == (str(i) * 997).encode()
    subprocess.run(["fusermount3", "-uz", m2], capture_output=True)
    time.sleep(2.5)  # at least one recovery poll of the survivor after the fence
    storaged("fs", "umount", m1, env=env)
    # clean: node 2's slot was replayed and marked clean by the survivor (check itself
    # does not replay without --repair, it would report the slot)
    r = storaged("fs", "check", img, env=env)
    assert "0 problem(s)" in r.stdout, r.stdout


def test_read_only_mount_claims_no_slot_and_refuses_writes(tmp_path, env):
    need_fuse()
    img, mnt = str(tmp_path / "img"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    storaged("fs", "mkfs", img, "-j", "1", env=env)
    pids: list[int] = []
    try:
        storaged("fs", "mount", img, mnt, "-o", "local", env=env)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"data")
        storaged("fs", "umount", mnt, env=env)
        storaged("fs", "mount", img, mnt, "-o", "local,ro", env=env)
        pids = mount_pids(env)
        assert open(os.path.join(mnt, "f"), "rb").read() == b"data"
        assert errno_of(os.mkdir, os.path.join(mnt, "x")) == errno.EROFS
        assert errno_of(open, os.path.join(mnt, "f"), "ab") == errno.EROFS
        st = json.loads(storaged("fs", "status", "--json", env=env).stdout)
        assert st[0]["read_only"] is True and st[0]["slot"] is None
    finally:
        teardown_mount(mnt, env, pids)
