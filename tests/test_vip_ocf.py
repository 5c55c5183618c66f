"""ocf:storaged:vip, the pacemaker agent for a floating portal address, in a network
namespace: start adds the address, sends the gratuitous ARPs and opens the daemon's
portal on it; stop removes it and closes the portal; ocf-tester (resource-agents) runs
the whole action sequence; xmllint checks the meta-data against resource-agents'
schema."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import require_tool
from tests.vip_lab import CAPTURE, ROOT, run

pytestmark = [pytest.mark.root, pytest.mark.peer, pytest.mark.slow]
VIP = "10.77.1.100"
PORT = 42261
IQN = "iqn.2026-12.org.storaged:vip-ocf"
RNG = "/usr/share/resource-agents/metadata.rng"


def storaged(d: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "storaged", "--dir", d, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def ns(tmp_path):
    """A namespace with veth vipa (the address goes here) and its peer vipb (capture)."""
    name = f"vip{os.getpid()}o"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "add", "vipa", "type", "veth", "peer", "name", "vipb")
        for dev in ("lo", "vipa", "vipb"):
            run("ip", "-n", name, "link", "set", dev, "up")
        run("ip", "-n", name, "addr", "add", "10.77.1.1/24", "dev", "vipa")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def test_agent_start_stop_monitor_and_ocf_tester(ns, tmp_path):
    tester = require_tool("ocf-tester", "resource-agents")
    xmllint = require_tool("xmllint", "libxml2-utils")
    d = str(tmp_path / "state")
    storaged(d, "target", "create", IQN, "--portal", f"{VIP}:{PORT}")
    storaged(d, "vip", "add", f"{VIP}/24", "--dev", "vipa")
    # ocf-tester asks for meta-data as an unprivileged user: a world-readable directory
    # (pytest's tmp_path is 0700).
    agents = Path(tempfile.mkdtemp(prefix=f"vip{os.getpid()}ocf"))
    agents.chmod(0o755)
    storaged(d, "ocf", "install", "--dir", str(agents))
    agent = str(agents / "vip")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OCF_RESKEY_state_dir=d,
               OCF_RESKEY_address=VIP, OCF_ROOT="/usr/lib/ocf")

    def action(name: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, agent, name], capture_output=True,
                              text=True, timeout=60, env={**env, **extra}, cwd=ROOT)

    def listening() -> bool:
        return f"{VIP}:{PORT}" in run("ip", "netns", "exec", ns, "ss", "-ltn").stdout

    meta = subprocess.run([agent, "meta-data"], capture_output=True, text=True, check=True)
    r = subprocess.run([xmllint, "--noout", "--relaxng", RNG, "-"], input=meta.stdout,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "storaged",
                              "--dir", d, "serve"], stdout=log, stderr=subprocess.STDOUT,
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    log.close()
    arp = tmp_path / "arp.jsonl"
    capture = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURE,
                                "vipb", str(arp), str(ROOT)])
    try:
        deadline = time.monotonic() + 30
        while not (Path(d) / "control.sock").exists() or not arp.exists():
            assert serve.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        assert not listening(), "the portal on the floating address opened before start"
        assert action("monitor").returncode == 7
        r = action("start")
        assert r.returncode == 0, r.stderr
        assert VIP in run("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "vipa").stdout
        assert listening()
        deadline = time.monotonic() + 5
        garps: list[dict] = []
        while len(garps) < 5 and time.monotonic() < deadline:
            garps = [a for a in map(json.loads, arp.read_text().splitlines())
                     if a.get("gratuitous") and a.get("spa") == VIP]
            time.sleep(0.05)
        assert len(garps) == 5, garps
        assert action("monitor").returncode == 0
        r = action("stop")
        assert r.returncode == 0, r.stderr
        assert VIP not in run("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "vipa").stdout
        assert not listening()
        assert action("monitor").returncode == 7
        # Misconfigurations are OCF_ERR_CONFIGURED, naming the problem.
        r = action("validate-all", OCF_RESKEY_address="10.77.1.200")
        assert r.returncode == 6 and "no floating address 10.77.1.200" in r.stderr
        clustered = str(tmp_path / "clustered")
        storaged(clustered, "cluster", "init", "c", "--id=1", "--node=1=127.0.0.1:42262")
        storaged(clustered, "vip", "add", f"{VIP}/24", "--dev", "vipa")
        r = action("validate-all", OCF_RESKEY_state_dir=clustered)
        assert r.returncode == 6 and "manages the floating addresses" in r.stderr
        # resource-agents' own sequence against the running daemon.
        r = subprocess.run(["ip", "netns", "exec", ns, tester, "-n", "vip-test", "-o",
                            f"state_dir={d}", "-o", f"address={VIP}", agent],
                           capture_output=True, text=True, timeout=170, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout + r.stderr
        assert not listening()
    finally:
        action("stop")
        capture.kill()
        capture.wait()
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)
        shutil.rmtree(agents, ignore_errors=True)
