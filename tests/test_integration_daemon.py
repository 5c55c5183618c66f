"""The daemon under real TCP sessions: durability across SIGKILL, many sessions,
hostile peers, digests, live config, metrics, reinstatement, shutdown."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import urllib.request

import pytest

from tests.support import DEMO_IQN, free_port, running, storaged
from tests.tcp_initiator import TcpInitiator

BS = 512


def session(port: int, isid: int = 0x23D000000001, **kw) -> TcpInitiator:
    ini = TcpInitiator("127.0.0.1", port, isid=isid)
    ini.login(DEMO_IQN, **kw)
    ini.clear_unit_attentions()
    return ini


def block(lba: int, gen: int) -> bytes:
    return struct.pack(">QQ", lba, gen) * (BS // 16)


def sync_cache(ini: TcpInitiator) -> int:
    status, _d, _s = ini.command(bytes([0x35] + [0] * 9))
    return status


@pytest.mark.slow
def test_acknowledged_durable_writes_survive_sigkill(tmp_path):
    directory = str(tmp_path / "demo")
    port = free_port()
    durable: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(ini: TcpInitiator) -> None:
        pending: dict[int, bytes] = {}
        lba = 0
        try:
            while not stop.is_set():
                data = block(lba, 1)
                fua = lba % 2 == 0
                status, _d, _s = ini.write10(lba, data, fua=fua)
                assert status == 0
                if fua:
                    durable[lba] = data
                else:
                    pending[lba] = data
                if lba % 16 == 15:
                    assert sync_cache(ini) == 0
                    durable.update(pending)
                    pending.clear()
                lba += 1
        except (ConnectionError, OSError):
            pass  # the daemon died under us: expected
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with running(directory, port) as d:
        ini = session(port)
        t = threading.Thread(target=writer, args=(ini,))
        t.start()
        time.sleep(1.5)
        d.kill()
        stop.set()
        t.join(10)
        ini.close()
    assert not errors, errors
    assert len(durable) > 50, "the write stream was too short to mean anything"
    with running(directory, port):
        ini = session(port)
        for lba, data in sorted(durable.items()):
            status, got, _s = ini.read10(lba, 1)
            assert status == 0 and got == data, f"acknowledged LBA {lba} lost"
        ini.logout()


def test_64_sessions_write_and_verify_their_ranges(tmp_path):
    port = free_port()
    errors: list[str] = []
    per = 256  # blocks per session

    def worker(i: int) -> None:
        try:
            ini = session(port, isid=0x23D000100000 + i)
            base = i * per
            for chunk in range(0, per, 32):
                data = b"".join(block(base + chunk + k, i) for k in range(32))
                status, _d, _s = ini.write10(base + chunk, data)
                assert status == 0
            for chunk in range(0, per, 64):
                status, got, _s = ini.read10(base + chunk, 64)
                want = b"".join(block(base + chunk + k, i) for k in range(64))
                assert status == 0 and got == want, f"session {i} read back wrong data"
            ini.logout()
        except BaseException as e:  # noqa: BLE001
            errors.append(f"session {i}: {e!r}")

    with running(str(tmp_path / "demo"), port) as d:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        log = d.output()
    assert not errors, errors[:5]
    assert "Traceback" not in log


def test_hostile_peer_does_not_disturb_other_sessions(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port) as d:
        good = session(port)
        payload = os.urandom(64 * BS)
        assert good.write10(100, payload)[0] == 0
        for junk in (b"\xff" * 48, os.urandom(4096), b"\x01" + b"\x00" * 47 + b"x" * 10):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(junk)
                s.settimeout(5)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
        # A logged-in session that sends an unknown opcode gets a Reject, not a crash.
        bad = session(port, isid=0x23D000000099)
        from storaged.iscsi.pdu import Op, build
        bad.send(build(0x1C, flags=0x80, itt=99))
        assert bad.recv().opcode == Op.REJECT
        status, got, _s = good.read10(100, 64)
        assert status == 0 and got == payload
        good.logout()
        bad.close()
        log = d.output()
    assert "Traceback" not in log


def test_data_and_header_digests(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port):
        ini = session(port, digests=True)
        assert ini.hd and ini.dd
        payload = os.urandom(300 * BS)  # several PDUs, R2T + immediate data
        assert ini.write10(7, payload)[0] == 0
        status, got, _s = ini.read10(7, 300)
        assert status == 0 and got == payload
        ini.logout()


def test_live_lun_add_reported(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port) as d:
        ini = session(port)
        img = str(tmp_path / "second.img")
        storaged("backstore", "create", "second", img, "--size", "16M", directory=d.directory)
        storaged("lun", "add", DEMO_IQN, "second", "--lun", "1", directory=d.directory)
        # REPORTED LUNS DATA HAS CHANGED first, then the new LUN is listed.
        cdb = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
        status, data, sense = ini.command(cdb, read_len=4096)
        if status == 2:
            assert sense[12:14] == b"\x3f\x0e", sense.hex()
            status, data, sense = ini.command(cdb, read_len=4096)
        assert status == 0
        n = int.from_bytes(data[:4], "big") // 8
        assert n == 2
        ini.logout()


def test_metrics_endpoint(tmp_path):
    port, mport = free_port(), free_port()
    with running(str(tmp_path / "demo"), port, metrics_port=mport):
        ini = session(port)
        assert ini.write10(0, os.urandom(8 * BS))[0] == 0
        assert ini.read10(0, 8)[0] == 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        text = body.decode()
        assert f'storaged_iscsi_sessions{{target="{DEMO_IQN}"}} 1.0' in text
        assert 'storaged_scsi_commands_total{lun="0",op="read",' in text
        assert "storaged_scsi_command_seconds_bucket" in text
        assert 'storaged_scsi_bytes_total{direction="write",lun="0"' in text
        ini.logout()


def test_session_reinstatement_closes_old_connection(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port):
        first = session(port, isid=0x23D000000042)
        second = session(port, isid=0x23D000000042)
        with pytest.raises((ConnectionError, OSError)):
            first.sock.settimeout(5)
            first.read10(0, 1)
            first.read10(0, 1)
        assert second.read10(0, 1)[0] == 0
        second.logout()


def test_sigterm_requests_logout_and_exits_cleanly(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port) as d:
        ini = session(port)
        d.proc.terminate()
        pdu = ini.recv()
        assert pdu.opcode == 0x32 and pdu.w36 >> 24 == 1  # Async: logout requested
        ini.logout()
        assert d.proc.wait(15) == 0
    assert "Traceback" not in d.output()


def test_state_directory_is_root_only(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port) as d:
        mode = os.stat(d.directory).st_mode & 0o777
        assert mode == 0o700
        sock = os.path.join(d.directory, "control.sock")
        assert os.stat(sock).st_mode & 0o777 == 0o600
        for name in os.listdir(os.path.join(d.directory, "state.lmdb")):
            st = os.stat(os.path.join(d.directory, "state.lmdb", name))
            assert st.st_mode & 0o077 == 0, name


def test_live_resize_and_offline(tmp_path):
    port = free_port()
    with running(str(tmp_path / "demo"), port) as d:
        ini = session(port)
        cap16 = bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])
        status, data, _s = ini.command(cap16, read_len=32)
        assert status == 0 and int.from_bytes(data[:8], "big") == (1 << 30) // BS - 1
        storaged("backstore", "resize", "demo", "2G", directory=d.directory)
        status, data, sense = ini.command(cap16, read_len=32)
        assert status == 2 and sense[12:14] == b"\x2a\x09", sense.hex()  # CAPACITY CHANGED
        status, data, _s = ini.command(cap16, read_len=32)
        assert status == 0 and int.from_bytes(data[:8], "big") == (2 << 30) // BS - 1
        r = storaged("backstore", "resize", "demo", "1G", directory=d.directory, check=False)
        assert r.returncode == 1 and "shrinking" in r.stderr
        storaged("backstore", "set", "demo", "--offline", directory=d.directory)
        status, _data, sense = ini.read10(0, 1)
        assert status == 2 and sense[2] & 0xF == 0x2, sense.hex()  # NOT READY
        storaged("backstore", "set", "demo", "--online", "--read-only", directory=d.directory)
        ini.clear_unit_attentions()
        status, _data, sense = ini.write10(0, bytes(BS))
        assert status == 2 and sense[2] & 0xF == 0x7, sense.hex()  # DATA PROTECT
        ini.logout()
