"""Asynchronous O_DIRECT I/O in the iSCSI shell (storaged.iscsi.direct), against the daemon.

Commands are pipelined over one raw TCP session, the way an initiator at a
deep queue sends them: the WRITEs' disk accesses go to the pool, and what
comes after them for the same LU (COMPARE AND WRITE, READs, SYNCHRONIZE
CACHE) must see their data; statuses are only sent once the data is in the
file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import threading
import time

import pytest

from storaged.block import aio
from storaged.block.base import BlockDeviceError
from storaged.block.file import FileBlockDevice
from storaged.iscsi.pdu import Op
from storaged.iscsi.server import IscsiServer
from storaged.iscsi.target import Registry, TargetContext
from storaged.metrics import LunMeter
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget
from tests.scsi_util import parse_sense, wwn
from tests.support import direct_target, free_port, running
from tests.tcp_initiator import TcpInitiator

IQN = "iqn.2026-11.org.storaged:direct-async"
BS = 512


@pytest.fixture
def direct_daemon(tmp_path):
    """``storaged serve`` with one 8 MiB O_DIRECT LUN: (port, backing file)."""
    backing = str(tmp_path / "direct.img")
    state = str(tmp_path / "state")
    port = free_port()
    direct_target(state, IQN, backing, "8M", port)
    with running(state, port, demo=False) as d:
        yield port, backing
    assert "Traceback" not in d.output()


def _send(ini: TcpInitiator, cdb: bytes, read_len: int = 0, data: bytes = b"",
          queue: list[bytes] | None = None) -> int:
    """A pipelined command: all its data must go as immediate data."""
    assert len(data) <= min(ini.first_burst, ini.mrdsl)
    return ini.start(cdb, read_len, data, queue=queue)


def _collect(ini: TcpInitiator, itts: list[int]) -> dict[int, tuple[int, bytes, bytes]]:
    """Responses of the given commands, in whatever order they come."""
    got: dict[int, bytearray] = {}
    out: dict[int, tuple[int, bytes, bytes]] = {}
    while len(out) < len(itts):
        pdu = ini.recv()
        if pdu.opcode == Op.NOP_IN:
            continue
        itt = pdu.itt
        if pdu.opcode == Op.DATA_IN:
            buf = got.setdefault(itt, bytearray())
            buf[pdu.w40:pdu.w40 + len(pdu.data)] = pdu.data
            if pdu.flags & 0x01:
                out[itt] = (pdu.b3, bytes(buf), b"")
        elif pdu.opcode == Op.SCSI_RSP:
            sense = b""
            if pdu.data:
                n = struct.unpack(">H", pdu.data[:2])[0]
                sense = bytes(pdu.data[2:2 + n])
            out[itt] = (pdu.b3, bytes(got.get(itt, b"")), sense)
        else:
            raise AssertionError(f"unexpected PDU {pdu!r}")
    return out


def _read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def _write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def test_pipelined_writes_then_caw_reads_and_sync(direct_daemon):
    port, backing = direct_daemon
    rnd = random.Random(7)
    ini = TcpInitiator("127.0.0.1", port)
    try:
        ini.login(IQN)
        ini.clear_unit_attentions()
        nblocks = 8 << 20 >> 9
        lbas = rnd.sample(range(0, nblocks - 8, 8), 32)
        payloads = [rnd.randbytes(8 * BS) for _ in lbas]
        q: list[bytes] = []      # sent in one go: the target reads them in batches
        writes = [_send(ini, _write10(lba, 8), data=p, queue=q)
                  for lba, p in zip(lbas, payloads, strict=True)]
        bad = _send(ini, _write10(nblocks - 4, 8), data=bytes(8 * BS), queue=q)  # past the end
        # COMPARE AND WRITE of the first block of the last WRITE (most likely
        # in the same socket read): it compares against that WRITE's data, so
        # it must wait until the data is in the file.
        new_block = rnd.randbytes(BS)
        caw_cdb = struct.pack(">BBQ3sBBB", 0x89, 0, lbas[-1], bytes(3), 1, 0, 0)
        caw = _send(ini, caw_cdb, data=payloads[-1][:BS] + new_block, queue=q)
        reads = [_send(ini, _read10(lba, 8), read_len=8 * BS, queue=q) for lba in lbas]
        sync = _send(ini, bytes([0x35]) + bytes(9), queue=q)
        ini.sock.sendall(b"".join(q))
        res = _collect(ini, [*writes, bad, caw, *reads, sync])
        for itt in writes:
            assert res[itt][0] == 0, res[itt]
        status, _data, sense = res[bad]
        s = parse_sense(sense)
        assert status == 0x02 and (s["key"], s["asc"]) == (0x05, 0x21), s   # LBA out of range
        assert res[caw][0] == 0, res[caw]
        assert res[sync][0] == 0, res[sync]
        expect = [*payloads[:-1], new_block + payloads[-1][BS:]]
        for itt, want in zip(reads, expect, strict=True):
            assert res[itt][0] == 0 and res[itt][1] == want
        with open(backing, "rb") as f:
            for lba, want in zip(lbas, expect, strict=True):
                f.seek(lba * BS)
                assert f.read(8 * BS) == want
        # A COMPARE AND WRITE that no longer matches reports the offset of the
        # first differing byte (SBC-3 §5.2), after the queued WRITEs.
        q = []
        more = [_send(ini, _write10(lba, 8), data=bytes(8 * BS), queue=q) for lba in lbas[-4:]]
        caw2 = _send(ini, caw_cdb, data=new_block + bytes(BS), queue=q)
        ini.sock.sendall(b"".join(q))
        res = _collect(ini, [*more, caw2])
        assert all(res[i][0] == 0 for i in more)
        status, _data, sense = res[caw2]
        s = parse_sense(sense)
        assert status == 0x02 and s["key"] == 0x0E, s   # MISCOMPARE
        first = next(i for i in range(BS) if new_block[i] != 0)
        assert s["valid"] and s["info"] == first
        ini.logout()
    finally:
        ini.close()


def test_pipelined_reads_of_many_sessions_match_the_file(direct_daemon):
    port, backing = direct_daemon
    rnd = random.Random(11)
    content = rnd.randbytes(8 << 20)
    with open(backing, "r+b") as f:
        f.write(content)
    sessions = []
    try:
        for i in range(3):
            ini = TcpInitiator("127.0.0.1", port, isid=0x23D000000100 + i)
            ini.login(IQN)
            ini.clear_unit_attentions()
            sessions.append(ini)
        sent: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in range(3)}
        for _round in range(4):       # the sessions' commands interleave at the target
            for i, ini in enumerate(sessions):
                lbas = [rnd.randrange(0, (8 << 20 >> 9) - 16) for _ in range(24)]
                q: list[bytes] = []
                sent[i][0].extend(lbas)
                sent[i][1].extend(_send(ini, _read10(lba, 16), read_len=16 * BS, queue=q)
                                  for lba in lbas)
                ini.sock.sendall(b"".join(q))
        for i, ini in enumerate(sessions):
            lbas, itts = sent[i]
            res = _collect(ini, itts)
            for lba, itt in zip(lbas, itts, strict=True):
                assert res[itt][0] == 0
                assert res[itt][1] == content[lba * BS:(lba + 16) * BS]
    finally:
        for ini in sessions:
            ini.close()


# ------------------------------------------------------ in-process, slow disk
class _SlowAio(aio.ThreadAio):
    """The reference AIO context with a slow disk behind it (writes take
    50 ms, or fail), so the order of what the shell does around them can be
    observed."""

    delay = 0.05
    fail = False

    def _run(self, op: int, fd: int, offset: int, buf, tag) -> None:  # noqa: ANN001
        time.sleep(self.delay)
        if op == aio.WRITE and self.fail:
            with self._lock:
                self._done.append((tag, -errno.EIO))
            os.eventfd_write(self._efd, 1)
            return
        super()._run(op, fd, offset, buf, tag)


class _FailingDisk(FileBlockDevice):
    fail = False

    def write_pending(self, entry) -> None:  # noqa: ANN001
        if self.fail:
            raise BlockDeviceError(errno.EIO, "injected write error")
        super().write_pending(entry)


class _CountingAio(aio.ThreadAio):
    """The reference AIO context, noting how many operations each submit carries."""

    submits: list[int] = []

    def submit(self, ops) -> None:  # noqa: ANN001
        ops = list(ops)
        self.submits.append(len(ops))
        super().submit(ops)


@pytest.fixture
def slow_target(tmp_path, monkeypatch):
    """storaged's iSCSI shell in this process (a thread with its own event
    loop) serving one O_DIRECT LU through a _SlowAio context."""
    yield from _in_process_target(tmp_path, monkeypatch, _SlowAio, None)


@pytest.fixture
def quick_target(tmp_path, monkeypatch):
    """As slow_target, with the quick path on (a meter, as the daemon has) and a
    fast _CountingAio context."""
    _CountingAio.submits = []
    yield from _in_process_target(tmp_path, monkeypatch, _CountingAio, LunMeter)


@pytest.fixture
def quick_slow_target(tmp_path, monkeypatch):
    """slow_target with the quick path on."""
    yield from _in_process_target(tmp_path, monkeypatch, _SlowAio, LunMeter)


def _in_process_target(tmp_path, monkeypatch, context, meter):  # noqa: ANN001, ANN202
    monkeypatch.setattr(aio, "Aio", context)
    _SlowAio.fail = False
    port = free_port()
    dev = _FailingDisk(str(tmp_path / "slow.img"), create_size=4 << 20, direct=True)
    lu = LogicalUnit(dev, name="slow", serial="SN-SLOW", wwn=wwn(9), physical_block_size=BS)
    scsi = ScsiTarget(IQN)
    scsi.set_luns({0: lu})
    registry = Registry()
    registry.targets[IQN] = TargetContext(IQN, scsi, portals=[("127.0.0.1", port)],
                                          open_access=True)
    server = IscsiServer(registry, lambda s, cmd, _name: s.execute(cmd), meter=meter)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.set_portals({("127.0.0.1", port)}))
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.shutdown(grace=0.1))
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port, dev
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        dev.close()


def test_commands_wait_for_writes_in_flight(slow_target):
    port, dev = slow_target
    ini = TcpInitiator("127.0.0.1", port)
    try:
        ini.login(IQN)
        ini.clear_unit_attentions()
        data = [bytes([i + 1]) * (4 * BS) for i in range(8)]
        q: list[bytes] = []
        writes = [_send(ini, _write10(4 * i, 4), data=d, queue=q) for i, d in enumerate(data)]
        ini.sock.sendall(b"".join(q))
        time.sleep(0.01)    # the WRITEs are now at the (slow) disk
        # A COMPARE AND WRITE sent meanwhile runs once their data is in the file.
        caw_cdb = struct.pack(">BBQ3sBBB", 0x89, 0, 0, bytes(3), 1, 0, 0)
        caw = _send(ini, caw_cdb, data=data[0][:BS] + b"N" * BS)
        read = _send(ini, _read10(0, 8), read_len=8 * BS)
        res = _collect(ini, [*writes, caw, read])
        assert all(res[i][0] == 0 for i in writes)
        assert res[caw][0] == 0, parse_sense(res[caw][2])
        assert res[read][1] == b"N" * BS + data[0][BS:] + data[1]
    finally:
        ini.close()


@pytest.mark.parametrize("target", ["slow_target", "quick_slow_target"])
def test_a_failed_write_is_never_acknowledged(target, request):
    port, dev = request.getfixturevalue(target)
    ini = TcpInitiator("127.0.0.1", port)
    try:
        ini.login(IQN)
        ini.clear_unit_attentions()
        dev.fail = _SlowAio.fail = True      # the write and its retry fail
        q: list[bytes] = []
        writes = [_send(ini, _write10(8 * i, 4), data=b"x" * (4 * BS), queue=q)
                  for i in range(4)]
        ini.sock.sendall(b"".join(q))
        acked = []
        with pytest.raises(ConnectionError):   # not a time-out: the connection is dropped
            while True:   # the target drops the connection instead of answering GOOD
                pdu = ini.recv()
                if pdu.opcode == Op.SCSI_RSP and pdu.itt in writes and pdu.b3 == 0:
                    acked.append(pdu.itt)
        if target == "slow_target":
            assert not acked
        else:
            # On the quick path the first WRITE found the LU idle and ran inline (its
            # write did not fail); the others went to the failing disk (aio_write).
            assert set(acked) <= {writes[0]}
    finally:
        ini.close()


def test_quick_reads_parsed_together_are_submitted_together(quick_target):
    port, dev = quick_target
    content = random.Random(5).randbytes(4 << 20)
    with open(dev.path, "r+b") as f:
        f.write(content)
    ini = TcpInitiator("127.0.0.1", port)
    try:
        ini.login(IQN)
        ini.clear_unit_attentions()
        lbas = [64 * i for i in range(16)]
        q: list[bytes] = []
        itts = [_send(ini, _read10(lba, 8), read_len=8 * BS, queue=q) for lba in lbas]
        ini.sock.sendall(b"".join(q))    # one burst: parsed in one pass or a few
        res = _collect(ini, itts)
        for lba, itt in zip(lbas, itts, strict=True):
            assert res[itt][0] == 0
            assert res[itt][1] == content[lba * BS:(lba + 8) * BS]
        # The first READ arrives alone on an idle LU and runs inline; the others
        # went to the context, several per submit.
        submits = _CountingAio.submits
        assert sum(submits) >= 15 and len(submits) < sum(submits), submits
    finally:
        ini.close()

