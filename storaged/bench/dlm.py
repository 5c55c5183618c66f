"""DLM benchmark: storaged lock+unlock pairs vs etcd 3.4 locks, side by side.

``python -m storaged.bench dlm [--seconds S] [--runs N] [--etcd PATH]``

storaged: this process runs cluster node 1 with its clients (asyncio tasks
using the Lockspace API, the way an in-daemon user such as the cluster
filesystem does, with the daemon's event loop: uvloop when installed); a
second node runs in a child process on 127.0.0.2.  *local-master* names are
first used by node 1 (mastered there: no network round trip),
*remote-master* names were first used by node 2 (each lock is a round trip
over ZeroMQ; the unlock is asynchronous and travels in the same frame as the
next request).

etcd: ``etcd`` (Debian etcd-server 3.4) on its own 127.0.0.1 ports; each
client is a thread with a keep-alive HTTP connection to the v3 JSON gateway
that grants a lease once, then loops ``/v3/lock/lock`` + ``/v3/lock/unlock``.

Scenarios: 1 and 8 clients, uncontended (a name per client) and contended
(one name).  A round runs every storaged case, then every etcd case (both
servers stay up); ``--runs`` rounds alternate and each figure is the median
over them.  Each row prints pairs/s and the p50/p99 latency of one
lock+unlock pair; the last line is ``min ratio storaged/etcd: X.XX``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.cluster.fencing import TestFencer
from storaged.cluster.node import ClusterNode

CLIENTS = (1, 8)


def _daemon_run(coro: Any) -> Any:
    """Run ``coro`` with the daemon's runtime settings: uvloop when installed (as
    ``storaged serve`` does, which now hosts the cluster node) and its GC tuning."""
    import gc
    gc.set_threshold(20000, 20, 20)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stats(lat: list[float], seconds: float) -> dict[str, float]:
    lat.sort()
    n = len(lat)
    return {"rate": n / seconds, "p50": lat[n // 2] * 1000 if n else float("nan"),
            "p99": lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan")}


# ------------------------------------------------------------------ storaged

async def _storaged_case(ls: Any, names: list[bytes], seconds: float) -> dict[str, float]:
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    pc = time.perf_counter

    async def client(name: bytes) -> None:
        i = 0
        while True:
            t0 = pc()
            if t0 >= stop:
                return
            lk = await ls.lock(name, "EX")
            await ls.unlock(lk)
            lat.append(pc() - t0)
            i += 1
            if not i & 63:
                await asyncio.sleep(0)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(n) for n in names))
    return _stats(lat, time.perf_counter() - t0)


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric median over runs."""
    out = {}
    for k in samples[0]:
        vals = sorted(x[k] for x in samples)
        out[k] = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1]
                                                            + vals[len(vals) // 2]) / 2
    return out


async def _storaged(seconds: float, wheres: tuple[str, ...] = ("local", "remote"),
                    runs: int = 1, between: Callable[[], None] | None = None,
                    ) -> dict[tuple[str, int, str], dict[str, float]]:
    """Every storaged case ``runs`` times; ``between`` (the etcd cases) runs in a thread
    after each round, while both nodes keep heartbeating.  Medians over the rounds."""
    cfg = ClusterConfig(name="bench", nodes={
        1: NodeEntry(f"127.0.0.1:{_free_port('127.0.0.1')}"),
        2: NodeEntry(f"127.0.0.2:{_free_port('127.0.0.2')}")}, fencer="test")
    remote_names = [f"remote-{i}" for i in range(max(CLIENTS))] + ["remote-c"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg.to_dict(), f)
        cfg_path = f.name
    peer = subprocess.Popen([sys.executable, "-m", "storaged.bench.dlm", "--serve-node",
                             cfg_path, *remote_names], stdout=subprocess.PIPE, text=True)
    node = ClusterNode(cfg, 1, fencer=TestFencer())
    await node.start()
    loop = asyncio.get_running_loop()
    try:
        await node.wait_ready(2, timeout=20)
        line = await loop.run_in_executor(None, peer.stdout.readline)
        assert line.strip() == "ready", line
        ls = node.lockspace()
        out: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for _ in range(runs):
            for where in wheres:
                for clients in CLIENTS:
                    for contention in ("uncontended", "contended"):
                        if contention == "contended":
                            names = [f"{where}-c".encode()] * clients
                        else:
                            names = [f"{where}-{i}".encode() for i in range(clients)]
                        for n in set(names):  # warm up: master and directory entries
                            await ls.unlock(await ls.lock(n, "EX"), wait=True)
                        out.setdefault((where, clients, contention), []).append(
                            await _storaged_case(ls, names, seconds))
            if between is not None:
                await loop.run_in_executor(None, between)
        assert node.view is not None and len(node.view.members) == 2, "a node dropped out"
        return {k: _median(v) for k, v in out.items()}
    finally:
        await node.stop()
        peer.terminate()
        peer.wait(10)
        os.unlink(cfg_path)


async def _serve_node(cfg_path: str, names: list[str]) -> None:
    with open(cfg_path) as f:
        cfg = ClusterConfig.from_dict(json.load(f))
    node = ClusterNode(cfg, 2, fencer=TestFencer())
    await node.start()
    await node.wait_ready(2, timeout=20)
    ls = node.lockspace()
    for n in names:  # first user: node 2 masters these
        await ls.unlock(await ls.lock(n, "EX"))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await node.stop()


# ---------------------------------------------------------------------- etcd

class Etcd:
    """A throw-away etcd server on 127.0.0.1."""

    def __init__(self, binary: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="storaged-bench-etcd-")
        self.port = _free_port("127.0.0.1")
        peer = _free_port("127.0.0.1")
        url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "--data-dir", self.dir, "--name", "bench",
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"bench=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.post(http.client.HTTPConnection("127.0.0.1", self.port, timeout=2),
                             "/v3/kv/range", {"key": "eA=="}) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("etcd did not start")
            time.sleep(0.1)

    @staticmethod
    def post(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: {resp.status} {data}")
        return data

    def case(self, names: list[str], seconds: float) -> dict[str, float]:
        lat: list[float] = []
        lock = threading.Lock()
        stop = time.perf_counter() + seconds

        def client(name: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            lease = self.post(conn, "/v3/lease/grant", {"TTL": 60})["ID"]
            key = base64.b64encode(name.encode()).decode()
            mine: list[float] = []
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    break
                got = self.post(conn, "/v3/lock/lock", {"name": key, "lease": lease})
                self.post(conn, "/v3/lock/unlock", {"key": got["key"]})
                mine.append(time.perf_counter() - t0)
            with lock:
                lat.extend(mine)
            conn.close()
        threads = [threading.Thread(target=client, args=(n,)) for n in names]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return _stats(lat, time.perf_counter() - t0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _etcd_round(server: Etcd, seconds: float,
                out: dict[tuple[int, str], list[dict[str, float]]]) -> None:
    for clients in CLIENTS:
        for contention in ("uncontended", "contended"):
            names = (["etcd-c"] * clients if contention == "contended"
                     else [f"etcd-{i}" for i in range(clients)])
            out.setdefault((clients, contention), []).append(server.case(names, seconds))


# ---------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m storaged.bench dlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each case")
    p.add_argument("--runs", type=int, default=3,
                   help="rounds (storaged cases, then etcd cases); medians are reported")
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd",
                   help="etcd binary (Debian package etcd-server)")
    p.add_argument("--storaged-only", choices=("all", "local", "remote"),
                   help="development aid: run only storaged cases (no etcd, no ratio line)")
    p.add_argument("--serve-node", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_node:
        _daemon_run(_serve_node(args.serve_node[0], args.serve_node[1:]))
        return 0
    if args.storaged_only:
        wheres = ("local", "remote") if args.storaged_only == "all" else (args.storaged_only,)
        for key, s in _daemon_run(_storaged(args.seconds, wheres, args.runs)).items():
            print(*key, f"{s['rate']:.0f}/s p50 {s['p50']:.3f} p99 {s['p99']:.3f}")
        return 0
    if not os.path.exists(args.etcd):
        print(f"etcd not found at {args.etcd}: install the Debian package etcd-server",
              file=sys.stderr)
        return 2
    print(f"DLM lock+unlock pairs, {args.seconds:g} s per case, medians of {args.runs} "
          f"alternating rounds (latency per pair, ms); storaged nodes on {_loop_name()}")
    server = Etcd(args.etcd)
    etcd_runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        ours = _daemon_run(_storaged(args.seconds, runs=args.runs,
                                     between=lambda: _etcd_round(server, args.seconds,
                                                                 etcd_runs)))
    finally:
        server.close()
    theirs = {k: _median(v) for k, v in etcd_runs.items()}
    head = (f"{'master':<7} {'clients':>7} {'names':<12} {'storaged/s':>11} {'p50':>7} "
            f"{'p99':>7} {'etcd/s':>8} {'p50':>7} {'p99':>7} {'ratio':>7}")
    print(head)
    ratios = []
    for (where, clients, contention), s in ours.items():
        e = theirs[(clients, contention)]
        ratio = s["rate"] / e["rate"] if e["rate"] else float("inf")
        ratios.append(ratio)
        print(f"{where:<7} {clients:>7} {contention:<12} {s['rate']:>11.0f} {s['p50']:>7.3f} "
              f"{s['p99']:>7.3f} {e['rate']:>8.0f} {e['p50']:>7.2f} {e['p99']:>7.2f} "
              f"{ratio:>7.1f}")
    print(f"min ratio storaged/etcd: {min(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
