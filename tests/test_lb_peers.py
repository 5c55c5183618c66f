"""Login redirection with real peers: three storaged nodes behind a group portal.

Node A listens on the group portal 127.0.0.1:BASE (the virtual service) and on
its own portal 127.0.0.2:BASE+1; nodes B and C on 127.0.0.3:BASE+2 and
127.0.0.4:BASE+3.  Each node's LUN 0 has a different size, so the capacity a
peer tool reports says which node it landed on; the nodes' own session lists
(the daemon's ``status``) and ``storaged lb -L`` confirm it.  The peers are
libiscsi's tools, QEMU's iSCSI driver and storaged's own initiator.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from support import require_tool, storaged

from storaged.control.client import call
from storaged.control.ops import apply
from storaged.initiator.device import RemoteBlockDevice
from storaged.state import Store

pytestmark = pytest.mark.peer

IQN = "iqn.2026-11.org.storaged:ha"
BASE = 41000 + (os.getpid() % 90) * 10  # ports BASE..BASE+9, inside 41000-41999
VIP = f"127.0.0.1:{BASE}"
MIB = 1 << 20
NODES = {"A": ("127.0.0.2", BASE + 1, 8), "B": ("127.0.0.3", BASE + 2, 12),
         "C": ("127.0.0.4", BASE + 3, 16)}


def portal(name: str) -> str:
    ip, port, _ = NODES[name]
    return f"{ip}:{port}"


def url(p: str) -> str:
    return f"iscsi://{p}/{IQN}/0"


class Node:
    """One storaged daemon serving target IQN on its own portal."""

    def __init__(self, root, name: str) -> None:
        self.name = name
        self.dir = str(root / name)
        ip, port, size = NODES[name]
        self.address = (ip, port)
        self.size = size * MIB
        os.makedirs(self.dir)
        with Store(self.dir) as st:
            apply(st, "backstore_create", {"name": "d0", "path": f"{self.dir}/lun.img",
                                           "size": self.size})
            apply(st, "target_create", {"iqn": IQN, "portals": [portal(name)]})
            apply(st, "lun_add", {"iqn": IQN, "backstore": "d0", "lun": 0})
            apply(st, "target_open", {"iqn": IQN, "open": True})
            if name == "A":
                apply(st, "lb_add_service", {"vip": VIP, "scheduler": "rr"})
                for n in NODES:
                    apply(st, "lb_add_real", {"vip": VIP, "real": portal(n)})
        self.proc: subprocess.Popen | None = None
        self.sock = os.path.join(self.dir, "control.sock")

    def start(self) -> None:
        self.log = open(os.path.join(self.dir, "daemon.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "storaged", "--dir", self.dir, "serve"],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, STORAGED_LOG="INFO"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited: {self.output()}")
            if os.path.exists(self.sock):
                with socket.socket() as s:
                    if s.connect_ex(self.address) == 0:
                        return
            time.sleep(0.05)
        raise TimeoutError(f"node {self.name} does not listen on {self.address}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the node dies without logging anyone out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()

    def output(self) -> str:
        with open(os.path.join(self.dir, "daemon.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def op(self, op: str, args: dict | None = None):
        return call(self.sock, op, args or {})

    def sessions(self) -> list[dict]:
        return [s for s in self.op("status")["sessions"] if s["target"] == IQN]


def live(a: Node) -> dict[str, dict]:
    [svc] = a.op("lb_live")["services"]
    return svc["reals"]


def wait_health(a: Node, want: dict[str, bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reals = live(a)
        if all(reals[portal(n)]["up"] == up for n, up in want.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"health never became {want}: {live(a)}")


def wait_settled(a: Node, timeout: float = 10) -> None:
    """Until no redirect is pending and the counts match the nodes' sessions
    (the health checks run every 2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r["inactive"] == 0 for r in live(a).values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"redirects still pending: {live(a)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("redir")
    nodes = {n: Node(root, n) for n in NODES}
    try:
        for n in ("B", "C", "A"):
            nodes[n].start()
        wait_health(nodes["A"], {n: True for n in NODES})
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


@pytest.fixture
def a(cluster):
    """Node A with the service reset to rr, weights 1, temporary redirects."""
    node = cluster["A"]
    node.op("lb_edit_service", {"vip": VIP, "scheduler": "rr", "persistent": 0,
                                "redirect": "temporary"})
    for n in NODES:
        node.op("lb_edit_real", {"vip": VIP, "real": portal(n), "weight": 1})
    return node


def landed(cluster, size_bytes: int) -> str:
    [name] = [n for n, node in cluster.items() if node.size == size_bytes]
    return name


def iscsi_ls(cluster) -> tuple[str, str]:
    """iscsi-ls -s through the group portal: (portal listed, node it landed on)."""
    tool = require_tool("iscsi-ls", "libiscsi-bin")
    out = subprocess.run([tool, "-s", f"iscsi://{VIP}"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    listed = re.search(r"Portal:(\S+)", out.stdout).group(1)
    # iscsi-ls prints (blocks * block size) / MiB of the last LBA: size - 1 MiB rounds down
    mib = int(re.search(r"Size:(\d+)M", out.stdout).group(1))
    [name] = [n for n, (_ip, _p, size) in NODES.items() if size - 1 <= mib <= size]
    return listed, name


def test_iscsi_ls_rr_spreads_over_the_nodes_and_discovery_stays(cluster, a):
    before = {p: r["redirects"] for p, r in live(a).items()}
    got = [iscsi_ls(cluster) for _ in range(6)]
    assert {listed for listed, _ in got} == {f"{VIP},1"}  # SendTargets: the group portal
    # ip_vs_rr from the list head (the newest real server): C, B, A, C, B, A
    rr = [n for _, n in got]
    assert Counter(rr) == {"A": 2, "B": 2, "C": 2} and rr[:3] == rr[3:], rr
    after = live(a)
    assert all(after[portal(n)]["redirects"] - before[portal(n)] == 2 for n in NODES)


def test_lc_counts_sessions_of_every_node(cluster, a):
    """lc with sessions held open by our initiator on two nodes: the libiscsi
    login goes to the idle third; the other nodes' counts come from their
    answers to the health check."""
    a.op("lb_edit_service", {"vip": VIP, "scheduler": "lc"})
    wait_settled(a)
    devs = []
    try:
        for _ in range(2):
            devs.append(RemoteBlockDevice(url(VIP)))
        held = {d.client.connected_to for d in devs}
        assert len(held) == 2
        [idle] = [n for n in NODES if NODES[n][:2] not in held]
        assert iscsi_ls(cluster)[1] == idle
        wait_settled(a)
        reals = live(a)
        assert sum(r["active"] for r in reals.values()) == 2
        assert reals[portal(idle)]["active"] == 0
    finally:
        for d in devs:
            d.close()


def test_weight_zero_is_never_chosen(cluster, a):
    a.op("lb_edit_real", {"vip": VIP, "real": portal("B"), "weight": 0})
    got = {iscsi_ls(cluster)[1] for _ in range(4)}
    assert got == {"A", "C"}


def test_wlc_sessions_held_open_land_where_the_nodes_say(cluster, a):
    """Our initiator follows the redirects and keeps its sessions: each node's
    own session list holds one, and lb -L counts them as ActiveConn."""
    a.op("lb_edit_service", {"vip": VIP, "scheduler": "wlc"})
    wait_settled(a)
    devs = []
    try:
        for _ in range(3):
            devs.append(RemoteBlockDevice(url(VIP)))
        where = {}
        for d in devs:
            host, port = d.client.connected_to
            [name] = [n for n, (ip, p, _s) in NODES.items() if (ip, p) == (host, port)]
            assert d.size == cluster[name].size
            where[name] = d
        assert sorted(where) == ["A", "B", "C"]
        for name, node in cluster.items():
            assert len(node.sessions()) == 1, (name, node.sessions())
        wait_settled(a)
        assert all(r["active"] == 1 for r in live(a).values()), live(a)
        # I/O through the redirected session reaches that node's LUN.
        data = os.urandom(64 << 10)
        where["B"].write(4096, data, fua=True)
        with RemoteBlockDevice(url(portal("B"))) as direct:
            assert direct.read(4096, len(data)) == data
        out = storaged("lb", "-L", "-n", directory=cluster["A"].dir).stdout.splitlines()
        rows = {line.split()[1]: line.split() for line in out if line.startswith("  -> 127.")}
        for n in NODES:   # weight 1, ActiveConn 1, InActConn 0
            assert rows[portal(n)][2:6] == ["Redir", "1", "1", "0"], out
    finally:
        for d in devs:
            d.close()


def test_qemu_img_writes_and_compares_through_the_group_portal(cluster, a, tmp_path):
    """sh: every login from 127.0.0.1 goes to the same node; qemu-img writes an
    image through the group portal and it is on that node's LUN."""
    qemu = require_tool("qemu-img", "qemu-utils (and qemu-block-extra for iscsi://)")
    a.op("lb_edit_service", {"vip": VIP, "scheduler": "sh"})
    img = tmp_path / "src.raw"
    img.write_bytes(os.urandom(2 * MIB))
    before = {p: r["redirects"] for p, r in live(a).items()}
    for args in (["convert", "-n", "-f", "raw", "-O", "raw", str(img), url(VIP)],
                 ["compare", "-f", "raw", "-F", "raw", str(img), url(VIP)]):
        r = subprocess.run([qemu, *args], capture_output=True, text=True, timeout=60)
        # compare: the LUN is longer than the image; only the image's range must match
        assert r.returncode in (0, 1) and "differ" not in r.stdout + r.stderr, r
    moved = [p for p, r in live(a).items() if r["redirects"] > before[p]]
    assert len(moved) == 1, live(a)
    [name] = [n for n in NODES if portal(n) == moved[0]]
    with RemoteBlockDevice(url(portal(name))) as direct:
        assert direct.read(0, 2 * MIB) == img.read_bytes()


def test_iscsi_test_cu_through_the_group_portal_with_iqn_persistence(cluster, a):
    """iscsi-test-cu reads the capacity on one session and writes on another:
    persistence by initiator IQN keeps both on one node (without it rr sends
    them to nodes whose LUs differ in size here, and the writes fail)."""
    tool = require_tool("iscsi-test-cu", "libiscsi-bin")
    a.op("lb_edit_service", {"vip": VIP, "persistent": 300, "pe": "iqn"})
    before = {p: r["redirects"] for p, r in live(a).items()}
    r = subprocess.run([tool, "--dataloss", "--test=SCSI.Write16.Simple", url(VIP)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.search(r"tests\s+1\s+1\s+1\s+0", r.stdout), r.stdout
    moved = {p: r["redirects"] - before[p] for p, r in live(a).items()
             if r["redirects"] > before[p]}
    assert len(moved) == 1 and sum(moved.values()) >= 2, moved  # every session, one node
    out = storaged("lb", "-L", "-c", directory=a.dir).stdout
    [entry] = [line for line in out.splitlines() if " PERSIST " in line]
    assert entry.split()[3:6] == ["iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test", VIP,
                                  next(iter(moved))], out


def test_permanent_redirect_status(cluster, a):
    a.op("lb_edit_service", {"vip": VIP, "redirect": "permanent"})
    with RemoteBlockDevice(url(VIP)) as dev:
        # 0x0102: the initiator keeps the real server's portal for later logins
        assert dev.client.portal == dev.client.connected_to != ("127.0.0.1", BASE)


def test_redirect_loop_gives_a_clear_error(cluster, a):
    """Two group portals on A sending logins to each other."""
    x, y = f"127.0.0.1:{BASE + 5}", f"127.0.0.1:{BASE + 6}"
    for vip, real in ((x, y), (y, x)):
        a.op("lb_add_service", {"vip": vip, "scheduler": "rr"})
        a.op("lb_add_real", {"vip": vip, "real": real})
    try:
        r = storaged("iscsi", "inq", url(x), directory=a.dir, check=False)
        assert r.returncode != 0
        assert f"login redirection loop: {x} -> {y} -> {x}" in r.stderr, r.stderr
    finally:
        a.op("lb_delete_service", {"vip": x})
        a.op("lb_delete_service", {"vip": y})


def test_a_node_that_is_down_is_not_chosen(cluster, a):
    c = cluster["C"]
    c.stop()
    try:
        wait_health(a, {"C": False})
        got = {iscsi_ls(cluster)[1] for _ in range(4)}
        assert got == {"A", "B"}
        out = storaged("lb", "-L", directory=a.dir).stdout
        assert re.search(rf"{re.escape(portal('C'))}\s+Redir\s+1\s+\d+\s+\d+\s+down", out), out
    finally:
        c.start()
    wait_health(a, {"C": True})
    assert "C" in {iscsi_ls(cluster)[1] for _ in range(3)}


@pytest.mark.parametrize("persistent", [0, 300])
def test_our_initiator_reconnects_through_the_group_portal(cluster, a, persistent):
    """After its node dies (SIGKILL) the session logs in again at the group
    portal (0x0101 is not remembered), which sends it to a node that is up
    once the health check has seen the dead one go (every 2 s).  With
    persistence the template sends it back to the dead node until then."""
    a.op("lb_edit_service", {"vip": VIP, "scheduler": "rr", "persistent": persistent,
                             "pe": "iqn"})
    # A carries the group portal and is not killed: no sessions for it here.
    a.op("lb_edit_real", {"vip": VIP, "real": portal("A"), "weight": 0})
    with RemoteBlockDevice(url(VIP)) as dev:
        first = dev.client.connected_to
        [name] = [n for n in NODES if NODES[n][:2] == first]
        assert name != "A"
        node = cluster[name]
        started = time.monotonic()
        node.kill()
        try:
            assert len(dev.read(0, 4096)) == 4096
            took = time.monotonic() - started
            assert took < 8, took   # health check 2 s + its timeout 1.5 s + backoff
            assert dev.client.connected_to not in (first, ("127.0.0.1", BASE))
            assert dev.client.reconnects >= 1
        finally:
            node.start()
    wait_health(a, {name: True})
    print(f"I/O gap through the group portal after node {name} was killed "
          f"(persistence {persistent} s): {took:.2f} s")
