"""A storage cluster in network namespaces, for the floating address tests (root only).

Layout (every name starts with ``vip`` + the test process id, so parallel
runs never collide; every address is private and lives only inside the
namespaces made here)::

    ns vip<pid>b: bridge vip<pid>br, ports vip<pid>p1..p3, vip<pid>pc
    ns vip<pid>n1..n3: eth0 10.77.0.1..3/24, one ``storaged serve`` each
    ns vip<pid>c: eth0 10.77.0.50/24, the client (iscsi-inq, ARP capture)

The cluster fences with a command that disables the node's bridge port
(switch-port fencing, like fence_ifmib): a killed or partitioned node is cut
off the network before the survivors recover its address lock.
:meth:`Lab.close` kills every process and deletes every namespace (the
veths and the bridge go with them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
VIP = f"{SUBNET}.100"
CLIENT = f"{SUBNET}.50"
CLUSTER_PORT = 42100
ISCSI_PORT = 42260
IQN = "iqn.2026-12.org.storaged:vip"
INITIATOR = "iqn.2026-12.org.storaged:vip-client"
TOKEN_MS = 1000

CAPTURE = textwrap.dedent("""
    import json, socket, sys, time
    sys.path.insert(0, sys.argv[3])
    from storaged.vip.arp import ETH_P_ARP, parse_arp
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((sys.argv[1], ETH_P_ARP))
    out = open(sys.argv[2], "a", buffering=1)
    out.write(json.dumps({"ready": time.monotonic()}) + "\\n")
    while True:
        frame = s.recv(2048)
        a = parse_arp(frame)
        if a is not None:
            a["t"] = time.monotonic()
            out.write(json.dumps(a) + "\\n")
""")


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


class Lab:
    """Three storage nodes and a client in namespaces joined by one bridge."""

    def __init__(self, tmp: Path, nodes: int = 3) -> None:
        self.tmp = tmp
        self.tag = f"vip{os.getpid()}"
        self.ids = list(range(1, nodes + 1))
        self.bridge_ns = f"{self.tag}b"
        self.procs: dict[int, subprocess.Popen] = {}
        self.capture: subprocess.Popen | None = None
        self.procs_extra: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self.fence_log = tmp / "fenced.log"

    # ----------------------------------------------------------------- names

    def ns(self, node: int | str) -> str:
        return f"{self.tag}{'c' if node == 'c' else f'n{node}'}"

    def port(self, node: int | str) -> str:
        return f"{self.tag}p{node}"

    def dir(self, node: int) -> str:
        return str(self.tmp / f"node{node}")

    # ----------------------------------------------------------------- setup

    def _netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        """Namespaces, bridge and veths."""
        self._netns(self.bridge_ns)
        b = self.bridge_ns
        run("ip", "-n", b, "link", "add", f"{self.tag}br", "type", "bridge")
        run("ip", "-n", b, "link", "set", f"{self.tag}br", "up")
        for node, addr in [*((n, f"{SUBNET}.{n}") for n in self.ids), ("c", CLIENT)]:
            ns = self.ns(node)
            self._netns(ns)
            # Made inside the bridge namespace, the peer end moved into the node's.
            run("ip", "-n", b, "link", "add", self.port(node), "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            run("ip", "-n", b, "link", "set", self.port(node), "master", f"{self.tag}br", "up")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    def configure(self, preference: str = "1,2,3") -> None:
        """Cluster, target and floating address in every node's state directory."""
        fence = self.tmp / "fence.sh"
        fence.write_text(f"#!/bin/sh\nip -n {self.bridge_ns} link set {self.tag}p$1 down\n"
                         f"echo \"$1 $(date +%s.%N)\" >> {self.fence_log}\n")
        fence.chmod(0o755)
        nodes = [f"--node={n}={SUBNET}.{n}:{CLUSTER_PORT}" for n in self.ids]
        for n in self.ids:
            d = self.dir(n)
            self.cli(n, "cluster", "init", "vipcluster", f"--id={n}", *nodes,
                     f"--token-ms={TOKEN_MS}", "--fencer=command", f"--fence-command={fence}")
            self.cli(n, "backstore", "create", "lu0", f"{d}/lu0.img", "--size", "8M")
            self.cli(n, "target", "create", IQN, "--portal", f"{VIP}:{ISCSI_PORT}")
            self.cli(n, "target", "open", IQN)
            self.cli(n, "lun", "add", IQN, "lu0", "--lun", "0")
            self.cli(n, "vip", "add", f"{VIP}/24", "--dev", "eth0",
                     "--node-preference", preference)

    def cli(self, node: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``storaged --dir <node dir> ARGS`` (offline, or through the node's daemon)."""
        r = subprocess.run([PY, "-m", "storaged", "--dir", self.dir(node), *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        if check and r.returncode:
            raise AssertionError(f"storaged {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def start(self, node: int) -> None:
        log = open(self.tmp / f"serve{node}.log", "ab")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(node), PY, "-m", "storaged", "--dir",
             self.dir(node), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()

    def wait_serving(self, node: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        sock = Path(self.dir(node)) / "control.sock"
        while not sock.exists():
            p = self.procs[node]
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node {node} did not start:\n{self.log(node)}")
            time.sleep(0.05)

    def start_capture(self) -> Path:
        """Record every ARP frame the client's eth0 sees (AF_PACKET) in a JSON lines file."""
        path = self.tmp / "arp.jsonl"
        self.capture = subprocess.Popen(["ip", "netns", "exec", self.ns("c"), PY, "-c", CAPTURE,
                                         "eth0", str(path), str(ROOT)])
        deadline = time.monotonic() + 10
        while not path.exists() or not path.read_text():
            assert time.monotonic() < deadline and self.capture.poll() is None, "no capture"
            time.sleep(0.02)
        return path

    # ------------------------------------------------------------- observing

    def log(self, node: int) -> str:
        p = self.tmp / f"serve{node}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def has_vip(self, node: int) -> bool:
        r = run("ip", "-n", self.ns(node), "-4", "-o", "addr", "show", "dev", "eth0")
        return f" {VIP}/" in r.stdout

    def port_up(self, node: int) -> bool:
        r = run("ip", "-n", self.bridge_ns, "-o", "link", "show", self.port(node))
        return ",UP" in r.stdout or "<UP" in r.stdout

    def holders(self) -> list[int]:
        """Nodes with the address on a link that is connected (a fenced port holds nothing)."""
        return [n for n in self.ids if self.has_vip(n) and self.port_up(n)]

    def wait_holder(self, among: list[int] | None = None, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = [n for n in self.holders() if among is None or n in among]
            if len(h) == 1:
                return h[0]
            time.sleep(0.02)
        raise AssertionError(f"no single holder among {among or self.ids}: "
                             f"{self.holders()}\n" + "\n".join(self.log(n) for n in self.ids))

    def vip_ls(self, node: int) -> dict:
        return json.loads(self.cli(node, "vip", "ls", "--json").stdout)

    def fenced(self) -> list[tuple[int, float]]:
        """(node, wall-clock time) of every fence the cluster ran."""
        if not self.fence_log.exists():
            return []
        return [(int(a), float(b)) for a, b in
                (line.split() for line in self.fence_log.read_text().splitlines())]

    def iscsi_inq(self, tool: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """INQUIRY through the floating address from the client namespace."""
        return subprocess.run(["ip", "netns", "exec", self.ns("c"), tool, "-i", INITIATOR,
                               f"iscsi://{VIP}:{ISCSI_PORT}/{IQN}/0"],
                              capture_output=True, text=True, timeout=timeout)

    def sessions(self, node: int) -> str:
        """Established TCP connections inside the node's namespace (``ss``)."""
        return run("ip", "netns", "exec", self.ns(node), "ss", "-tn", "state",
                   "established").stdout

    def hold_connection(self) -> subprocess.Popen:
        """A TCP connection from the client to the portal on the address, kept open."""
        code = ("import socket, sys, time\n"
                f"s = socket.create_connection(('{VIP}', {ISCSI_PORT}), timeout=5)\n"
                "print('connected', flush=True)\n"
                "time.sleep(60)\n")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns("c"), PY, "-c", code],
                             stdout=subprocess.PIPE, text=True)
        self.procs_extra.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "connected"
        return p

    # --------------------------------------------------------------- actions

    def kill(self, node: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[node]
        # ip netns exec execs the interpreter: the Popen pid is the daemon itself.
        p.send_signal(sig)
        p.wait(20)

    def link(self, node: int | str, up: bool) -> None:
        run("ip", "-n", self.bridge_ns, "link", "set", self.port(node), "up" if up else "down")

    def close(self) -> None:
        for p in [*self.procs.values(), *self.procs_extra,
                  *([self.capture] if self.capture else [])]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        for name in reversed(self.namespaces):
            run("ip", "netns", "del", name, check=False)

