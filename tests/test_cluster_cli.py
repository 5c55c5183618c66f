"""``storaged cluster`` / ``storaged lock`` with real node processes (storaged cluster node)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cluster_safety import free_ports

PY = sys.executable


def cli(directory: str, *args: str, check: bool = True, timeout: float = 60):
    return subprocess.run([PY, "-m", "storaged", "--dir", directory, *args],
                          capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def cluster3(tmp_path):
    """Three initialised state directories and a starter for their node processes."""
    ports = free_ports(3)
    dirs = [str(tmp_path / f"n{i}") for i in (1, 2, 3)]
    nodes = [f"--node={i}=127.0.0.{i}:{ports[i - 1]}" for i in (1, 2, 3)]
    for i, d in enumerate(dirs, 1):
        r = cli(d, "cluster", "init", "c1", f"--id={i}", *nodes, "--token-ms=500",
                "--fencer=test")
        assert f"this is node {i}" in r.stdout
    procs: dict[int, subprocess.Popen] = {}

    def start(i: int) -> None:
        log = open(os.path.join(dirs[i - 1], "node.log"), "ab")  # noqa: SIM115
        procs[i] = subprocess.Popen([PY, "-m", "storaged", "--dir", dirs[i - 1], "cluster",
                                     "node"], stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, STORAGED_LOG="INFO"))
        log.close()

    def ready(count: int = 3, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = cli(dirs[0], "cluster", "status", check=False)
            if f"members {list(range(1, count + 1))}" in r.stdout and "(running)" in r.stdout:
                return
            time.sleep(0.2)
        raise AssertionError(r.stdout + r.stderr)

    for i in (1, 2, 3):
        start(i)
    yield dirs, procs, ready
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_status_and_config_errors(tmp_path, cluster3):
    dirs, procs, ready = cluster3
    ready()
    r = cli(dirs[1], "cluster", "status")
    assert "view 1.1: members [1, 2, 3], quorate (3/3 votes, quorum 2)" in r.stdout
    assert "clock skew: node 1:" in r.stdout
    # every node's kernel clock state, as adjtimex reports it on this host (the three
    # nodes share one kernel, so they agree)
    line = next(ln for ln in r.stdout.splitlines() if "kernel clocks:" in ln)
    assert all(f"node {n}: " in line for n in (1, 2, 3)), line
    assert len({"synced" in part for part in line.split(",")}) == 1, line
    r = cli(str(tmp_path / "none"), "cluster", "status", check=False)
    assert r.returncode == 1 and "no cluster configured" in r.stderr
    r = cli(str(tmp_path / "bad"), "cluster", "init", "c", "--id=2", "--node=1=127.0.0.1:1",
            check=False)
    assert r.returncode == 1 and "--id 2 is not one of" in r.stderr


@pytest.mark.slow
def test_lock_run_counter_300_increments(tmp_path, cluster3):
    dirs, procs, ready = cluster3
    ready()
    counter = tmp_path / "counter"
    counter.write_text("0")
    script = (f"v=$(cat {counter}); echo $((v+1)) > {counter}.tmp && "
              f"mv {counter}.tmp {counter}")
    loop = ("for k in $(seq 1 100); do "
            f"{PY} -m storaged --dir $D lock run --mode EX counter -- sh -c '{script}' "
            "|| exit 1; done")
    workers = [subprocess.Popen(["bash", "-c", loop], env=dict(os.environ, D=d))
               for d in dirs]
    for w in workers:
        assert w.wait(180) == 0
    assert counter.read_text().strip() == "300"


@pytest.mark.slow
def test_liveness_after_sigkill_and_lock_ls(tmp_path, cluster3):
    dirs, procs, ready = cluster3
    ready()
    holder = subprocess.Popen([PY, "-m", "storaged", "--dir", dirs[2], "lock", "run", "L",
                               "--", "sleep", "60"])
    deadline = time.monotonic() + 10
    while "lock" not in cli(dirs[2], "lock", "ls").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "EX" in cli(dirs[2], "lock", "ls").stdout
    r = cli(dirs[0], "lock", "run", "--noqueue", "L", "--", "true", check=False)
    assert r.returncode == 1 and "EAGAIN" in r.stderr
    waiter = subprocess.Popen([PY, "-m", "storaged", "--dir", dirs[0], "lock", "run", "L",
                               "--", "true"])
    time.sleep(0.5)
    assert waiter.poll() is None
    procs[3].send_signal(signal.SIGKILL)            # node 3 dies with its lock holder
    t0 = time.monotonic()
    assert waiter.wait(10) == 0
    took = time.monotonic() - t0
    holder.kill()
    holder.wait()
    # token 0.5 s + consensus 0.6 s + test fencing (immediate), plus process start-up slack
    assert took < 0.5 + 0.6 + 1.0, took
    out = cli(dirs[0], "cluster", "status").stdout
    assert "members [1, 2]" in out


def test_clean_leave_and_fence_ack(tmp_path, cluster3):
    dirs, procs, ready = cluster3
    ready()
    r = cli(dirs[2], "cluster", "leave")
    assert "Node 3 left the cluster" in r.stdout
    assert procs[3].wait(10) == 0
    ready(2)
    r = cli(dirs[0], "cluster", "fence-ack", "3")
    assert "acknowledged" in r.stdout
    log = open(os.path.join(dirs[0], "node.log")).read()
    assert "fencing node 3" not in log
