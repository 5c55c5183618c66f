"""ALUA against a running daemon with real peers.

* ``iscsi-inq`` (libiscsi-bin) decodes the standard INQUIRY TPGS field and
  the VPD page 83h relative target port and target port group designators;
* libiscsi itself (through ctypes, tests/libiscsi_ctypes.py) sends REPORT
  and SET TARGET PORT GROUPS, which no libiscsi tool does;
* ``storaged alua ...`` changes groups live through the control socket.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.libiscsi_ctypes import LibIscsi
from tests.support import DEMO_IQN, require_tool, running, storaged

GOOD, CHECK = 0x00, 0x02
NOT_READY, UNIT_ATTENTION = 0x2, 0x6
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])


def rtpg(fmt: int = 0) -> bytes:
    return bytes([0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])


def groups(data: bytes, ext: bool = False) -> list[tuple[int, int, bool, list[int]]]:
    """(id, state, preferred, relative port ids) per descriptor."""
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    pos, out = (8 if ext else 4), []
    while pos < len(data):
        n = data[pos + 7]
        ports = [int.from_bytes(data[pos + 10 + 4 * i:pos + 12 + 4 * i], "big") for i in range(n)]
        out.append((int.from_bytes(data[pos + 2:pos + 4], "big"), data[pos] & 0x0F,
                    bool(data[pos] & 0x80), ports))
        pos += 8 + 4 * n
    return out


def drain_ua(s: LibIscsi) -> list[tuple[int, int]]:
    """REQUEST SENSE until no unit attention is left (works in every ALUA state)."""
    seen = []
    for _ in range(10):
        status, data, _ = s.command(bytes([0x03, 0, 0, 0, 18, 0]), read_len=18)
        assert status == GOOD
        if data[2] & 0x0F != UNIT_ATTENTION:
            return seen
        seen.append((data[12], data[13]))
    raise AssertionError("unit attentions never end")


@pytest.mark.peer
def test_alua_with_libiscsi(tmp_path):
    inq = require_tool("iscsi-inq", "libiscsi-bin")
    d = str(tmp_path / "state")
    with running(d) as daemon:
        portal = f"127.0.0.1:{daemon.port}"
        # HA pair seen from node A: local ports in group 1 (preferred), the
        # peer's port (same IQN, TPGT 2) in remote group 2, standby.
        storaged("alua", "group", "set", "1", "--preferred", directory=d)
        storaged("alua", "group", "create", "2", "--remote", "--state", "standby",
                 "--port", f"{DEMO_IQN},2", "--transition-time", "10", directory=d)

        std = subprocess.run([inq, daemon.url], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        assert "TPGS:3" in std, std
        vpd = subprocess.run([inq, "-e", "1", "-c", "131", daemon.url], capture_output=True,
                             timeout=30, check=True).stdout.decode(errors="replace")
        blocks = vpd.split("DEVICE DESIGNATOR")
        rel = [b for b in blocks if "(4) RELATIVE_TARGET_PORT" in b]
        tpg = [b for b in blocks if "(5) TARGET_PORT_GROUP" in b]
        assert len(rel) == 1 and len(tpg) == 1, vpd
        assert "Association:(1) TARGET_PORT" in rel[0] and "Association:(1) TARGET_PORT" in tpg[0]

        a = LibIscsi(portal, DEMO_IQN, initiator="iqn.2026-11.test:alua-a")
        b = LibIscsi(portal, DEMO_IQN, initiator="iqn.2026-11.test:alua-b")
        try:
            drain_ua(a)
            drain_ua(b)
            # VPD 83h values (iscsi-inq prints binary designators empty).
            status, page, _ = a.command(bytes([0x12, 1, 0x83, 0x04, 0, 0]), read_len=1024)
            assert status == GOOD
            pos, found = 4, {}
            while pos < len(page):
                if (page[pos + 1] >> 4) & 3 == 1:
                    found[page[pos + 1] & 0x0F] = int.from_bytes(
                        page[pos + 4:pos + 4 + page[pos + 3]], "big")
                pos += 4 + page[pos + 3]
            assert found[4] == 1 and found[5] == 1, found

            status, data, _ = a.command(rtpg(), read_len=256)
            assert status == GOOD
            assert groups(data) == [(1, 0x0, True, [1]), (2, 0x2, False, [2])]
            status, data, _ = a.command(rtpg(1), read_len=256)
            assert status == GOOD and (data[4] >> 4) & 7 == 1 and data[5] == 10
            assert groups(data, ext=True) == [(1, 0x0, True, [1]), (2, 0x2, False, [2])]

            # Implicit transition by the admin: every nexus gets 2A/06; then standby rules.
            storaged("alua", "group", "set", "1", "--state", "standby", directory=d)
            assert drain_ua(a) == [(0x2A, 0x06)]
            status, _, sense = a.command(READ10, read_len=512)
            assert (status, sense) == (CHECK, (NOT_READY, 0x04, 0x0B))
            status, data, _ = a.command(rtpg(), read_len=256)
            assert status == GOOD and groups(data)[0][1] == 0x2

            # Explicit failback by initiator A: SET TARGET PORT GROUPS group 1 -> AO.
            stpg = bytes([0xA4, 0x0A, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])
            status, _, sense = a.command(stpg, data=bytes(4) + bytes([0x0, 0, 0, 1]))
            assert status == GOOD, sense
            status, _, sense = a.command(READ10, read_len=512)
            assert status == GOOD, sense                  # no UA for the issuer
            assert drain_ua(b) == [(0x2A, 0x06)]          # the other nexus is told
            assert b.command(READ10, read_len=512)[0] == GOOD
            # The peer's group cannot be changed from here.
            status, _, sense = a.command(stpg, data=bytes(4) + bytes([0x0, 0, 0, 2]))
            assert (status, sense) == (CHECK, (0x5, 0x26, 0x00))
        finally:
            a.close()
            b.close()

        live = json.loads(storaged("alua", "ls", "--json", directory=d).stdout)
        assert live["live"] is True
        assert [(g["id"], g["state"], g["status"]) for g in live["groups"]] == [
            (1, "active/optimized", "altered by SET TARGET PORT GROUPS"),
            (2, "standby", "none")]
