"""NLM v4 / NSM against the real daemon: libnfs's NLM/NSM client and a kill -9 restart.

* ``tests/peers/nlm_client.c`` is compiled with gcc against libnfs-dev and
  runs TEST / LOCK / UNLOCK from two owners on two hosts, SM_STAT and an
  SM_NOTIFY (client reboot) through libnfs's raw RPC API.
* The restart test holds a lock, SIGKILLs the daemon, restarts it and checks
  the grace period (new locks refused with NLM4_DENIED_GRACE_PERIOD,
  reclaims granted) and that SM_NOTIFY with the new state reaches the
  client's statd (a fake client host on 127.0.0.1, see tests/nlm_fake.py).

The Linux kernel NFS client cannot be used here (no nfs in /proc/filesystems
in these containers); docs/nas.md says what kernel clients need.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from storaged.nfs import nsm, portmap
from storaged.nfs.nlm import (
    NLM4_DENIED,
    NLM4_DENIED_GRACE_PERIOD,
    NLM4_GRANTED,
    NLM_PROGRAM,
)
from tests.nfs_client import NfsDemo, TcpClient
from tests.nlm_fake import NlmCalls, ThreadedFake, alock, lockargs, udp_call
from tests.support import free_port, require_tool, storaged

pytestmark = [pytest.mark.peer,
              pytest.mark.root]

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE = 8  # seconds: room for a loaded 2-core machine, short enough for a test


class NlmTcp(NlmCalls, TcpClient):
    """TcpClient plus NLM/NSM helpers."""


def build_client(tmp_path) -> str:
    gcc = require_tool("gcc", "gcc")
    if not os.path.exists("/usr/include/nfsc/libnfs-raw-nlm.h"):
        pytest.fail("libnfs NLM/NSM headers missing: install the Debian package 'libnfs-dev' "
                    "(scripts/setup.sh does)")
    exe = str(tmp_path / "nlm_client")
    r = subprocess.run([gcc, "-O1", "-Wall", "-o", exe,
                        os.path.join(HERE, "peers", "nlm_client.c"), "-lnfs"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return exe


def test_libnfs_nlm_and_nsm(tmp_path) -> None:
    exe = build_client(tmp_path)
    d = NfsDemo(str(tmp_path / "d"), free_port(), free_port()).start()
    try:
        # NLM and NSM are registered with the portmapper (served on the NFS port too)
        assert portmap.getport(NLM_PROGRAM, 4, "127.0.0.1", d.port) == d.port
        assert portmap.getport(100024, 1, "127.0.0.1", d.port) == d.port
        c = NlmTcp("127.0.0.1", d.port)
        fh = c.create(c.mnt("/export"), b"locked")
        r = subprocess.run([exe, "127.0.0.1", str(d.port), fh.hex()], capture_output=True,
                           text=True, timeout=60)
        lines = {ln.split(" ", 1)[0]: ln.split(" ")[1:] for ln in r.stdout.splitlines()}
        assert r.returncode == 0 and "done" in lines, r.stdout + r.stderr
        st = {k: int(v[0]) for k, v in lines.items() if v}
        assert st["test_free"] == NLM4_GRANTED
        assert st["lock_a"] == NLM4_GRANTED
        assert st["lock_b_conflict"] == NLM4_DENIED
        assert st["test_b"] == NLM4_DENIED
        assert lines["test_b"][1:] == ["exclusive=1", "svid=11", "oh=owner-a", "offset=0",
                                       "len=100"]
        assert st["lock_b_beyond"] == NLM4_GRANTED
        assert st["lock_a_eof"] == NLM4_DENIED
        assert st["unlock_a_part"] == NLM4_GRANTED
        assert st["lock_b_head"] == NLM4_GRANTED
        assert st["lock_b_mid"] == NLM4_DENIED
        assert st["sm_stat"] == 0
        state = int(lines["sm_stat"][1].split("=")[1])
        assert state % 2 == 1
        assert st["sm_notify"] == 0
        assert st["test_after_notify"] == NLM4_GRANTED
        assert st["lock_a_all"] == NLM4_GRANTED
        assert st["unlock_a_all"] == NLM4_GRANTED
        c.close()
    finally:
        d.stop()


def _status(c: NlmTcp, fh: bytes, **kw: object) -> int:
    return c.nlm("LOCK", lockargs(fh, **kw))["stat"]  # type: ignore[index]


@pytest.mark.slow
def test_restart_grace_and_sm_notify(tmp_path, monkeypatch) -> None:
    fake = ThreadedFake()
    monkeypatch.setenv("STORAGED_CLIENT_PORTMAP_PORT", str(fake.port))
    directory = str(tmp_path / "d")
    port = free_port()
    os.makedirs(directory)
    storaged("nfs", "listen", f"127.0.0.1:{port}", "--grace", str(GRACE), directory=directory)
    d = NfsDemo(directory, port, free_port()).start()
    try:
        c = NlmTcp("127.0.0.1", port)
        fh = c.create(c.mnt("/export"), b"db")
        # first start: nobody was monitored, so no grace period
        assert _status(c, fh, host=b"cl1", ln=100) == NLM4_GRANTED
        assert _status(c, fh, host=b"cl2", svid=2, ln=1) == NLM4_DENIED
        c.close()
        assert fake.fake.notifies == []
        d.kill()

        d = NfsDemo(directory, port, free_port()).start()
        started = time.monotonic()
        c = NlmTcp("127.0.0.1", port)
        # grace: new locks refused, the old holder's reclaim granted
        assert _status(c, fh, host=b"cl2", svid=2, ln=1) == NLM4_DENIED_GRACE_PERIOD
        r = c.nlm("TEST", {"cookie": b"", "exclusive": True, "alock": alock(fh, host=b"cl2")})
        assert r["test_stat"][0] == NLM4_DENIED_GRACE_PERIOD  # type: ignore[index]
        assert _status(c, fh, host=b"cl1", ln=100, reclaim=True) == NLM4_GRANTED
        live = json.loads(storaged("nfs", "status", "--json", directory=directory).stdout)
        assert live["nlm"] == {"nsm_state": 3, "in_grace": True, "lock_hosts": ["cl1"]}
        deadline = time.monotonic() + 10
        while not fake.fake.notifies and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.fake.notifies, "no SM_NOTIFY reached the client's statd"
        note = fake.fake.notifies[0]
        assert note["state"] == 3  # first start 1, restart 3: odd and increasing
        assert note["mon_name"] == os.uname().nodename.encode()
        # SM_STAT says the same, over UDP too (how sm-notify/statd talk)
        r = udp_call(port, nsm.SM_PROGRAM, 1, 1, nsm.SM_NAME.encode({"mon_name": b"x"}),
                     nsm.SM_STAT_RES)
        assert r == {"res_stat": 0, "state": 3}
        assert time.monotonic() - started < GRACE, "machine too slow for the grace period"
        # after the grace period: normal service, the reclaimed lock still holds
        while time.monotonic() - started < GRACE + 0.5:
            time.sleep(0.1)
        assert _status(c, fh, host=b"cl2", svid=2, off=50, ln=1) == NLM4_DENIED
        assert _status(c, fh, host=b"cl2", svid=2, off=100, ln=1) == NLM4_GRANTED
        assert _status(c, fh, host=b"cl2", svid=3, off=5, ln=1, reclaim=True) == \
            NLM4_DENIED_GRACE_PERIOD
        c.close()
    finally:
        d.stop()
        fake.close()
