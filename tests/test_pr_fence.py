"""Persistent reservations against a real daemon over TCP.

* the fence_scsi sequence, as pacemaker runs it on a shared LUN, replayed
  with three initiator sessions;
* APTPL: registrations and the reservation survive SIGTERM and SIGKILL
  restarts when asked for, and are gone without APTPL;
* ``storaged pr ls`` / ``storaged pr clear``, live and offline.
"""

from __future__ import annotations

import json
import struct

import pytest

from tests.support import DEMO_IQN, Daemon, free_port, running, storaged
from tests.tcp_initiator import TcpInitiator

GOOD, CHECK_CONDITION, CONFLICT = 0x00, 0x02, 0x18
WERO = 5
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, RIEK = range(7)
APTPL = 0x01

# fence_scsi keys: 4 hex digits of the cluster name's hash + the node id.
KEY = {1: 0x7A3B0001, 2: 0x7A3B0002, 3: 0x7A3B0003}


def node_name(n: int) -> str:
    return f"iqn.2026-11.test.cluster:node{n}"


class Node:
    """One cluster node's iSCSI session, with the sg_persist calls fence_scsi makes."""

    def __init__(self, port: int, n: int, isid: int | None = None) -> None:
        self.n = n
        self.isid = isid if isid is not None else 0x23D000000000 + n
        self.ini = TcpInitiator("127.0.0.1", port, name=node_name(n), isid=self.isid)
        self.ini.login(DEMO_IQN)
        self.seen_ua = self.turs()

    @property
    def port_name(self) -> str:
        return f"{node_name(self.n)},i,0x{self.isid:012x}"

    def turs(self) -> list[tuple[int, int]]:
        """sg_turs until GOOD (fence_scsi's reset_dev); the unit attentions seen."""
        seen = []
        for _ in range(10):
            status, _data, sense = self.ini.command(bytes(6))
            if status == GOOD:
                return seen
            assert status == CHECK_CONDITION and sense[2] & 0x0F == 6, (status, sense)
            seen.append((sense[12], sense[13]))
        raise AssertionError("unit attentions never end")

    def prout(self, sa: int, key: int = 0, sark: int = 0, ptype: int = 0,
              flags: int = 0) -> int:
        body = struct.pack(">QQ4xBxxx", key, sark, flags)
        cdb = struct.pack(">BBBxxIB", 0x5F, sa, ptype, len(body), 0)
        status, _data, _sense = self.ini.command(cdb, data=body)
        return status

    def prin(self, sa: int) -> bytes:
        status, data, sense = self.ini.command(struct.pack(">BB5xHB", 0x5E, sa, 8192, 0),
                                               read_len=8192)
        assert status == GOOD, (status, sense)
        return data

    def read_keys(self) -> list[int]:
        """sg_persist -n -i -k"""
        d = self.prin(0)
        n = struct.unpack(">I", d[4:8])[0]
        return [struct.unpack(">Q", d[8 + i:16 + i])[0] for i in range(0, n, 8)]

    def read_reservation(self) -> tuple[int, int] | None:
        """sg_persist -n -i -r: (key, type) or None."""
        d = self.prin(1)
        if struct.unpack(">I", d[4:8])[0] == 0:
            return None
        return struct.unpack(">Q", d[8:16])[0], d[21] & 0x0F

    def holder_port(self) -> str | None:
        """Initiator port of the reservation holder, from READ FULL STATUS."""
        d = self.prin(3)
        pos = 8
        while pos < len(d):
            flags, tlen = d[pos + 12], struct.unpack(">I", d[pos + 20:pos + 24])[0]
            if flags & 0x01:
                return d[pos + 28:pos + 24 + tlen].split(b"\0")[0].decode()
            pos += 24 + tlen
        return None

    def write(self, lba: int = 0) -> int:
        return self.ini.write10(lba, bytes([self.n]) * 512)[0]

    def read(self, lba: int = 0) -> int:
        return self.ini.read10(lba, 1)[0]

    def register(self, flags: int = 0) -> None:
        """fence_scsi register_dev: RIEK, and PREEMPT our own key when it was
        already registered (possibly through an older I_T nexus), then
        register again if that removed our new registration."""
        key = KEY[self.n]
        self.turs()
        existed = key in self.read_keys()
        assert self.prout(RIEK, sark=key, flags=flags) == GOOD
        if existed:
            self.turs()
            assert self.prout(PREEMPT, key=key, sark=key, ptype=WERO) == GOOD
            res = self.read_reservation()
            if res is None or res[0] != key:
                assert self.prout(RIEK, sark=key, flags=flags) == GOOD
        assert key in self.read_keys()

    def unfence(self) -> None:
        """fence_scsi "on": register, and reserve if nobody holds a reservation."""
        self.register()
        if self.read_reservation() is None:
            self.turs()
            assert self.prout(RESERVE, key=KEY[self.n], ptype=WERO) == GOOD

    def fence(self, victim: int, abort: bool = True) -> None:
        """fence_scsi "off" run on this node against ``victim``."""
        self.turs()
        assert KEY[victim] in self.read_keys()
        sa = PREEMPT_ABORT if abort else PREEMPT
        assert self.prout(sa, key=KEY[self.n], sark=KEY[victim], ptype=WERO) == GOOD

    def drop(self) -> None:
        """The node dies: its connection goes away without a logout."""
        self.ini.close()


def test_fence_scsi_replay(tmp_path):
    with running(str(tmp_path / "d")) as d:
        nodes = {n: Node(d.port, n) for n in (1, 2, 3)}
        for n in (1, 2, 3):
            nodes[n].unfence()
        # Node 1 unfenced first and holds the type 5 (WE-RO) reservation.
        for node in nodes.values():
            assert node.read_keys() == [KEY[1], KEY[2], KEY[3]]
            assert node.read_reservation() == (KEY[1], WERO)
            assert node.write() == GOOD
        assert nodes[2].holder_port() == nodes[1].port_name

        # Node 3 misbehaves: node 1 fences it with PREEMPT AND ABORT.
        nodes[1].fence(3)
        assert nodes[3].turs() == [(0x2A, 0x05)]          # REGISTRATIONS PREEMPTED
        assert nodes[3].write() == CONFLICT
        assert nodes[3].read() == GOOD                    # WE-RO: reads stay allowed
        assert nodes[3].prout(RESERVE, key=KEY[3], ptype=WERO) == CONFLICT
        assert nodes[2].read_keys() == [KEY[1], KEY[2]]
        assert nodes[2].read_reservation() == (KEY[1], WERO)   # the reservation stays
        assert nodes[2].turs() == []                      # bystanders hear nothing
        assert nodes[1].write() == GOOD and nodes[2].write() == GOOD

        # Node 3 reboots: a new session (new ISID) registers again and may write.
        nodes[3].drop()
        nodes[3] = Node(d.port, 3, isid=0x23D0000000F3)
        assert nodes[3].write() == CONFLICT
        nodes[3].unfence()
        assert nodes[3].write() == GOOD
        assert nodes[3].read_keys() == [KEY[1], KEY[2], KEY[3]]
        assert nodes[3].read_reservation() == (KEY[1], WERO)

        # Node 1 (the holder) reboots: its old I_T nexus stays registered and
        # holds the reservation; the new session registers the same key and
        # PREEMPTs it, which moves the reservation to the new nexus.
        nodes[1].drop()
        nodes[1] = Node(d.port, 1, isid=0x23D0000000F1)
        assert nodes[1].read_reservation() == (KEY[1], WERO)
        nodes[1].unfence()
        assert sorted(nodes[1].read_keys()) == [KEY[1], KEY[2], KEY[3]]
        assert nodes[1].read_reservation() == (KEY[1], WERO)
        assert nodes[2].holder_port() == nodes[1].port_name
        assert nodes[1].write() == GOOD

        # Node 2 reboots while node 1 holds the reservation: PREEMPT with its
        # own key removes the stale registration and its new one; it
        # registers again.
        nodes[2].drop()
        nodes[2] = Node(d.port, 2, isid=0x23D0000000F2)
        nodes[2].unfence()
        assert sorted(nodes[2].read_keys()) == [KEY[1], KEY[2], KEY[3]]
        assert nodes[2].read_reservation() == (KEY[1], WERO)
        assert nodes[2].write() == GOOD

        # Plain PREEMPT fences too.
        nodes[2].fence(3, abort=False)
        nodes[3].turs()
        assert nodes[3].write() == CONFLICT
        for node in nodes.values():
            node.ini.close()


def _setup_reservation(port: int, flags: int) -> None:
    n1, n2 = Node(port, 1), Node(port, 2)
    assert n2.prout(RIEK, sark=KEY[2], flags=flags) == GOOD
    assert n1.prout(RIEK, sark=KEY[1], flags=flags) == GOOD
    assert n1.prout(RESERVE, key=KEY[1], ptype=WERO) == GOOD
    n1.ini.logout()
    n2.ini.logout()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_aptpl_survives_restart(tmp_path, how):
    directory = str(tmp_path / "d")
    port = free_port()
    d = Daemon(directory, port).start()
    try:
        _setup_reservation(port, APTPL)
        if how == "sigkill":
            d.kill()
        d.stop()
        d = Daemon(directory, port).start()
        n1, n3 = Node(port, 1), Node(port, 3)
        assert n3.read_keys() == [KEY[2], KEY[1]]
        assert n3.read_reservation() == (KEY[1], WERO)
        assert n1.write() == GOOD                      # same ISID: still the holder
        assert n3.write() == CONFLICT
        caps = n3.prin(2)
        assert caps[3] & 0x01                          # PTPL_A: APTPL is active
        # Dropping APTPL (the next registration without it) forgets it all on restart.
        assert n1.prout(REGISTER, key=KEY[1], sark=KEY[1]) == GOOD
        n1.ini.logout()
        n3.ini.logout()
        d.stop()
        d = Daemon(directory, port).start()
        n3 = Node(port, 3)
        assert n3.read_keys() == []
        assert n3.read_reservation() is None
        assert n3.write() == GOOD
        n3.ini.logout()
    finally:
        d.stop()


def test_without_aptpl_restart_forgets(tmp_path):
    directory = str(tmp_path / "d")
    port = free_port()
    d = Daemon(directory, port).start()
    try:
        _setup_reservation(port, 0)
        d.stop()
        d = Daemon(directory, port).start()
        n3 = Node(port, 3)
        assert n3.read_keys() == []
        assert n3.read_reservation() is None
        assert n3.write() == GOOD
        n3.ini.logout()
    finally:
        d.stop()


@pytest.mark.slow
def test_pr_cli_live_and_offline(tmp_path):
    directory = str(tmp_path / "d")
    port = free_port()
    with running(directory, port):
        _setup_reservation(port, APTPL)
        out = storaged("pr", "ls", directory=directory).stdout
        assert "Write Exclusive - Registrants Only (type 5)" in out
        assert f"0x{KEY[1]:016x}  {node_name(1)},i,0x23d000000001" in out
        assert "[holder]" in out and "APTPL on" in out and "lun0 of " + DEMO_IQN in out
        data = json.loads(storaged("pr", "ls", "demo", "--json", directory=directory).stdout)
        assert data["live"] is True
        [b] = data["backstores"]
        assert [r["key"] for r in b["registrations"]] == [f"0x{KEY[2]:016x}",
                                                          f"0x{KEY[1]:016x}"]
        assert b["reservation"]["type"] == WERO
        assert b["reservation"]["holder"]["initiator"] == f"{node_name(1)},i,0x23d000000001"
        bad = storaged("pr", "clear", "nope", directory=directory, check=False)
        assert bad.returncode == 1 and "nope" in bad.stderr
        # Clear live: the reservation is gone at once and initiators hear about it.
        n1 = Node(port, 1)
        r = storaged("pr", "clear", "demo", directory=directory)
        assert "cleared 2 registrations and its reservation" in r.stdout
        assert n1.turs() == [(0x2A, 0x03)]               # RESERVATIONS PREEMPTED
        assert n1.read_keys() == [] and n1.read_reservation() is None
        n1.ini.logout()
        # Set it up again for the offline half.
        _setup_reservation(port, APTPL)
    # Daemon stopped: pr ls shows the saved APTPL state, pr clear deletes it.
    out = storaged("pr", "ls", directory=directory).stdout
    assert "saved APTPL state" in out and "registrations (2)" in out
    r = storaged("pr", "clear", "demo", directory=directory)
    assert "cleared 2 registrations and its reservation" in r.stdout
    out = storaged("pr", "ls", directory=directory).stdout
    assert "registrations (0)" in out and "reservation: none" in out
    with running(directory, port):
        n3 = Node(port, 3)
        assert n3.read_keys() == [] and n3.write() == GOOD
        n3.ini.logout()


def test_preempt_and_abort_aborts_in_flight_task(tmp_path):
    from storaged.iscsi.pdu import Op, build

    with running(str(tmp_path / "d")) as d:
        n1 = Node(d.port, 1)
        n1.unfence()
        victim = TcpInitiator("127.0.0.1", d.port, name=node_name(3), isid=0x23D000000033)
        victim.login(DEMO_IQN, params={"InitialR2T": "Yes", "ImmediateData": "No"})
        victim.clear_unit_attentions()
        assert victim.command(struct.pack(">BBBxxIB", 0x5F, RIEK, 0, 24, 0),
                              data=struct.pack(">QQ4xBxxx", 0, KEY[3], 0))[0] == GOOD
        # A WRITE that waits for its data (R2T outstanding) when the fence hits.
        itt = 0x777
        hdr = bytearray(build(Op.SCSI_CMD, flags=0xA1, itt=itt, w20=512, w24=victim.cmdsn))
        hdr[32:42] = struct.pack(">BBIBHB", 0x2A, 0, 9, 0, 1, 0)
        victim.cmdsn += 1
        victim.send(bytes(hdr))
        r2t = victim.recv()
        assert r2t.opcode == Op.R2T and r2t.itt == itt
        n1.fence(3)
        # Its data arrives after the abort: discarded, no status for the task.
        victim.send(build(Op.DATA_OUT, flags=0x80, data_len=512, itt=itt, w20=r2t.w20),
                    b"\x33" * 512)
        victim.send(build(Op.NOP_OUT, flags=0x80, itt=0x888, w20=0xFFFFFFFF,
                          w24=victim.cmdsn, immediate=True))
        pdu = victim.recv()
        assert pdu.opcode == Op.NOP_IN and pdu.itt == 0x888, pdu
        assert n1.ini.read10(9, 1)[1] == bytes(512)  # the aborted write never happened
        victim.close()
        n1.ini.close()
