"""ocf:storaged:clusterfs, the pacemaker agent for a clusterfs mount, checked by
resource-agents' and pacemaker's own tools: ocf-tester runs the whole action
sequence on a local-mode mount of an image file, xmllint checks the meta-data
against resource-agents' schema, crm_resource --validate runs validate-all with
good and bad parameters.  Then the two failures the agent exists for: a mount
withdrawn by a SAN fence fails monitor (OCF_ERR_GENERIC) and stops cleanly, and
a mount process that does not exit is killed by stop (force_unmount)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_tool, storaged
from tests.test_clusterfs_fuse import need_fuse
from tests.test_iscsi_url import fuse_mounted, storage_node, url

pytestmark = [pytest.mark.root, pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(170)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCF_DIR = "/usr/lib/ocf/resource.d/storaged"
RNG = "/usr/share/resource-agents/metadata.rng"
INI = "iqn.2026-12.org.storaged:ocffs-node"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 in this file's range (49800-49900)."""
    for p in random.sample(range(49800, 49901), 101):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port in 49800-49900")


@pytest.fixture
def work() -> Iterator[Path]:
    """A world-readable scratch directory (ocf-tester asks for meta-data as an
    unprivileged user; pytest's tmp_path is 0700) with the agent installed in it."""
    d = Path(tempfile.mkdtemp(prefix=f"ocff{os.getpid()}"))
    d.chmod(0o755)
    try:
        r = cli("ocf", "install", "--dir", str(d / "agents"), "--agent", "clusterfs")
        assert r.returncode == 0, r.stderr
        (d / "agents").chmod(0o755)
        yield d
    finally:
        for mnt in d.glob("mnt*"):
            if fuse_mounted(str(mnt)):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storaged", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def image(d: Path) -> str:
    img = str(d / "fs.img")
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    r = cli("fs", "mkfs", img, "--journals", "2")
    assert r.returncode == 0, r.stderr
    return img


def action(agent: str, name: str, timeout_ms: int | None = None,
           **params: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OCF_ROOT="/usr/lib/ocf",
               **{f"OCF_RESKEY_{k}": v for k, v in params.items()})
    if timeout_ms is not None:
        env["OCF_RESKEY_CRM_meta_timeout"] = str(timeout_ms)
    return subprocess.run([agent, name], capture_output=True, text=True, timeout=90, env=env,
                          cwd=ROOT)


def test_metadata_validates_and_ocf_tester_local_mode(work):
    need_fuse()
    tester = require_tool("ocf-tester", "resource-agents")
    xmllint = require_tool("xmllint", "libxml2-utils")
    if not os.path.exists(RNG):
        pytest.fail(f"{RNG} missing: install the Debian package resource-agents")
    agent = str(work / "agents" / "clusterfs")
    meta = subprocess.run([agent, "meta-data"], capture_output=True, text=True, check=True)
    r = subprocess.run([xmllint, "--noout", "--relaxng", RNG, "-"], input=meta.stdout,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    img, mnt, run = image(work), str(work / "mnt"), str(work / "run")
    p = {"device": img, "directory": mnt, "local": "true", "run_dir": run}
    try:
        r = subprocess.run([tester, "-n", "cfs-test", *[a for k, v in p.items()
                                                        for a in ("-o", f"{k}={v}")], agent],
                           capture_output=True, text=True, timeout=150, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout + r.stderr
        assert not fuse_mounted(mnt)
        # the mount is real: a file written through it is there after a remount
        assert action(agent, "start", **p).returncode == 0
        Path(mnt, "hello").write_bytes(b"from the agent")
        assert action(agent, "monitor", **p).returncode == 0
        assert action(agent, "stop", **p).returncode == 0
        assert not fuse_mounted(mnt) and action(agent, "monitor", **p).returncode == 7
        assert action(agent, "start", **p).returncode == 0
        assert Path(mnt, "hello").read_bytes() == b"from the agent"
    finally:
        action(agent, "stop", **p)


def test_crm_resource_validate(work, tmp_path):
    crm = require_tool("crm_resource", "pacemaker-cli-utils")
    installed = os.path.join(OCF_DIR, "clusterfs")
    if os.path.exists(installed):
        pytest.fail(f"{installed} exists already; not overwriting it")
    img = image(work)
    r = cli("ocf", "install", "--agent", "clusterfs")
    assert r.returncode == 0, r.stderr
    try:
        def validate(*opts: str) -> str:
            args = [crm, "--validate", "--class", "ocf", "--provider", "storaged",
                    "--agent", "clusterfs"]
            for o in opts:
                args += ["--option", o]
            r = subprocess.run(args, capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
            return r.stdout + r.stderr

        good = (f"device={img}", f"directory={tmp_path}/mnt", "local=true")
        out = validate(*good)
        assert "returned 0 (ok)" in out, out
        out = validate(*good, "options=noatime,hold_ms=5")
        assert "returned 0 (ok)" in out, out
        cases = [
            ((f"directory={tmp_path}/mnt", "local=true"), "6 (not configured)",
             "device is required"),
            ((f"device={img}", "directory=rel/mnt", "local=true"), "6 (not configured)",
             "absolute path"),
            ((*good, "options=noatime,bogus"), "6 (not configured)", "unknown mount option"),
            ((*good, "options=lockspace=x"), "6 (not configured)", "lockspace parameter"),
            ((*good[:2], "local=perhaps"), "6 (not configured)", "must be a boolean"),
            (good[:2], "6 (not configured)", "cluster_dir is required"),
            ((*good[:2], f"cluster_dir={tmp_path}/none"), "5 (not installed)",
             "does not exist on this node"),
            ((f"device={tmp_path}/none.img", *good[1:]), "5 (not installed)",
             "does not exist on this node"),
            ((*good, f"cluster_dir={tmp_path}"), "6 (not configured)",
             "do not also give cluster_dir"),
        ]
        for opts, code, msg in cases:
            out = validate(*opts)
            assert f"returned {code}" in out and msg in out, (opts, out)
        # cluster mode: the lockspace must be one of the cluster's
        c = str(tmp_path / "cluster")
        storaged("cluster", "init", "ocffs", "--id=1", f"--node=1=127.0.0.1:{free_port()}",
                 directory=c)
        out = validate(*good[:2], f"cluster_dir={c}")
        assert "returned 0 (ok)" in out, out
        out = validate(*good[:2], f"cluster_dir={c}", "lockspace=other")
        assert "returned 6 (not configured)" in out and "not in cluster 'ocffs'" in out, out
    finally:
        cli("ocf", "install", "--remove", "--agent", "clusterfs")
        assert not os.path.exists(installed)


@contextlib.contextmanager
def started(agent: str, p: dict[str, str]) -> Iterator[None]:
    r = action(agent, "start", **p)
    assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        action(agent, "stop", timeout_ms=20000, **p)


def test_withdrawn_mount_fails_monitor_then_stops(work):
    """A SAN fence (the storage node revokes this initiator) withdraws the mount at
    its next write: monitor says OCF_ERR_GENERIC, stop still unmounts it."""
    need_fuse()
    agent = str(work / "agents" / "clusterfs")
    with storage_node(str(work / "san"), free_port()) as san:
        dev = url(san, initiator=f"{INI}1", replacement_timeout="3")
        r = cli("fs", "mkfs", dev, "--journals", "2")
        assert r.returncode == 0, r.stderr
        mnt = str(work / "mnt")
        p = {"device": dev, "directory": mnt, "local": "true", "run_dir": str(work / "run")}
        with started(agent, p):
            Path(mnt, "before").write_bytes(b"x" * 4096)
            assert action(agent, "monitor", **p).returncode == 0
            storaged("fence", "map", "node1", "--initiator", f"{INI}1", directory=san.directory)
            storaged("fence", "off", "node1", directory=san.directory)
            with pytest.raises(OSError):
                Path(mnt, "after").write_bytes(b"y" * 4096)
                os.sync()
            r = action(agent, "monitor", **p)
            assert r.returncode == 1 and "withdrawn" in r.stderr, r.stderr
            t0 = time.monotonic()
            r = action(agent, "stop", timeout_ms=20000, **p)
            assert r.returncode == 0, r.stderr
            print(f"stop of a withdrawn mount: {time.monotonic() - t0:.2f} s")
            assert not fuse_mounted(mnt)
            assert action(agent, "monitor", **p).returncode == 7


def test_stop_kills_a_mount_process_that_does_not_exit(work):
    """force_unmount: a mount process that is stopped (SIGSTOP: it answers nothing)
    is killed within the stop timeout and its mount detached; without
    force_unmount stop fails (pacemaker would fence the node)."""
    need_fuse()
    agent = str(work / "agents" / "clusterfs")
    img, mnt = image(work), str(work / "mnt")
    p = {"device": img, "directory": mnt, "local": "true", "run_dir": str(work / "run")}
    with started(agent, p):
        pid = int(next((work / "run").glob("*.ocf.pid")).read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            r = action(agent, "monitor", **p)
            assert r.returncode == 1 and "does not answer" in r.stderr, r.stderr
            r = action(agent, "stop", timeout_ms=15000, force_unmount="false", **p)
            assert r.returncode == 1 and "force_unmount is off" in r.stderr, r.stderr
            t0 = time.monotonic()
            r = action(agent, "stop", timeout_ms=15000, **p)
            took = time.monotonic() - t0
            assert r.returncode == 0 and "killing the mount process" in r.stderr, r.stderr
            assert took < 15, took
            print(f"forced stop: {took:.2f} s")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not os.path.exists(f"/proc/{pid}") or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert not fuse_mounted(mnt)
        assert action(agent, "monitor", **p).returncode == 7


def test_cluster_mode_mount_runs_the_cluster_node(work):
    """Without local: the mount runs the node of cluster_dir's (one-node) cluster and
    takes its locks from the DLM; stop leaves the node's control socket gone."""
    need_fuse()
    agent = str(work / "agents" / "clusterfs")
    img, mnt, c = image(work), str(work / "mnt"), str(work / "cluster")
    storaged("cluster", "init", "ocffs", "--id=1", f"--node=1=127.0.0.1:{free_port()}",
             directory=c)
    p = {"device": img, "directory": mnt, "cluster_dir": c, "run_dir": str(work / "run")}
    with started(agent, p):
        assert action(agent, "monitor", **p).returncode == 0
        r = subprocess.run([sys.executable, "-m", "storaged", "fs", "status", "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=30,
                           env=dict(os.environ, STORAGED_FS_RUNDIR=p["run_dir"]))
        (st,) = json.loads(r.stdout)
        assert st["mode"] == "cluster ocffs node 1" and st["withdrawn"] is None, st
        Path(mnt, "f").write_bytes(b"clustered")
        assert action(agent, "stop", **p).returncode == 0
        assert not fuse_mounted(mnt) and action(agent, "monitor", **p).returncode == 7
        assert not list(Path(c).glob("*.sock")), list(Path(c).iterdir())
