"""One LU served by two storage nodes: persistent reservations are one state.

Two real ``storaged serve`` daemons on 127.0.0.1 form a two-node cluster
(membership + DLM in each daemon) and export the same image file as a
``shared`` backstore with the same WWN and serial, through targets with
different TPGTs on different ports.  Initiator sessions (our TCP initiator,
and libiscsi's iscsi-test-cu with one URL per node) send their PR commands
through either node; every change must hold on both before GOOD.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.support import require_tool, storaged
from tests.tcp_initiator import TcpInitiator

IQN = "iqn.2026-12.test.spr:lu"
GOOD, CHECK_CONDITION, CONFLICT = 0x00, 0x02, 0x18
WERO = 5
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, RIEK = range(7)
APTPL, ALL_TG_PTS = 0x01, 0x04
KEY = {1: 0x7A3B0001, 2: 0x7A3B0002, 3: 0x7A3B0003}


def free_ports(n: int) -> list[int]:
    """``n`` free ports of this helper's range (48000-48999), spread by pid."""
    out: list[int] = []
    start = 48000 + (os.getpid() * 37) % 900
    for i in range(1000):
        port = 48000 + (start - 48000 + i) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise AssertionError("no free ports in 48000-48999")


class StorageNode:
    """One storaged daemon of the pair."""

    def __init__(self, directory: str, node_id: int, port: int) -> None:
        self.dir = directory
        self.id = node_id
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(directory, "daemon.log")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return storaged(*args, directory=self.dir, check=check)

    def start(self) -> None:
        logf = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([sys.executable, "-m", "storaged", "--dir", self.dir,
                                      "serve"], stdout=logf, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, STORAGED_LOG="INFO"))
        logf.close()

    def wait_serving(self, timeout: float = 40.0) -> None:
        """Portals open only once the node caught up with the group."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.id} exited:\n{self.output()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0 and \
                        os.path.exists(os.path.join(self.dir, "control.sock")):
                    return
            time.sleep(0.1)
        raise AssertionError(f"node {self.id} does not serve:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def output(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")


def _configure(tmp: str) -> tuple[StorageNode, StorageNode]:
    cports = free_ports(4)
    a = StorageNode(os.path.join(tmp, "a"), 1, cports[2])
    b = StorageNode(os.path.join(tmp, "b"), 2, cports[3])
    members = [f"--node=1=127.0.0.1:{cports[0]}", f"--node=2=127.0.0.1:{cports[1]}"]
    image = os.path.join(tmp, "shared.img")
    a.cli("backstore", "create", "lu0", image, "--size", "16M", "--shared")
    a.cli("target", "create", IQN, "--portal", f"127.0.0.1:{a.port}")
    a.cli("lun", "add", IQN, "lu0", "--lun", "0")
    a.cli("target", "open", IQN)
    saved = os.path.join(tmp, "a.json")
    a.cli("config", "save", saved)
    # Node B: the same backstore (path, WWN, serial) and target, its own portal and TPGT.
    with open(saved) as f:
        cfg = json.load(f)
    cfg["targets"][0]["portals"] = [f"127.0.0.1:{b.port}"]
    cfg["targets"][0]["tpgt"] = 2
    cfg["cluster"] = cfg["cluster_node"] = None
    with open(os.path.join(tmp, "b.json"), "w") as f:
        json.dump(cfg, f)
    b.cli("config", "restore", os.path.join(tmp, "b.json"))
    # Each node's ports are their own target port group; the peer's group is remote.
    a.cli("alua", "group", "create", "10", "--port", f"{IQN},1")
    a.cli("alua", "group", "create", "20", "--remote", "--port", f"{IQN},2")
    b.cli("alua", "group", "create", "20", "--port", f"{IQN},2")
    b.cli("alua", "group", "create", "10", "--remote", "--port", f"{IQN},1")
    for n in (a, b):
        n.cli("cluster", "init", "spr", f"--id={n.id}", *members, "--token-ms=500",
              "--fencer=test", "--two-node")
    return a, b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("spr"))
    a, b = _configure(tmp)
    try:
        a.start()
        b.start()
        a.wait_serving()
        b.wait_serving()
        yield a, b
    finally:
        a.stop()
        b.stop()
    for n in (a, b):
        assert "Traceback" not in n.output(), n.output()[-5000:]


@pytest.fixture
def nodes(pair):
    """The pair with the LU's reservations cleared (through node A, so on both)."""
    a, b = pair
    r = a.cli("pr", "clear", "lu0")
    assert "cleared" in r.stdout
    return a, b


class Path:
    """One host's session to one node (an I_T nexus), with sg_persist-like calls."""

    def __init__(self, node: StorageNode, host: int, isid: int | None = None,
                 **login) -> None:
        self.host = host
        self.isid = isid if isid is not None else 0x23D000000000 + host * 16 + node.id
        self.ini = TcpInitiator("127.0.0.1", node.port,
                                name=f"iqn.2026-12.test.spr:host{host}", isid=self.isid)
        self.ini.login(IQN, **login)
        self.turs()

    def turs(self) -> list[tuple[int, int]]:
        seen = []
        for _ in range(10):
            status, _d, sense = self.ini.command(bytes(6))
            if status == GOOD:
                return seen
            assert status == CHECK_CONDITION and sense[2] & 0x0F == 6, (status, sense)
            seen.append((sense[12], sense[13]))
        raise AssertionError("unit attentions never end")

    def prout(self, sa: int, key: int = 0, sark: int = 0, ptype: int = 0,
              flags: int = 0) -> int:
        body = struct.pack(">QQ4xBxxx", key, sark, flags)
        cdb = struct.pack(">BBBxxIB", 0x5F, sa, ptype, len(body), 0)
        return self.ini.command(cdb, data=body)[0]

    def prin(self, sa: int) -> bytes:
        status, data, sense = self.ini.command(struct.pack(">BB5xHB", 0x5E, sa, 8192, 0),
                                               read_len=8192)
        assert status == GOOD, (status, sense)
        return data

    def read_keys(self) -> tuple[int, list[int]]:
        """(PRgeneration, keys)"""
        d = self.prin(0)
        gen, n = struct.unpack(">II", d[:8])
        return gen, sorted(struct.unpack(">Q", d[8 + i:16 + i])[0] for i in range(0, n, 8))

    def read_reservation(self) -> tuple[int, tuple[int, int] | None]:
        """(PRgeneration, (key, type) or None)"""
        d = self.prin(1)
        gen, n = struct.unpack(">II", d[:8])
        return gen, (struct.unpack(">Q", d[8:16])[0], d[21] & 0x0F) if n else None

    def write(self, lba: int = 0) -> int:
        return self.ini.write10(lba, bytes([self.host]) * 512)[0]

    def read(self, lba: int = 0) -> tuple[int, bytes]:
        status, data, _ = self.ini.read10(lba, 1)
        return status, data

    def inquiry(self, page: int) -> bytes:
        status, data, _ = self.ini.command(struct.pack(">BBBHB", 0x12, 1, page, 1024, 0),
                                           read_len=1024)
        assert status == GOOD
        return data

    def close(self) -> None:
        self.ini.close()


def agree(*paths: Path) -> tuple[tuple[int, list[int]], tuple[int, tuple[int, int] | None]]:
    """READ KEYS and READ RESERVATION through every path give the same answer."""
    keys = {p.read_keys().__repr__() for p in paths}
    res = {p.read_reservation().__repr__() for p in paths}
    assert len(keys) == 1 and len(res) == 1, (keys, res)
    return paths[0].read_keys(), paths[0].read_reservation()


def designators(vpd83: bytes) -> list[tuple[int, int, bytes]]:
    """(association, type, identifier) of each VPD 83h designator."""
    out, pos, end = [], 4, 4 + struct.unpack(">H", vpd83[2:4])[0]
    while pos < end:
        assoc, dtype, n = (vpd83[pos + 1] >> 4) & 3, vpd83[pos + 1] & 0x0F, vpd83[pos + 3]
        out.append((assoc, dtype, vpd83[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def rtpg(p: Path) -> dict[int, list[int]]:
    """REPORT TARGET PORT GROUPS: group id -> relative target port ids."""
    status, d, _ = p.ini.command(struct.pack(">BBxxxxIxx", 0xA3, 0x0A, 1024), read_len=1024)
    assert status == GOOD
    groups, pos, end = {}, 4, 4 + struct.unpack(">I", d[:4])[0]
    while pos < end:
        gid, count = struct.unpack(">H", d[pos + 2:pos + 4])[0], d[pos + 7]
        groups[gid] = [struct.unpack(">H", d[pos + 10 + 4 * i:pos + 12 + 4 * i])[0]
                       for i in range(count)]
        pos += 8 + 4 * count
    return groups


# ---------------------------------------------------------------- tests

def test_same_lu_identity_and_own_port_groups(nodes):
    a, b = nodes
    pa, pb = Path(a, 1), Path(b, 1)
    try:
        da, db = designators(pa.inquiry(0x83)), designators(pb.inquiry(0x83))
        lu_a = [(t, v) for assoc, t, v in da if assoc == 0]
        lu_b = [(t, v) for assoc, t, v in db if assoc == 0]
        assert {t for t, _ in lu_a} >= {1, 3}           # T10 vendor id and NAA
        assert lu_a == lu_b
        assert pa.inquiry(0x80)[4:] == pb.inquiry(0x80)[4:]      # unit serial number
        rel = {p: [v for assoc, t, v in d if assoc == 1 and t == 4]
               for p, d in (("a", da), ("b", db))}
        tpg = {p: [v for assoc, t, v in d if assoc == 1 and t == 5]
               for p, d in (("a", da), ("b", db))}
        assert rel == {"a": [(1).to_bytes(4, "big")], "b": [(2).to_bytes(4, "big")]}
        assert tpg == {"a": [(10).to_bytes(4, "big")], "b": [(20).to_bytes(4, "big")]}
        ga, gb = rtpg(pa), rtpg(pb)
        assert ga == gb, (ga, gb)
        assert ga[10] == [1] and ga[20] == [2]
    finally:
        pa.close()
        pb.close()


def test_register_a_reserve_b_preempt_and_abort_from_a(nodes):
    """The issue's acceptance: register through A, reserve through B,
    PREEMPT AND ABORT through A aborts a write in flight on B."""
    from storaged.iscsi.pdu import Op, build

    a, b = nodes
    h1a, h1b = Path(a, 1), Path(b, 1)
    h2b = Path(b, 2)
    victim = Path(b, 3, params={"InitialR2T": "Yes", "ImmediateData": "No"})
    try:
        gen0 = h1a.read_keys()[0]
        assert h1a.prout(RIEK, sark=KEY[1]) == GOOD                 # register via A
        assert h2b.prout(RIEK, sark=KEY[2]) == GOOD                 # and via B
        assert victim.prout(RIEK, sark=KEY[3]) == GOOD
        (gen, keys), res = agree(h1a, h1b, h2b, victim)
        assert keys == [KEY[1], KEY[2], KEY[3]] and res[1] is None and gen == gen0 + 3
        assert h2b.prout(RESERVE, key=KEY[2], ptype=WERO) == GOOD   # reserve via B
        (gen2, _), (_, res) = agree(h1a, h1b, h2b, victim)
        assert res == (KEY[2], WERO) and gen2 == gen               # RESERVE: same generation
        assert h1a.write(5) == GOOD and victim.write(5) == GOOD      # WE-RO: registrants write
        # A WRITE on B waits for its data (R2T outstanding) when A's preempt hits.
        itt = 0x777
        ini = victim.ini
        hdr = bytearray(build(Op.SCSI_CMD, flags=0xA1, itt=itt, w20=512, w24=ini.cmdsn))
        hdr[32:42] = struct.pack(">BBIBHB", 0x2A, 0, 9, 0, 1, 0)
        ini.cmdsn += 1
        ini.send(bytes(hdr))
        r2t = ini.recv()
        assert r2t.opcode == Op.R2T and r2t.itt == itt
        assert h1a.prout(PREEMPT_ABORT, key=KEY[1], sark=KEY[3], ptype=WERO) == GOOD
        # By the time A said GOOD, B aborted the task: its data is discarded, no status.
        ini.send(build(Op.DATA_OUT, flags=0x80, data_len=512, itt=itt, w20=r2t.w20),
                 b"\x33" * 512)
        ini.send(build(Op.NOP_OUT, flags=0x80, itt=0x888, w20=0xFFFFFFFF, w24=ini.cmdsn,
                       immediate=True))
        pdu = ini.recv()
        assert pdu.opcode == Op.NOP_IN and pdu.itt == 0x888, pdu
        assert h1a.read(9) == (GOOD, bytes(512))                     # never written
        assert victim.turs() == [(0x2A, 0x05)]                       # REGISTRATIONS PREEMPTED
        assert victim.write(5) == CONFLICT
        (gen3, keys), (_, res) = agree(h1a, h1b, h2b, victim)
        assert keys == [KEY[1], KEY[2]] and gen3 == gen + 1
        assert res == (KEY[2], WERO)                                 # the holder was not preempted
        assert h2b.turs() == [] and h1b.turs() == []                 # bystanders hear nothing
    finally:
        for p in (h1a, h1b, h2b, victim):
            p.close()


def test_fence_scsi_sequence_across_nodes(nodes):
    """fence_scsi on multipath hosts: each host has a path to each node, and
    its register / reserve / preempt-and-abort go down whichever path."""
    a, b = nodes
    paths = {h: (Path(a, h), Path(b, h)) for h in (1, 2, 3)}
    try:
        gen0 = paths[1][0].read_keys()[0]
        for h, (pa, pb) in paths.items():
            # unfence ("on"): register the key on every path, reserve if nobody does.
            assert pa.prout(RIEK, sark=KEY[h]) == GOOD
            assert pb.prout(RIEK, sark=KEY[h]) == GOOD
            via = pb if h % 2 else pa
            if via.read_reservation()[1] is None:
                assert via.prout(RESERVE, key=KEY[h], ptype=WERO) == GOOD
        every = [p for pp in paths.values() for p in pp]
        (gen, keys), (_, res) = agree(*every)
        assert keys == sorted([KEY[1]] * 2 + [KEY[2]] * 2 + [KEY[3]] * 2)
        assert res == (KEY[1], WERO) and gen == gen0 + 6
        for pa, pb in paths.values():
            assert pa.write(1) == GOOD and pb.write(2) == GOOD
        # fence ("off") host 3 from host 2, through node B.
        assert paths[2][1].prout(PREEMPT_ABORT, key=KEY[2], sark=KEY[3], ptype=WERO) == GOOD
        for p in paths[3]:
            assert p.turs() == [(0x2A, 0x05)]
            assert p.write(3) == CONFLICT
            assert p.read(3)[0] == GOOD                              # WE-RO: reads allowed
        (gen2, keys), (_, res) = agree(*every)
        assert keys == sorted([KEY[1]] * 2 + [KEY[2]] * 2) and gen2 == gen + 1
        assert res == (KEY[1], WERO)
        # the fenced host unfences again through node A only: both nodes let it write.
        assert paths[3][0].prout(RIEK, sark=KEY[3], flags=ALL_TG_PTS) == GOOD
        assert paths[3][0].write(3) == GOOD
        (gen3, keys), _ = agree(*every)
        assert KEY[3] in keys and gen3 == gen2 + 1
    finally:
        for pp in paths.values():
            for p in pp:
                p.close()


def test_release_preempt_and_clear_through_the_other_node(nodes):
    a, b = nodes
    pa, pb = Path(a, 1), Path(b, 2)
    try:
        gen0 = pa.read_keys()[0]
        assert pa.prout(RIEK, sark=KEY[1]) == GOOD
        assert pb.prout(RIEK, sark=KEY[2]) == GOOD
        assert pa.prout(RESERVE, key=KEY[1], ptype=1) == GOOD        # Write Exclusive
        assert pb.write(0) == CONFLICT                               # on B, A's reservation
        assert pb.read(0)[0] == GOOD
        assert pa.prout(RELEASE, key=KEY[1], ptype=1) == GOOD
        assert pb.write(0) == GOOD
        assert agree(pa, pb)[1][1] is None
        # PREEMPT (without abort) through A of the reservation B's host holds.
        assert pb.prout(RESERVE, key=KEY[2], ptype=WERO) == GOOD
        assert pa.prout(PREEMPT, key=KEY[1], sark=KEY[2], ptype=WERO) == GOOD
        assert pb.turs() == [(0x2A, 0x05)]                           # REGISTRATIONS PREEMPTED
        assert pb.write(0) == CONFLICT and pa.write(0) == GOOD
        (gen, keys), (_, res) = agree(pa, pb)
        assert keys == [KEY[1]] and res == (KEY[1], WERO) and gen == gen0 + 3
        # CLEAR through B (registered again) tells A's initiator.
        assert pb.prout(RIEK, sark=KEY[2]) == GOOD
        assert pb.prout(CLEAR, key=KEY[2]) == GOOD
        assert pa.turs() == [(0x2A, 0x03)]                           # RESERVATIONS PREEMPTED
        (gen, keys), (_, res) = agree(pa, pb)
        assert keys == [] and res is None and gen == gen0 + 5
        live = [json.loads(n.cli("pr", "ls", "lu0", "--json").stdout)["backstores"][0]
                for n in (a, b)]
        assert live[0]["generation"] == live[1]["generation"] == gen
        assert live[0]["seq"] == live[1]["seq"]
        assert live[0]["shared"] == live[1]["shared"] == {"synced": True}
        text = b.cli("pr", "ls", "lu0").stdout
        assert f"shared with the cluster's storage nodes: change {live[0]['seq']}, in step" \
            in text, text
    finally:
        pa.close()
        pb.close()


@pytest.mark.peer
def test_libiscsi_pr_and_multipath_over_two_nodes(nodes, tmp_path):
    """iscsi-test-cu with one URL per node: the PR suites and MultipathIO."""
    from tests.test_integration_libiscsi import failed_tests, parse_summary

    tool = require_tool("iscsi-test-cu", "libiscsi-bin")
    a, b = nodes
    urls = [f"iscsi://127.0.0.1:{n.port}/{IQN}/0" for n in (a, b)]
    outs = []
    for test in ("SCSI.Prin*", "SCSI.Prout*", "SCSI.MultipathIO.*"):
        proc = subprocess.run([tool, "--dataloss", f"--test={test}", *urls],
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        outs.append(out)
        (tmp_path / "iscsi-test-cu.log").write_text("\n".join(outs))
        summary = parse_summary(out)
        assert summary["failed"] == 0, f"{test} failed: {failed_tests(out)}\n{out[-3000:]}"
        assert summary["passed"] > 0, out[-2000:]
        assert "Multipath unavailable" not in out, out[-2000:]


def test_aptpl_on_each_node_and_rejoin_catches_up(nodes):
    """APTPL state is saved on both nodes; a node that was down catches up
    with what changed meanwhile before it serves again."""
    a, b = nodes
    pa, pa2 = Path(a, 1), Path(a, 2)
    try:
        gen0 = pa.read_keys()[0]
        assert pa.prout(RIEK, sark=KEY[1], flags=APTPL) == GOOD
        assert pa.prout(RESERVE, key=KEY[1], ptype=WERO) == GOOD
        pb = Path(b, 2)
        assert pb.read_keys() == (gen0 + 1, [KEY[1]])
        pb.close()
        b.stop()
        saved = json.loads(b.cli("pr", "ls", "lu0", "--json").stdout)
        assert saved["live"] is False
        [rec] = saved["backstores"]
        assert [r["key"] for r in rec["registrations"]] == [f"0x{KEY[1]:016x}"]
        assert rec["reservation"]["type"] == WERO and rec["aptpl"]
        # A alone (B fenced by the test fencer) goes on; this change B has not seen.
        deadline = time.monotonic() + 20
        while True:
            status = pa2.prout(RIEK, sark=KEY[2], flags=APTPL)
            if status == GOOD:
                break
            assert time.monotonic() < deadline, "node A never went on alone"
            pa2.turs()
            time.sleep(0.2)
        gen_a = pa.read_keys()[0]
        b.start()
        b.wait_serving()
        pb = Path(b, 2)
        assert pb.read_keys() == (gen_a, [KEY[1], KEY[2]])
        assert pb.read_reservation()[1] == (KEY[1], WERO)
        assert pb.write(0) == CONFLICT      # B's host 2 path is not registered
        pb.close()
    finally:
        pa.close()
        pa2.close()


def test_shared_flag_in_the_cli_and_config(tmp_path):
    d = str(tmp_path / "cfg")
    image = str(tmp_path / "x.img")
    storaged("backstore", "create", "x", image, "--size", "1M", "--shared", directory=d)
    assert "write-back shared  [unused]" in storaged("backstore", "ls", directory=d).stdout
    storaged("backstore", "set", "x", "--not-shared", directory=d)
    assert "write-back  [unused]" in storaged("backstore", "ls", directory=d).stdout
    storaged("backstore", "set", "x", "--shared", directory=d)
    saved = str(tmp_path / "c.json")
    storaged("config", "save", saved, directory=d)
    with open(saved) as f:
        cfg = json.load(f)
    assert cfg["backstores"][0]["shared"] is True
    cfg["backstores"][0]["shared"] = "yes"
    with open(saved, "w") as f:
        json.dump(cfg, f)
    r = storaged("config", "restore", saved, directory=d, check=False)
    assert r.returncode == 1 and "shared" in r.stderr, r.stderr
