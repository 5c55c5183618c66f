"""The corosync membership provider against real corosync nodes in network namespaces.

Three corosync nodes (tests/corosync_lab.py: own network namespace, own
mount namespace with its own /etc/corosync, /var/lib/corosync and /run) and
in each network namespace a storaged cluster node process with
``membership="corosync"`` running the randomized workload of the safety tests
(tests/cluster_worker.py).  The safety checker of tests/test_cluster_safety.py
proves no incompatible locks were held together while:

* views follow corosync (one view id, same members on every node), and a
  SIGKILLed storaged process leaves the view (CPG ``procdown``);
* a 2|1 partition made by taking node 3's link down leaves node 3 in a
  non-quorate view where it grants nothing, and the majority fences it;
* a waiter on a survivor gets the lock a dead node (corosync and storaged
  SIGKILLed) held, after corosync's token timeout plus fencing;
* with pacemakerd in the same namespaces and a storaged SAN in a fourth, the
  pacemaker fencer fences through pacemaker's fencer and fence_storaged: the
  fenced node's logins are refused and the fencing history shows the fence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from corosync_lab import ROOT, SAN, CorosyncLab
from support import DEMO_IQN, storaged
from test_cluster_safety import FENCE, WORKER, Cluster, check_safety, grants
from test_fence_mgmt import PASSWORD

from storaged.cluster.client import NodeClient
from storaged.cluster.config import ClusterConfig, LocalNode, NodeEntry
from storaged.cluster.fencing import parse_fence_history
from storaged.state import Store

pytestmark = [pytest.mark.peer, pytest.mark.root, pytest.mark.slow]
PORT = 45001          #: ZeroMQ port of every storaged node (each in its own netns)
ISCSI_PORT = 45002    #: the SAN's iSCSI portal (in the SAN's netns)
MGMT_PORT = 45003     #: the SAN's management endpoint, which fence_storaged talks to


class NetnsCluster(Cluster):
    """The safety tests' worker processes, each in its corosync node's namespace."""

    def __init__(self, tmp_path, lab: CorosyncLab, cfg: ClusterConfig, seconds: float,
                 seed: int) -> None:
        super().__init__(tmp_path, cfg, seconds, seed)
        self.lab = lab

    def start(self) -> None:
        env = dict(os.environ, STORAGED_LOG="INFO", PYTHONUNBUFFERED="1")
        for n in self.cfg.nodes:
            log = open(os.path.join(self.dir, f"out-{n}.txt"), "wb")  # noqa: SIM115
            self.procs[n] = subprocess.Popen(self.lab.exec_argv(n, [
                sys.executable, WORKER, self.path, str(n), self.dir, str(self.seed * 100 + n),
                str(self.seconds)]), stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
        deadline = time.monotonic() + 30
        while not all(self._has(n, '"ready"') for n in self.cfg.nodes):
            assert time.monotonic() < deadline, self.outputs()
            for n, p in self.procs.items():
                assert p.poll() is None, f"node {n} died:\n{self.outputs()}"
            time.sleep(0.05)
        open(os.path.join(self.dir, "go"), "w").close()

    def kill(self, n: int) -> None:
        """SIGKILL node n's worker.  Its death time is when kill(2) returned: the process
        runs no more user code after that, and CPG reports ``procdown`` as soon as the
        kernel closes its corosync connection -- before the parent reaps it, so the reap
        time the base class records can come after a survivor's legitimate grant."""
        self.procs[n].send_signal(signal.SIGKILL)
        self.killed[n] = time.monotonic_ns()
        self.procs[n].wait(10)

    def status(self, n: int) -> dict:
        with NodeClient(path=os.path.join(self.dir, f"node-{n}.sock")) as c:
            return c.call("status", timeout=5)


def corosync_config(lab: CorosyncLab, **kw) -> ClusterConfig:
    cfg = ClusterConfig(name=lab.name, membership="corosync", nodes={
        i: NodeEntry(f"{lab.addr(i)}:{PORT}", name=lab.node_name(i))
        for i in range(1, lab.n + 1)}, **kw)
    cfg.validate()
    return cfg


def views(evs: list[dict], node: int) -> list[dict]:
    return [e for e in evs if e.get("ev") == "view" and e["node"] == node]


@pytest.fixture
def lab(tmp_path):
    lab = CorosyncLab(tmp_path / "lab", token_ms=1000)
    lab.start()
    try:
        yield lab
    finally:
        lab.close()


def test_views_follow_corosync_and_sigkill(lab, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = corosync_config(lab, fencer="test")
    c = NetnsCluster(run, lab, cfg, seconds=5, seed=11)
    try:
        c.start()
        st = c.status(1)
        assert st["membership"] == "corosync" and st["view"]["members"] == [1, 2, 3]
        assert st["corosync"]["ring_members"] == [1, 2, 3]
        assert st["corosync"]["names"] == {"1": "cn1", "2": "cn2", "3": "cn3"}
        assert st["corosync"]["quorum"] == 2 and st["corosync"]["total_votes"] == 3
        assert st["dlm_members"] == {"default": [1, 2, 3]} and st["mismatch"] == []
        # `storaged cluster status` of node 1 shows both providers and both views.
        state = tmp_path / "state"
        with Store(str(state)) as store, store.write() as txn:
            txn.put(cfg)
            txn.put(LocalNode(1))
        os.symlink(run / "node-1.sock", state / "cluster.sock")
        out = subprocess.run([sys.executable, "-m", "storaged", "--dir", str(state), "cluster",
                              "status"], capture_output=True, text=True, timeout=30)
        assert "providers: membership corosync, fencing test" in out.stdout, out
        assert "corosync: ring" in out.stdout and "1 (cn1), 2 (cn2), 3 (cn3)" in out.stdout
        assert "DLM lockspace default: members [1, 2, 3]" in out.stdout, out.stdout
        time.sleep(2)
        killed_at = time.monotonic_ns()
        c.kill(3)
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    check_safety(evs, c.death_times())
    # Every node installed the full view under the same id (nodes that started first
    # had smaller views before: corosync was quorate, so those were quorate too).
    full = {n: [v for v in views(evs, n) if v["t"] < killed_at][-1] for n in (1, 2, 3)}
    assert all(v["members"] == [1, 2, 3] and v["quorate"] for v in full.values()), full
    assert len({tuple(v["id"]) for v in full.values()}) == 1, full
    for n in (1, 2):
        after = [v for v in views(evs, n) if v["t"] > killed_at]
        assert after and after[0]["members"] == [1, 2] and after[0]["quorate"], after
        # corosync saw the process go at once (procdown): no token timeout to wait for
        assert after[0]["t"] - killed_at < 1.0e9, after[0]["t"] - killed_at
        assert grants(evs, n, after=killed_at + int(1e9)) > 10, n


def test_partition_2_1_minority_stops(lab, tmp_path):
    cfg = corosync_config(lab, fencer="command", fence_delay_ms=500,
                          fence_command=[sys.executable, FENCE, str(tmp_path)])
    c = NetnsCluster(tmp_path, lab, cfg, seconds=8, seed=12)
    try:
        c.start()
        time.sleep(2)
        split = time.monotonic_ns()
        lab.link(3, up=False)
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    deaths = c.death_times()
    # A worker that finishes stops without a clean leave: CPG reports procdown and the
    # survivors fence it too.  Only fences before the first worker finished count.
    done = min(e["t"] for e in evs if e.get("ev") == "done")
    assert {n for n, t in deaths.items() if t < done} == {3}, deaths  # the majority fenced 3
    check_safety(evs, deaths)
    lost = [e["t"] for e in views(evs, 3) if not e["quorate"] and e["t"] > split]
    assert lost, f"node 3 never saw its partition lose quorum: {views(evs, 3)}"
    assert grants(evs, 3, after=lost[0]) == 0, "node 3 granted without quorum"
    for n in (1, 2):
        after = [v for v in views(evs, n) if v["t"] > split]
        assert after and after[0]["members"] == [1, 2] and after[0]["quorate"], after
        assert grants(evs, n, after=deaths[3] + int(0.5e9)) > 10, n
        assert deaths[3] > after[0]["t"], "fenced before the majority's view"


def test_waiter_gets_dead_nodes_lock_after_token_and_fencing(lab, tmp_path):
    cfg = corosync_config(lab, fencer="command",
                          fence_command=[sys.executable, FENCE, str(tmp_path)])
    c = NetnsCluster(tmp_path, lab, cfg, seconds=8, seed=13)
    holder: NodeClient | None = None
    got: dict[str, object] = {}
    try:
        c.start()
        holder = NodeClient(path=str(tmp_path / "node-3.sock"))
        st = c.status(1)
        token_ms, consensus_ms = st["token_ms"], st["consensus_ms"]
        assert (token_ms, consensus_ms) == (1000, 1200), st  # corosync's, not storaged's
        holder.call("lock", {"name": "held", "mode": "EX"}, timeout=10)

        def wait_lock() -> None:
            with NodeClient(path=str(tmp_path / "node-1.sock")) as w:
                try:
                    got["lock"] = w.call("lock", {"name": "held", "mode": "EX",
                                                  "timeout": 20}, timeout=25)
                except Exception as e:  # noqa: BLE001 - reported by the assertion
                    got["error"] = e
                got["t"] = time.monotonic_ns()

        t = threading.Thread(target=wait_lock)
        t.start()
        time.sleep(0.5)
        assert "t" not in got, got  # node 3 holds it
        # The whole node dies: its corosync first, so only the token timeout tells.
        killed = time.monotonic_ns()
        lab.kill_corosync(3)
        c.kill(3)
        t.join(30)
        c.wait(40)
    finally:
        if holder is not None:
            holder.close()
        c.stop()
    assert "lock" in got, got
    waited = (got["t"] - killed) / 1e9
    fenced = c.death_times()[3]
    assert got["t"] > fenced, "granted before node 3 was fenced"
    # Not before corosync's token timeout, and not much after token + consensus + fencing.
    assert token_ms / 1000 * 0.9 <= waited < (token_ms + consensus_ms) / 1000 + 3, waited
    with open(tmp_path / "waited.json", "w") as f:
        json.dump({"waited_s": waited, "token_ms": token_ms}, f)


def test_storaged_node_survives_a_corosync_restart(lab, tmp_path):
    """corosync of node 2 is SIGKILLed under a running storaged node: that node drops
    its locks at once (a non-quorate view), the others fence it, and when corosync is
    back the storaged node rejoins by itself as a new incarnation and locks again."""
    cfg = corosync_config(lab, fencer="test")
    c = NetnsCluster(tmp_path, lab, cfg, seconds=9, seed=15)
    try:
        c.start()
        inc_before = c.status(2)["incarnation"]
        time.sleep(1.5)
        cut = time.monotonic_ns()
        lab.kill_corosync(2)
        time.sleep(2)
        back = time.monotonic_ns()
        lab.start_corosync(2)
        lab.wait_quorate([1, 2, 3], 3)
        deadline = time.monotonic() + 15
        while c.status(2)["view"]["members"] != [1, 2, 3]:
            assert time.monotonic() < deadline, c.status(2)
            time.sleep(0.1)
        st = c.status(2)
        c.wait(40)
    finally:
        c.stop()
    evs = c.events()
    check_safety(evs, {})
    after_cut = [v for v in views(evs, 2) if v["t"] > cut]
    assert after_cut and not after_cut[0]["quorate"] and after_cut[0]["members"] == [2]
    assert grants(evs, 2, after=after_cut[0]["t"]) > 0, "node 2 never locked again"
    assert st["incarnation"] > inc_before and st["view"]["quorate"], st
    for n in (1, 3):
        assert grants(evs, n, after=back) > 10, n


LOGIN_PROBE = """
import sys
sys.path.insert(0, {root!r})
from tests.tcp_initiator import LoginFailed, TcpInitiator
ini = TcpInitiator({addr!r}, {port}, name={name!r}, isid=0x23D000000103)
try:
    ini.login({iqn!r})
    print("ok")
    ini.logout()
except LoginFailed as e:
    print(f"refused {{e.status:#06x}}")
"""


def login_from(lab: CorosyncLab, node: int, addr: str, port: int, name: str) -> str:
    """An iSCSI login from node's network namespace as initiator ``name``: "ok" or
    "refused 0x...."."""
    code = LOGIN_PROBE.format(root=ROOT, addr=addr, port=port, name=name, iqn=DEMO_IQN)
    r = subprocess.run(lab.exec_argv(node, [sys.executable, "-c", code]), capture_output=True,
                       text=True, timeout=30)
    return r.stdout.strip() or r.stderr[-500:]


def test_pacemaker_fences_through_fence_storaged(tmp_path):
    """pacemakerd in every node's namespaces, a storaged SAN in a fourth one; the
    storaged fencer asks pacemaker's fencer, whose device is fence_storaged.

    Only node 3's storaged process is SIGKILLed: corosync and pacemaker on node 3 stay
    up, so pacemaker itself has no reason to fence.  The fence therefore comes from
    storaged's request (``stonith_admin --fence cn3``); pacemaker runs fence_storaged
    against the SAN's management endpoint, the SAN refuses node 3's logins, and the
    survivors' recovery waits until pacemaker's fencing history shows the fence."""
    lab = CorosyncLab(tmp_path / "lab", token_ms=1000, san=True)
    san_dir = str(tmp_path / "san")
    cn3 = "iqn.2026-11.test.cluster:cn3"
    lab.devices = {"san-fence": ("fence_storaged", {
        "ip": lab.addr(SAN), "ipport": str(MGMT_PORT), "username": "fencer",
        "password": PASSWORD, "pcmk_host_list": "cn1 cn2 cn3"})}

    def san() -> None:
        lab.start_san(san_dir, ISCSI_PORT)
        for n in (1, 2, 3):  # a worker that finishes first is fenced too (no clean leave)
            storaged("fence", "map", f"cn{n}", "--initiator", f"iqn.2026-11.test.cluster:cn{n}",
                     directory=san_dir)
        storaged("mgmt", "listen", f"{lab.addr(SAN)}:{MGMT_PORT}", directory=san_dir)
        storaged("mgmt", "user-add", "fencer", "--password-stdin", directory=san_dir,
                 input=PASSWORD + "\n")
        lab.wait_listen(SAN, MGMT_PORT)

    holder: NodeClient | None = None
    got: dict[str, object] = {}
    c: NetnsCluster | None = None
    try:
        lab.start(before_cluster=san)
        assert login_from(lab, 3, lab.addr(SAN), ISCSI_PORT, cn3) == "ok"
        cfg = corosync_config(lab, fencer="pacemaker")
        for e in cfg.nodes.values():
            e.name = ""  # the fencer takes pacemaker's names (cn1..) from corosync
        c = NetnsCluster(tmp_path, lab, cfg, seconds=7, seed=14)
        c.start()
        assert c.status(1)["fencer"] == "pacemaker"
        holder = NodeClient(path=str(tmp_path / "node-3.sock"))
        holder.call("lock", {"name": "held", "mode": "EX"}, timeout=10)

        def wait_lock() -> None:
            with NodeClient(path=str(tmp_path / "node-1.sock")) as w:
                try:
                    got["lock"] = w.call("lock", {"name": "held", "mode": "EX",
                                                  "timeout": 30}, timeout=35)
                except Exception as e:  # noqa: BLE001 - reported by the assertion
                    got["error"] = e
                got["t"] = time.monotonic_ns()

        t = threading.Thread(target=wait_lock)
        t.start()
        time.sleep(0.5)
        assert "t" not in got, got
        wall = time.time()
        c.kill(3)
        t.join(40)
        c.wait(40)
        hist = lab.pcmk_run(1, lab.stonith_admin, "--history", "cn3", "--output-as", "xml")
        status = storaged("fence", "status", "cn3", directory=san_dir, check=False)
        login = login_from(lab, 3, lab.addr(SAN), ISCSI_PORT, cn3)
    finally:
        if holder is not None:
            holder.close()
        if c is not None:
            c.stop()
        lab.close()
    assert "lock" in got, (got, c.outputs())
    events = [e for e in parse_fence_history(hist.stdout, "cn3") if e[1] == "success"]
    assert events and events[0][0] in ("off", "reboot") and events[0][2] >= int(wall), \
        hist.stdout
    assert status.returncode == 2, status  # fence_storaged's status: fenced
    assert login == "refused 0x0202", login  # the fenced node's I/O is refused
    check_safety(c.events(), c.death_times())
