"""``python -m storaged.bench fence``: how fast a fence takes effect.

A storaged daemon on loopback serves one LUN; an initiator writes to it in
a loop while ``fence_storaged -o off`` (stdin options, as stonithd runs it)
fences its node through the management endpoint.  Measured from the fence
request (the agent started) to the first refused I/O of the initiator, and
to the agent's success (exit 0); then the node is unfenced and the next run
logs in again.  Prints p50/p99 over ``--runs`` fences (default 20).

There is no peer to compare with on these machines (fence_scsi needs a
kernel initiator's SCSI devices), so there is no ratio line; the goal of
issue 17 is both times under 1 s at p99.  Needs the source checkout (the
test initiator lives in tests/tcp_initiator.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PASSWORD = "bench-fence-password"
IQN = "iqn.2026-11.org.storaged:bench-fence"
VICTIM = "iqn.2026-11.org.storaged:victim"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(d: str, *args: str, input: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "storaged", "--dir", d, *args], check=True,
                   capture_output=True, text=True, input=input)


def _wait(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("storaged exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench fence")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        from tests.tcp_initiator import LoginFailed, TcpInitiator
    except ImportError:
        print("storaged: error: run from the source checkout (needs tests/tcp_initiator.py)",
              file=sys.stderr)
        return 1
    from fence.client import Endpoint

    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "state")
        port, mport = _free_port(), _free_port()
        _cli(d, "backstore", "create", "b0", os.path.join(tmp, "lu.img"), "--size", "64M")
        _cli(d, "target", "create", IQN, "--portal", f"127.0.0.1:{port}")
        _cli(d, "lun", "add", IQN, "b0")
        _cli(d, "target", "open", IQN)
        _cli(d, "fence", "map", "victim", "--initiator", VICTIM)
        _cli(d, "mgmt", "listen", f"127.0.0.1:{mport}")
        _cli(d, "mgmt", "user-add", "bench", "--password-stdin", input=PASSWORD + "\n")
        env = dict(os.environ, STORAGED_LOG="ERROR")
        proc = subprocess.Popen([sys.executable, "-m", "storaged", "--dir", d, "serve"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            _wait(port, proc)
            _wait(mport, proc)
            ep = Endpoint("127.0.0.1", mport, "bench", PASSWORD)
            stdin = (f"action=off\nip=127.0.0.1\nipport={mport}\nusername=bench\n"
                     f"password={PASSWORD}\nplug=victim\n")
            refused, success = [], []
            for i in range(args.runs):
                ini = TcpInitiator("127.0.0.1", port, name=VICTIM, isid=0x23D000000000 + i)
                ini.login(IQN)
                ini.clear_unit_attentions()
                failed_at: list[float] = []
                stop = threading.Event()

                def writer(ini: TcpInitiator = ini, failed_at: list[float] = failed_at,
                           stop: threading.Event = stop) -> None:
                    block = b"\xab" * 4096
                    while not stop.is_set():
                        try:
                            status = ini.write10(8, block)[0]
                        except Exception:  # noqa: BLE001 - the session was dropped
                            failed_at.append(time.perf_counter())
                            return
                        if status != 0:
                            failed_at.append(time.perf_counter())
                            return

                t = threading.Thread(target=writer, daemon=True)
                t.start()
                time.sleep(0.05)
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "fence.storaged_agent"], input=stdin,
                                   capture_output=True, text=True, timeout=60)
                t1 = time.perf_counter()
                t.join(10)
                stop.set()
                if r.returncode != 0 or not failed_at:
                    print(f"run {i}: agent exit {r.returncode}, refused: {bool(failed_at)}\n"
                          f"{r.stderr}", file=sys.stderr)
                    return 1
                refused.append(failed_at[0] - t0)
                success.append(t1 - t0)
                try:
                    TcpInitiator("127.0.0.1", port, name=VICTIM, isid=0x23D100000000).login(IQN)
                    print(f"run {i}: fenced initiator could log in", file=sys.stderr)
                    return 1
                except LoginFailed:
                    pass
                ini.close()
                ep.call("fence_on", {"node": "victim"})
            ep.close()
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"fence_storaged on loopback, {args.runs} fences (one storage node)")
    print(f"{'measure':<34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, vals in (("request -> first refused I/O", refused),
                       ("request -> agent success (exit 0)", success)):
        print(f"{name:<34}{statistics.median(vals) * 1000:>10.1f}"
              f"{_pct(vals, 99) * 1000:>10.1f}{max(vals) * 1000:>10.1f}")
    return 0
