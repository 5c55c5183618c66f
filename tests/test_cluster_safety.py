"""Multi-process DLM safety: randomized workloads on 3-5 node processes on 127.0.0.x.

Each node process (tests/cluster_worker.py) logs every grant, mode change
and release with a CLOCK_MONOTONIC stamp; :func:`check_safety` proves that
no two incompatible locks on one name were ever held at the same time,
including runs where a node is SIGKILLed and runs where the network splits
2|3 (a per-node drop filter set through the node's test hook).  In the
split, the majority fences the minority with tests/cluster_fence.py (which
SIGKILLs it, like a power fence) and the checker also proves the minority
granted nothing once it had lost quorum.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from storaged.cluster.client import NodeClient
from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.dlm.modes import COMPAT

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "cluster_worker.py")
FENCE = os.path.join(HERE, "cluster_fence.py")


def free_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1..n (each node binds its own 127.0.0.x)."""
    for _ in range(100):
        base = random.randint(20000, 55000)
        ports = [base + i for i in range(n)]
        ok = True
        for i, p in enumerate(ports):
            with socket.socket() as s:
                try:
                    s.bind((f"127.0.0.{i + 1}", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return ports
    raise RuntimeError("no free ports")


def make_config(n: int, **kw) -> ClusterConfig:
    ports = free_ports(n)
    return ClusterConfig(name="safety", nodes={
        i + 1: NodeEntry(f"127.0.0.{i + 1}:{ports[i]}") for i in range(n)}, **kw)


class Cluster:
    """Worker processes for one run."""

    def __init__(self, tmp_path, cfg: ClusterConfig, seconds: float, seed: int) -> None:
        self.dir = str(tmp_path)
        self.cfg = cfg
        self.path = os.path.join(self.dir, "cluster.json")
        with open(self.path, "w") as f:
            json.dump(cfg.to_dict(), f)
        self.procs: dict[int, subprocess.Popen] = {}
        self.killed: dict[int, int] = {}
        self.seconds = seconds
        self.seed = seed

    def start(self) -> None:
        env = dict(os.environ, STORAGED_LOG="WARNING", PYTHONUNBUFFERED="1")
        for n in self.cfg.nodes:
            log = open(os.path.join(self.dir, f"out-{n}.txt"), "wb")  # noqa: SIM115
            self.procs[n] = subprocess.Popen(
                [sys.executable, WORKER, self.path, str(n), self.dir, str(self.seed * 100 + n),
                 str(self.seconds)], stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
        deadline = time.monotonic() + 30
        while not all(self._has(n, '"ready"') for n in self.cfg.nodes):
            assert time.monotonic() < deadline, self.outputs()
            for n, p in self.procs.items():
                assert p.poll() is None, f"node {n} died:\n{self.outputs()}"
            time.sleep(0.05)
        open(os.path.join(self.dir, "go"), "w").close()

    def _has(self, n: int, text: str) -> bool:
        try:
            with open(os.path.join(self.dir, f"log-{n}.jsonl")) as f:
                return text in f.read()
        except FileNotFoundError:
            return False

    def kill(self, n: int) -> None:
        self.procs[n].send_signal(signal.SIGKILL)
        self.procs[n].wait(10)
        self.killed[n] = time.monotonic_ns()

    def hook(self, n: int, op: str, **args) -> None:
        with NodeClient(path=os.path.join(self.dir, f"node-{n}.sock")) as c:
            c.call(op, args)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for n, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(f"node {n} did not finish:\n{self.outputs()}") from None

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def outputs(self) -> str:
        out = []
        for n in self.cfg.nodes:
            try:
                with open(os.path.join(self.dir, f"out-{n}.txt"), "rb") as f:
                    out.append(f"--- node {n}\n" + f.read().decode(errors="replace")[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(out)

    def events(self) -> list[dict]:
        evs = []
        for n in self.cfg.nodes:
            path = os.path.join(self.dir, f"log-{n}.jsonl")
            with open(path) as f:
                for line in f:
                    if line.endswith("\n"):
                        evs.append(json.loads(line))
        return evs

    def death_times(self) -> dict[int, int]:
        """When each killed or fenced node was certainly dead."""
        out = dict(self.killed)
        for n in self.cfg.nodes:
            path = os.path.join(self.dir, f"fenced-{n}")
            if os.path.exists(path):
                with open(path) as f:
                    out[n] = min(out.get(n, 1 << 62), int(f.read()))
        return out


def check_safety(events: list[dict], deaths: dict[int, int]) -> int:
    """Raise AssertionError if two incompatible locks overlapped; return the interval count."""
    intervals: dict[str, list[tuple[int, int, int, str]]] = {}
    open_: dict[str, tuple[int, int, str, int]] = {}  # key -> (start, mode, name, node)
    end_of_time = max(e["t"] for e in events) + 1
    for e in sorted(events, key=lambda e: e["t"]):
        ev = e.get("ev")
        if ev not in ("acq", "chg", "rel"):
            continue
        key = e["key"]
        if ev == "acq":
            open_[key] = (e["t"], e["mode"], e["name"], e["node"])
            continue
        cur = open_.pop(key, None)
        if cur is None:
            continue
        start, mode, name, node = cur
        intervals.setdefault(name, []).append((start, e["t"], mode, key))
        if ev == "chg":
            open_[key] = (e["t"], e["mode"], name, node)
    for key, (start, mode, name, node) in open_.items():
        end = deaths.get(node, end_of_time)
        intervals.setdefault(name, []).append((start, end, mode, key))
    total = 0
    for name, ivs in intervals.items():
        ivs.sort()
        active: list[tuple[int, int, int, str]] = []
        for iv in ivs:
            start, end, mode, key = iv
            active = [a for a in active if a[1] > start]
            for a in active:
                if a[3].split(":")[:2] == key.split(":")[:2] and a[3] == key:
                    continue
                if not (COMPAT[a[2]][mode] and COMPAT[mode][a[2]]):
                    raise AssertionError(
                        f"incompatible locks on {name}: {a[3]} mode {a[2]} "
                        f"[{a[0]}..{a[1]}] and {key} mode {mode} [{start}..{end}]")
            active.append(iv)
            total += 1
    return total


def grants(events: list[dict], node: int | None = None, after: int = 0) -> int:
    return sum(1 for e in events if e.get("ev") == "acq" and e["t"] > after
               and (node is None or e["node"] == node))


def test_checker_catches_overlap():
    evs = [{"t": 1, "ev": "acq", "key": "1:0:1", "name": "a", "mode": 5, "node": 1},
           {"t": 2, "ev": "acq", "key": "2:0:1", "name": "a", "mode": 3, "node": 2},
           {"t": 3, "ev": "rel", "key": "1:0:1", "name": "a", "node": 1},
           {"t": 4, "ev": "rel", "key": "2:0:1", "name": "a", "node": 2}]
    with pytest.raises(AssertionError, match="incompatible"):
        check_safety(evs, {})
    evs[1]["mode"] = 0  # NL is compatible with EX
    assert check_safety(evs, {}) == 2


@pytest.mark.slow
def test_safety_randomized_3_nodes(tmp_path):
    cfg = make_config(3, token_ms=400, fencer="test")
    c = Cluster(tmp_path, cfg, seconds=4, seed=1)
    try:
        c.start()
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    n = check_safety(evs, {})
    assert n > 300, n
    for node in cfg.nodes:
        assert grants(evs, node) > 50


@pytest.mark.slow
def test_safety_with_sigkill(tmp_path):
    cfg = make_config(5, token_ms=800, fencer="test")
    c = Cluster(tmp_path, cfg, seconds=5, seed=2)
    try:
        c.start()
        time.sleep(2)
        c.kill(3)
        killed_at = c.killed[3]
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    check_safety(evs, c.death_times())
    # The survivors recovered and kept locking after the kill.
    for node in (1, 2, 4, 5):
        assert grants(evs, node, after=killed_at + int(1.5e9)) > 10, node
    views = [e for e in evs if e.get("ev") == "view" and e["node"] == 1]
    assert any(v["members"] == [1, 2, 4, 5] and v["quorate"] for v in views), views


@pytest.mark.slow
def test_safety_with_partition_2_3(tmp_path):
    cfg = make_config(5, token_ms=800, fencer="command", fence_delay_ms=1500,
                      fence_command=[sys.executable, FENCE, str(tmp_path)],
                      no_quorum_policy="stop")
    c = Cluster(tmp_path, cfg, seconds=7, seed=3)
    minority, majority = (4, 5), (1, 2, 3)
    try:
        c.start()
        time.sleep(2)
        split = time.monotonic_ns()
        for n in minority:
            c.hook(n, "drop", peers=list(majority))
        for n in majority:
            c.hook(n, "drop", peers=list(minority))
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    deaths = c.death_times()
    assert set(deaths) == set(minority), deaths  # the majority fenced the minority
    check_safety(evs, deaths)
    for n in minority:
        lost = [e["t"] for e in evs if e.get("ev") == "view" and e["node"] == n
                and not e["quorate"] and e["t"] > split]
        assert lost, f"node {n} never saw its partition lose quorum"
        assert grants(evs, n, after=lost[0]) == 0, f"node {n} granted without quorum"
    for n in majority:
        assert grants(evs, n, after=max(deaths.values()) + int(0.5e9)) > 10, n
