"""iscsi:// URLs wherever storaged takes a device (storaged.block.open), against
real storaged storage nodes on 127.0.0.1: the cluster filesystem on a remote
LUN from two cluster nodes, its withdraw when a node is fenced (ACL revoke or
PR preemption), fence_storaged's PR method, RAID-1 over two storage nodes, and
a backstore re-exporting another node's LUN.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from storaged.block.base import BlockDeviceError
from storaged.block.open import is_url, normalize, open_device, redact
from storaged.initiator.device import FencedError, RemoteBlockDevice, fence_scsi_key
from tests.support import Daemon, require_tool, storaged
from tests.test_clusterfs_fuse import mount_pids, need_fuse, teardown_mount
from tests.test_clusterfs_fuse import storaged as fs_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IQN = "iqn.2026-11.org.storaged:iurl"
AGENT = [sys.executable, "-m", "fence.storaged_agent"]


def ports(n: int) -> list[int]:
    """``n`` free TCP ports on 127.0.0.1 in this suite's range (44000-44999)."""
    out: list[int] = []
    for p in random.sample(range(44000, 45000), 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        out.append(p)
        if len(out) == n:
            return out
    raise RuntimeError("no free ports in 44000-44999")


def ini(n: int) -> str:
    return f"iqn.2026-11.org.storaged:iurl-node{n}"


@contextlib.contextmanager
def storage_node(directory: str, port: int, name: str = "a", size: str = "64M",
                 open_access: bool = True) -> Iterator[Daemon]:
    """A storaged daemon serving target ``IQN-name`` LUN 0 on a sparse file."""
    os.makedirs(directory, exist_ok=True)
    iqn = f"{IQN}-{name}"
    storaged("backstore", "create", "lu", os.path.join(directory, "lu.img"), "--size", size,
             directory=directory)
    storaged("target", "create", iqn, "--portal", f"127.0.0.1:{port}", directory=directory)
    storaged("lun", "add", iqn, "lu", "--lun", "0", directory=directory)
    if open_access:
        storaged("target", "open", iqn, directory=directory)
    d = Daemon(directory, port, demo=False).start()
    d.iqn = iqn  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.stop()


def url(d: Daemon, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"iscsi://127.0.0.1:{d.port}/{d.iqn}/0" + (f"?{q}" if q else "")  # type: ignore


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storaged", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=env)


def agent(stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(AGENT, input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


# ----------------------------------------------------------------- opener

def test_url_helpers():
    assert is_url("iscsi://h/iqn.x:y/0") and not is_url("/dev/sda")
    assert normalize("iscsi://h/iqn.x:y/0") == "iscsi://h/iqn.x:y/0"
    assert normalize("rel/img") == os.path.abspath("rel/img")
    assert redact("iscsi://bob%s3cret@h:3261/iqn.x:y/1?target_password=t0p&initiator=i") == \
        "iscsi://bob%***@h:3261/iqn.x:y/1?target_password=***&initiator=i"
    with pytest.raises(BlockDeviceError) as e:
        open_device("/nonexistent/iurl.img")
    assert e.value.errno == errno.ENOENT and "no such file" in str(e.value)
    with pytest.raises(BlockDeviceError) as e:
        open_device("iscsi://127.0.0.1:1/iqn.x:y/0?pr_key=zz")
    assert "pr_key must be a hexadecimal" in str(e.value)


def test_errors_name_the_problem(tmp_path):
    p, dead = ports(2)
    with storage_node(str(tmp_path / "a"), p) as a:
        # a second target nobody may log in to (no ACL, not open)
        storaged("target", "create", f"{IQN}-closed", "--portal", f"127.0.0.1:{p}",
                 directory=a.directory)
        storaged("lun", "add", f"{IQN}-closed", "lu", "--lun", "0", directory=a.directory)
        cases = [
            (f"iscsi://127.0.0.1:{dead}/{a.iqn}/0", "cannot connect to 127.0.0.1"),
            (f"iscsi://127.0.0.1:{p}/{IQN}-nope/0", "target not found (status 0x0203)"),
            (f"iscsi://127.0.0.1:{p}/{IQN}-closed/0", "status 0x0202"),
            (f"iscsi://127.0.0.1:{p}/{a.iqn}/7", "LUN 7 not found"),
        ]
        for u, msg in cases:
            r = cli("fs", "mkfs", u, "-j", "1")
            assert r.returncode == 1 and msg in r.stderr, (u, r.stderr)
            assert r.stderr.startswith("storaged: error: iscsi://127.0.0.1")
        r = cli("--dir", str(tmp_path / "r"), "raid", "create", "--level", "1", "--name", "m",
                cases[0][0], cases[3][0])
        assert r.returncode == 1 and "cannot connect" in r.stderr, r.stderr
        r = cli("--dir", str(tmp_path / "c"), "backstore", "create", "x", cases[2][0])
        assert r.returncode == 1 and "status 0x0202" in r.stderr, r.stderr


# ------------------------------------------------------ clusterfs on a LUN

@contextlib.contextmanager
def two_mounts(tmp_path, node_url) -> Iterator[tuple[list[str], dict]]:
    """Cluster nodes 1 and 2 mounting one remote LUN, each through its own
    initiator session (``node_url(n)``)."""
    need_fuse()
    env = dict(os.environ, STORAGED_FS_RUNDIR=str(tmp_path / "run"))
    os.makedirs(env["STORAGED_FS_RUNDIR"])
    cp = ports(2)
    mnts: list[str] = []
    pids: list[int] = []
    try:
        for i in (1, 2):
            d = tmp_path / f"node{i}"
            d.mkdir()
            fs_cli("--dir", str(d), "cluster", "init", "iurl",
                   "--node", f"1=127.0.0.1:{cp[0]}", "--node", f"2=127.0.0.2:{cp[1]}",
                   "--id", str(i), "--two-node", "--token-ms", "300", "--fencer", "test",
                   env=env)
            mnts.append(str(tmp_path / f"mnt{i}"))
            os.mkdir(mnts[-1])
        procs = [subprocess.Popen(
            [sys.executable, "-m", "storaged", "fs", "mount", node_url(i), mnt, "--cluster",
             str(tmp_path / f"node{i}")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for i, mnt in enumerate(mnts, 1)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, out + err
        pids = mount_pids(env)
        yield mnts, env
    finally:
        pids = mount_pids(env) or pids
        for mnt in mnts:
            if fuse_mounted(mnt):
                # os.path.ismount misses a withdrawn mount (stat of its root is EIO)
                # or one whose process died: /proc/mounts still lists it
                if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
                    subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
            teardown_mount(mnt, env, pids)
            assert not fuse_mounted(mnt), f"{mnt} is still mounted"


def fuse_mounted(mnt: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == os.path.realpath(mnt) for line in f)


def status_of(env: dict, mnt: str) -> dict:
    info = json.loads(fs_cli("fs", "status", "--json", env=env).stdout)
    return next(m for m in info if m["mountpoint"] == os.path.realpath(mnt))


def eio(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.peer
@pytest.mark.parametrize("fence", ["storage", "pr"])
def test_fs_on_a_remote_lun_two_nodes_and_fenced_node_withdraws(tmp_path, fence):
    (p,) = ports(1)
    with storage_node(str(tmp_path / "a"), p, size="128M") as a:
        r = cli("fs", "mkfs", url(a), "--journals", "2")
        assert r.returncode == 0 and "2 journals" in r.stdout, r.stderr
        if fence == "pr":     # both nodes unfence (register + WE-RO) before mounting
            for n in (1, 2):
                r = agent(f"action=on\nmethod=pr\nplug={n}\ncluster_name=iurl\n"
                          f"devices={url(a, initiator=ini(n))}\nkey_file={tmp_path}/k{n}\n")
                assert r.returncode == 0, r.stderr

        def node_url(n: int) -> str:
            q = {"initiator": ini(n), "replacement_timeout": "5"}
            if fence == "pr":
                q["pr_key"] = f"{fence_scsi_key('iurl', n):x}"
            return url(a, **q)

        with two_mounts(tmp_path, node_url) as ((m1, m2), env):
            os.mkdir(os.path.join(m1, "d"))
            write_file(os.path.join(m1, "d", "from1"), b"node one")
            assert open(os.path.join(m2, "d", "from1"), "rb").read() == b"node one"
            write_file(os.path.join(m2, "d", "from2"), b"node two" * 1000)
            assert open(os.path.join(m1, "d", "from2"), "rb").read() == b"node two" * 1000
            st = status_of(env, m2)
            assert st["device"].startswith("iscsi://127.0.0.1") and st["withdrawn"] is None
            # fence node 2 while it has the filesystem mounted
            t0 = time.monotonic()
            if fence == "storage":
                storaged("fence", "map", "node2", "--initiator", ini(2),
                         directory=a.directory)
                storaged("fence", "off", "node2", directory=a.directory)
            else:
                r = agent(f"action=off\nmethod=pr\nplug=2\ncluster_name=iurl\n"
                          f"devices={url(a, initiator=ini(1))}\nkey_file={tmp_path}/k1\n")
                assert r.returncode == 0 and "Success: Powered OFF" in r.stdout, r.stderr
            assert eio(write_file, os.path.join(m2, "d", "late"), b"after the fence") \
                == errno.EIO
            took = time.monotonic() - t0
            print(f"fence ({fence}) to the fenced node's EIO: {took:.2f} s")
            st = status_of(env, m2)
            assert st["withdrawn"], st
            assert ("RESERVATION CONFLICT" if fence == "pr" else "fenced") in st["withdrawn"]
            # withdrawn for good: reads fail too, nothing more is written
            assert eio(os.listdir, os.path.join(m2, "d")) == errno.EIO
            r = fs_cli("fs", "status", env=env)
            assert "WITHDRAWN" in r.stdout
            # the other node carries on
            write_file(os.path.join(m1, "d", "after"), b"still here")
            assert sorted(os.listdir(os.path.join(m1, "d"))) == ["after", "from1", "from2"]
            assert status_of(env, m1)["withdrawn"] is None
            assert took < 10, took


# ------------------------------------------------------------- PR method

class LibIscsi:
    """READ KEYS through the real libiscsi (an independent initiator)."""

    def __init__(self, portal: str, target: str) -> None:
        from tests.libiscsi_ctypes import LibIscsi as Raw
        self.raw = Raw(portal, target)

    def read_keys(self) -> list[int]:
        import struct
        for _ in range(4):   # the first command may get a unit attention (power on)
            status, data, sense = self.raw.command(
                struct.pack(">BBxxxxxHB", 0x5E, 0, 1024, 0), read_len=1024)
            if not (status == 2 and sense and sense[0] == 6):
                break
        assert status == 0, (status, sense)
        n = int.from_bytes(data[4:8], "big") // 8
        return [int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big") for i in range(n)]

    def close(self) -> None:
        self.raw.close()


@pytest.mark.peer
def test_fence_storaged_pr_method(tmp_path):
    require_tool("fence_scsi", "fence-agents")
    (p,) = ports(1)
    with storage_node(str(tmp_path / "a"), p) as a:
        base = "method=pr\ncluster_name=iurl\nnode_ids=alpha=1,beta=2\n"

        def run(action: str, plug: str, n: int, extra: str = "") -> subprocess.CompletedProcess:
            return agent(f"action={action}\nplug={plug}\n{base}"
                         f"devices={url(a, initiator=ini(n))}\nkey_file={tmp_path}/k{n}\n"
                         + extra)

        r = agent(f"action=validate-all\nplug=alpha\n{base}devices={url(a)}\n")
        assert r.returncode == 0, r.stderr
        r = agent("action=validate-all\nmethod=pr\nplug=gamma\ndevices=/dev/sdb\n")
        assert r.returncode == 1
        for msg in ("is not an iscsi:// URL", "needs cluster_name"):
            assert msg in r.stderr, r.stderr
        for n, name in ((1, "alpha"), (2, "beta")):
            r = run("on", name, n)
            assert r.returncode == 0 and "Success: Powered ON" in r.stdout, r.stderr
            assert open(tmp_path / f"k{n}").read().strip() == f"{fence_scsi_key('iurl', n):x}"
        k1, k2 = fence_scsi_key("iurl", 1), fence_scsi_key("iurl", 2)
        peer = LibIscsi(f"127.0.0.1:{p}", a.iqn)  # type: ignore[attr-defined]
        try:
            assert set(peer.read_keys()) == {k1, k2}
            assert run("status", "beta", 1).returncode == 0
            dev2 = RemoteBlockDevice(url(a, initiator=ini(2), pr_key=f"{k2:x}"))
            try:
                dev2.write(0, b"\x22" * 512)
                r = run("list-status", "", 1)
                assert "alpha,alpha,ON" in r.stdout and "beta,beta,ON" in r.stdout
                r = run("off", "beta", 1)
                assert r.returncode == 0 and "Success: Powered OFF" in r.stdout, r.stderr
                assert k2 not in peer.read_keys() and k1 in peer.read_keys()
                r = run("status", "beta", 1)
                assert r.returncode == 2 and "Status: OFF" in r.stdout
                with pytest.raises(FencedError):
                    dev2.write(512, b"\x23" * 512)
                # fenced, it cannot fence back; nor can a host fence itself
                r = run("off", "alpha", 2)
                assert r.returncode == 1 and "is this host fenced?" in r.stderr, r.stderr
                r = run("off", "alpha", 1)
                assert r.returncode == 1 and "You can not fence yourself" in r.stderr
            finally:
                dev2.close()
            # node 1 still writes; node 2 unfences and writes again
            with RemoteBlockDevice(url(a, initiator=ini(1), pr_key=f"{k1:x}")) as dev1:
                dev1.write(1024, b"\x11" * 512)
            assert run("on", "beta", 2).returncode == 0
            assert set(peer.read_keys()) == {k1, k2}
            with RemoteBlockDevice(url(a, initiator=ini(2), pr_key=f"{k2:x}")) as dev2:
                dev2.write(1536, b"\x24" * 512)
        finally:
            peer.close()
        # an unreachable device: the fence-agents connection error, exit 1
        r = agent(f"action=status\nplug=alpha\n{base}login_timeout=2\n"
                  f"devices=iscsi://127.0.0.1:1/{a.iqn}/0\n")  # type: ignore[attr-defined]
        assert r.returncode == 1 and "Unable to connect/login" in r.stderr
    with open(os.path.join(a.directory, "lu.img"), "rb") as f:
        data = f.read(2048)
    assert data[:512] == b"\x22" * 512 and data[512:1024] == bytes(512), \
        "a write sent after the fence reached the LU"
    assert data[1024:1536] == b"\x11" * 512 and data[1536:] == b"\x24" * 512


# ------------------------------------------------- RAID and backstores

@pytest.mark.peer
def test_raid1_over_two_storage_nodes(tmp_path):
    mdadm = require_tool("mdadm", "mdadm")
    pa, pb = ports(2)
    with storage_node(str(tmp_path / "a"), pa, "a") as a, \
            storage_node(str(tmp_path / "b"), pb, "b") as b:
        members = [url(a, replacement_timeout="2", noop_interval="1", noop_timeout="1"),
                   url(b, replacement_timeout="2", noop_interval="1", noop_timeout="1")]
        state = str(tmp_path / "r")
        r = cli("--dir", state, "raid", "create", "--level", "1", "--name", "mirror",
                "--bitmap-chunk", "1M", *members)
        assert r.returncode == 0, r.stderr
        uuids = []
        for d in (a, b):
            ex = subprocess.run([mdadm, "--examine", os.path.join(d.directory, "lu.img")],
                                capture_output=True, text=True)
            assert ex.returncode == 0, ex.stderr
            assert "Raid Level : raid1" in ex.stdout and "Raid Devices : 2" in ex.stdout
            uuids.append(next(ln for ln in ex.stdout.splitlines() if "Array UUID" in ln))
        assert uuids[0] == uuids[1]
        from storaged.raid.service import RaidService
        from storaged.state import Store
        data = os.urandom(4 << 20)
        with Store(state) as store:
            svc = RaidService(store)
            try:
                arr = svc.array("mirror")
                assert arr.status()["slots"] == "UU"
                arr.write(1 << 20, data, True)
                assert arr.read(1 << 20, len(data)) == data
            finally:
                svc.stop_all()
        data_offset = 2048 * 512
        for d in (a, b):   # the same bytes on both storage nodes' disks
            with open(os.path.join(d.directory, "lu.img"), "rb") as f:
                f.seek(data_offset + (1 << 20))
                assert f.read(len(data)) == data
        # storage node b goes away: the mirror keeps serving, degraded
        b.stop()
        with Store(state) as store:
            svc = RaidService(store)
            try:
                arr = svc.array("mirror")
                arr.write(0, b"\x5a" * 65536, True)
                assert arr.read(0, 65536) == b"\x5a" * 65536
                assert arr.status()["slots"] in ("U_", "_U")
                # b comes back and is re-added: the bitmap resync copies the changed
                # 1 MiB chunk only, not the 63 MiB of the member
                b.start()
                svc.add("mirror", members[1])
                assert arr.wait_idle(60)
                st = arr.status()
                assert st["slots"] == "UU", st
                assert st["last_sync"]["by_bitmap"] and \
                    0 < st["last_sync"]["bytes"] <= 1 << 20, st["last_sync"]
            finally:
                svc.stop_all()
        with open(os.path.join(b.directory, "lu.img"), "rb") as f:
            f.seek(data_offset)
            assert f.read(65536) == b"\x5a" * 65536


def test_backstore_on_another_storage_nodes_lun(tmp_path):
    pa, pc = ports(2)
    with storage_node(str(tmp_path / "a"), pa, "a") as a:
        c = str(tmp_path / "c")
        os.makedirs(c)
        storaged("backstore", "create", "remote", url(a, initiator=ini(9)), directory=c)
        storaged("target", "create", f"{IQN}-c", "--portal", f"127.0.0.1:{pc}", directory=c)
        storaged("lun", "add", f"{IQN}-c", "remote", "--lun", "0", directory=c)
        storaged("target", "open", f"{IQN}-c", directory=c)
        ls = json.loads(storaged("ls", "--json", directory=c).stdout)["backstores"]
        assert ls[0]["kind"] == "iscsi" and ls[0]["path"].startswith("iscsi://")
        d = Daemon(c, pc, demo=False).start()
        try:
            with RemoteBlockDevice(f"iscsi://127.0.0.1:{pc}/{IQN}-c/0") as dev:
                assert dev.size == 64 << 20
                data = os.urandom(1 << 20)
                dev.write(8 << 20, data, fua=True)
                assert dev.read(8 << 20, len(data)) == data
        finally:
            d.stop()
        with open(os.path.join(a.directory, "lu.img"), "rb") as f:
            f.seek(8 << 20)
            assert f.read(len(data)) == data
