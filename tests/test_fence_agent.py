"""fence_storaged against pacemaker's tools, Debian's fence_scsi metadata and
a real storaged daemon with an initiator holding a PR reservation.

Needs Debian's pacemaker-cli-utils (stonith_admin) and fence-agents
(fence_scsi): the tests fail naming them when they are missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from tests.support import free_port, require_tool, running, storaged
from tests.tcp_initiator import LoginFailed
from tests.test_fence_mgmt import PASSWORD, _wait
from tests.test_fence_target import _login, _lu_path
from tests.test_pr_fence import GOOD, KEY, Node, node_name

AGENT = [sys.executable, "-m", "fence.storaged_agent"]


def agent(*args: str, stdin: str | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT, *args], input=stdin if stdin is not None else "",
                          capture_output=True, text=True, timeout=timeout)


def _shape(xml: str) -> tuple[set[str], dict[str, set[str]], dict[str, ET.Element]]:
    root = ET.fromstring(xml)
    tags = {e.tag for e in root.iter()}
    attrs: dict[str, set[str]] = {}
    for e in root.iter():
        attrs.setdefault(e.tag, set()).update(e.attrib)
    params = {p.get("name"): p for p in root.iter("parameter")}
    return tags, attrs, params


STANDARD = ("action", "plug", "port", "verbose", "verbose_level", "debug_file", "quiet",
            "version", "help", "delay", "power_timeout", "login_timeout", "power_wait",
            "shell_timeout", "plug_separator", "retry_on")


@pytest.mark.peer
def test_metadata_has_fence_scsi_shape():
    scsi = require_tool("fence_scsi", "fence-agents")
    theirs = subprocess.run([scsi, "-o", "metadata"], capture_output=True, text=True,
                            check=True).stdout
    r = agent("-o", "metadata")
    assert r.returncode == 0
    t_tags, t_attrs, t_params = _shape(theirs)
    o_tags, o_attrs, o_params = _shape(r.stdout)
    assert o_tags >= t_tags, t_tags - o_tags
    for tag, names in t_attrs.items():
        assert o_attrs[tag] >= names, (tag, names - o_attrs[tag])
    for name in STANDARD:
        assert name in o_params, name
        theirs_p, ours_p = t_params[name], o_params[name]
        assert ours_p.find("getopt").get("mixed") == theirs_p.find("getopt").get("mixed")
        assert ours_p.find("content").get("type") == theirs_p.find("content").get("type")
        assert {k: ours_p.get(k) for k in ("required", "deprecated", "obsoletes")} == \
            {k: theirs_p.get(k) for k in ("required", "deprecated", "obsoletes")}, name
        assert ours_p.find("shortdesc").text
    on = ET.fromstring(r.stdout).find("actions/action[@name='on']")
    assert on.get("on_target") == "1" and on.get("automatic") == "1"
    acts = {a.get("name") for a in ET.fromstring(r.stdout).iter("action")}
    assert acts >= {"on", "off", "status", "list", "list-status", "monitor", "metadata",
                    "manpage", "validate-all"}
    assert agent("-o", "manpage").stdout.startswith(".TH FENCE_STORAGED 8")


@pytest.fixture
def sbin_wrapper():
    """/usr/sbin/fence_storaged (where stonith_admin looks), removed afterwards."""
    path = "/usr/sbin/fence_storaged"
    if os.path.exists(path):
        pytest.fail(f"{path} exists already; not overwriting it")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} -m fence.storaged_agent "$@"\n')
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        os.unlink(path)


@pytest.mark.peer
def test_stonith_admin_metadata(sbin_wrapper):
    tool = require_tool("stonith_admin", "pacemaker-cli-utils")
    r = subprocess.run([tool, "--metadata", "--agent", "fence_storaged"], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "fence_storaged"
    names = {p.get("name") for p in root.iter("parameter")}
    assert {"ip", "username", "password", "plug", "ipport", "ssl"} <= names


GOOD_OPTS = "action=validate-all\nip=127.0.0.1\nusername=agent\npassword=x\nplug=node1\n"


def test_validate_all():
    r = agent(stdin=GOOD_OPTS + "# a comment\nnodename=ignored\n")
    assert r.returncode == 0, r.stderr
    r = agent(stdin="action=validate-all\nipaddr=10.0.0.1:1\nlogin=a\npasswd=b\nport=n\n")
    assert r.returncode == 0, r.stderr                  # deprecated names still work
    r = agent("-o", "validate-all", "-a", "127.0.0.1", "-l", "agent", "-p", "x", "-n", "n")
    assert r.returncode == 0, r.stderr
    r = agent(stdin="action=validate-all\nplug=node1\ndelay=soon\nmethod=telepathy\n")
    assert r.returncode == 1
    for msg in ("You have to enter fence address", "You have to set login name",
                "You have to set login password", "Option 'delay' must be",
                "Option 'method' must be one of", "validate-all failed"):
        assert msg in r.stderr, msg
    r = agent(stdin=GOOD_OPTS + "bogus=1\n")
    assert r.returncode == 0 and "Ignoring unknown option 'bogus=1'" in r.stderr
    r = agent("--no-such-option")
    assert r.returncode == 1 and "Parse error" in r.stderr
    r = agent(stdin=GOOD_OPTS.replace("validate-all", "explode"))
    assert r.returncode == 1 and "Unrecognised action 'explode'" in r.stderr


def _opts(port: int, action: str, plug: str = "node1", pw: str = PASSWORD,
          ip: str | None = None) -> str:
    return (f"action={action}\nip={ip or '127.0.0.1'}\nipport={port}\nusername=agent\n"
            f"password={pw}\nplug={plug}\nlogin_timeout=2\npower_timeout=3\n")


@pytest.mark.slow
def test_end_to_end(tmp_path):
    directory = str(tmp_path / "d")
    with running(directory) as d:
        mport = free_port()
        for n in (1, 2):
            storaged("fence", "map", f"node{n}", "--initiator", node_name(n),
                     "--key", f"{KEY[n]:x}", directory=directory)
        storaged("mgmt", "listen", f"127.0.0.1:{mport}", directory=directory)
        storaged("mgmt", "user-add", "agent", "--password-stdin", directory=directory,
                 input=PASSWORD + "\n")
        _wait(mport)
        nodes = {n: Node(d.port, n) for n in (1, 2)}
        for n in (1, 2):
            nodes[n].unfence()
        assert nodes[1].write(0) == GOOD
        r = agent(stdin=_opts(mport, "monitor"))
        assert r.returncode == 0, r.stderr
        r = agent(stdin=_opts(mport, "status"))
        assert (r.returncode, r.stdout.strip()) == (0, "Status: ON")

        t0 = time.monotonic()
        r = agent(stdin=_opts(mport, "off"))
        assert r.returncode == 0 and "Success: Powered OFF" in r.stdout, r.stderr
        assert time.monotonic() - t0 < 5
        with pytest.raises((ConnectionError, OSError, AssertionError)):
            nodes[1].ini.write10(1, b"\x11" * 512)
        with pytest.raises(LoginFailed):
            _login(d.port, 1)
        assert (0x2A, 0x04) in nodes[2].turs()        # RESERVATIONS RELEASED
        assert nodes[2].read_keys() == [KEY[2]]
        r = agent("-o", "status", "-a", "127.0.0.1", "-u", str(mport), "-l", "agent",
                  "-p", PASSWORD, "-n", "node1")
        assert (r.returncode, r.stdout.strip()) == (2, "Status: OFF")
        r = agent(stdin=_opts(mport, "off"))
        assert r.returncode == 0 and "Already OFF" in r.stdout
        r = agent(stdin=_opts(mport, "list-status"))
        assert r.stdout.split() == ["node1,node1,OFF", "node2,node2,ON"]

        # bad input: wrong password, unknown node, a storage node that never answers
        r = agent(stdin=_opts(mport, "on", pw="wrong-password"))
        assert r.returncode == 1 and "Unable to connect/login to fencing device" in r.stderr
        assert "authentication failed for user 'agent'" in d.output()
        r = agent(stdin=_opts(mport, "off", plug="node9"))
        assert r.returncode == 1 and "plug is not available" in r.stderr
        with socket.socket() as mute:
            mute.bind(("127.0.0.1", 0))
            mute.listen()
            dead = mute.getsockname()[1]
            t0 = time.monotonic()
            r = agent(stdin=_opts(mport, "on", ip=f"127.0.0.1:{mport},127.0.0.1:{dead}"))
            assert r.returncode == 1 and "Connection timed out" in r.stderr, r.stderr
            assert time.monotonic() - t0 < 20
        # the on above failed before touching any storage node: still fenced
        assert storaged("fence", "status", "node1", directory=directory,
                        check=False).returncode == 2
        r = agent(stdin=_opts(mport, "on"))
        assert r.returncode == 0 and "Success: Powered ON" in r.stdout, r.stderr
        ini = _login(d.port, 1)
        ini.clear_unit_attentions()
        assert ini.write10(3, b"\x01" * 512)[0] == GOOD
        ini.logout()
        lu = _lu_path(directory)
    with open(lu, "rb") as f:
        assert f.read(1024)[512:] == bytes(512), "a write after the fence reached the LU"
    hist = json.loads(storaged("fence", "history", "node1", "--json",
                               directory=directory).stdout)["events"]
    # the second off was a no-op ("Already OFF"): not sent, not recorded
    assert [(e["action"], e["by"]) for e in hist] == \
        [("map", hist[0]["by"]), ("off", "agent@127.0.0.1"), ("on", "agent@127.0.0.1")]
