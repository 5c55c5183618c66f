"""SAN-level fencing on the storage node: ``storaged fence ...`` against a
real daemon, with initiator sessions that hold PR registrations.

Fencing a node preempts its registrations as a PREEMPT AND ABORT would (the
other registrants see it in READ KEYS and get RESERVATIONS RELEASED when the
fenced node held a registrants-only reservation), drops its session and
refuses its logins; the state survives a restart; unfencing gives access back.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support import DEMO_IQN, running, storaged
from tests.tcp_initiator import LoginFailed, TcpInitiator
from tests.test_pr_fence import GOOD, KEY, Node, node_name

pytestmark = pytest.mark.slow


def _map(directory: str) -> None:
    for n in (1, 2):
        storaged("fence", "map", f"node{n}", "--initiator", node_name(n),
                 "--key", f"{KEY[n]:x}", directory=directory)


def _login(port: int, n: int) -> TcpInitiator:
    ini = TcpInitiator("127.0.0.1", port, name=node_name(n), isid=0x23D000000100 + n)
    ini.login(DEMO_IQN)
    return ini


def test_fence_off_on_live_and_restart(tmp_path):
    directory = str(tmp_path / "d")
    with running(directory) as d:
        _map(directory)
        nodes = {n: Node(d.port, n) for n in (1, 2)}
        for n in (1, 2):
            nodes[n].unfence()          # node1 holds the WERO reservation
        assert nodes[1].read_reservation()[0] == KEY[1]
        assert nodes[1].write(0) == GOOD

        r = storaged("fence", "off", "node1", directory=directory)
        assert "fenced" in r.stdout
        # node1's session is gone: its next write never reaches the LU
        with pytest.raises((ConnectionError, OSError, AssertionError)):
            nodes[1].ini.write10(1, b"\x11" * 512)
        with pytest.raises(LoginFailed) as e:
            _login(d.port, 1)
        assert e.value.status == 0x0202     # authorization failure (RFC 7143 §11.13.5)
        # node2 sees the preemption: key gone, reservation released (UA 2A/04)
        seen = nodes[2].turs()
        assert (0x2A, 0x04) in seen
        assert nodes[2].read_keys() == [KEY[2]]
        assert nodes[2].read_reservation() is None
        assert nodes[2].write(2) == GOOD

        st = storaged("fence", "status", "node1", directory=directory, check=False)
        assert st.returncode == 2 and "FENCED" in st.stdout
        st2 = storaged("fence", "status", "node2", directory=directory, check=False)
        assert st2.returncode == 0
        assert "still fenced" not in d.output()
    # restart: node1 stays fenced
    with running(directory) as d:
        with pytest.raises(LoginFailed):
            _login(d.port, 1)
        st = storaged("fence", "status", "node1", "--json", directory=directory, check=False)
        assert st.returncode == 2 and json.loads(st.stdout)["fenced"] is True
        storaged("fence", "on", "node1", directory=directory)
        ini = _login(d.port, 1)
        ini.clear_unit_attentions()
        assert ini.write10(3, b"\x01" * 512)[0] == GOOD
        ini.logout()
        hist = json.loads(storaged("fence", "history", "node1", "--json",
                                   directory=directory).stdout)["events"]
        assert [e["action"] for e in hist] == ["map", "off", "on"]
        assert all(e["by"].endswith("@cli") and e["at"] > 0 for e in hist)
        lu = _lu_path(directory)
    with open(lu, "rb") as f:
        data = f.read(4 * 512)
    assert data[512:1024] == bytes(512), "a write sent after the fence reached the LU"
    assert data[:512] == b"\x01" * 512 and data[1024:1536] == b"\x02" * 512


def _lu_path(directory: str) -> str:
    for b in json.loads(storaged("ls", "--json", directory=directory).stdout)["backstores"]:
        if b["name"] == "demo":
            return b["path"]
    raise AssertionError("no demo backstore")


def test_fence_offline_applies_at_start(tmp_path):
    directory = str(tmp_path / "d")
    with running(directory) as d:
        port = d.port
    _map(directory)
    storaged("fence", "off", "node2", directory=directory)
    out = storaged("fence", "ls", directory=directory).stdout
    assert "node2: FENCED" in out and "node1: access" in out
    with running(directory, port) as d:
        with pytest.raises(LoginFailed):
            _login(d.port, 2)
        _login(d.port, 1).logout()


def test_fence_bad_input(tmp_path):
    directory = str(tmp_path / "d")
    os.makedirs(directory)
    r = storaged("fence", "off", "nosuch", directory=directory, check=False)
    assert r.returncode == 1 and "storaged: error: unknown node 'nosuch'" in r.stderr
    r = storaged("fence", "map", "n1", directory=directory, check=False)
    assert r.returncode == 1 and "at least one initiator" in r.stderr
    r = storaged("fence", "map", "n1", "--key", "zz", directory=directory, check=False)
    assert r.returncode == 1 and "invalid reservation key" in r.stderr
    r = storaged("fence", "map", "bad name!", "--key", "1", directory=directory, check=False)
    assert r.returncode == 1 and "invalid node name" in r.stderr
    storaged("fence", "map", "n1", "--initiator", "iqn.2026-11.test:a", directory=directory)
    r = storaged("fence", "map", "n2", "--initiator", "iqn.2026-11.test:A", directory=directory,
                 check=False)
    assert r.returncode == 1 and "already mapped to node 'n1'" in r.stderr
    storaged("fence", "off", "n1", directory=directory)
    r = storaged("fence", "unmap", "n1", directory=directory, check=False)
    assert r.returncode == 1 and "is fenced" in r.stderr
