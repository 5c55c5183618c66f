"""The OCF resource agent for the storaged daemon, checked by pacemaker's and
resource-agents' own tools (Debian resource-agents, pacemaker-cli-utils,
libxml2-utils): ocf-tester runs start/stop/monitor for real, xmllint checks
the meta-data against resource-agents' RELAX NG schema, crm_resource
--validate runs validate-all with good and bad parameters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import require_tool

pytestmark = [pytest.mark.peer, pytest.mark.slow]
OCF_DIR = "/usr/lib/ocf/resource.d/storaged"
AGENT = os.path.join(OCF_DIR, "storaged")
RNG = "/usr/share/resource-agents/metadata.rng"


@pytest.fixture
def installed():
    """``storaged ocf install`` into pacemaker's directory; removed afterwards."""
    if os.path.exists(AGENT):
        pytest.fail(f"{AGENT} exists already; not overwriting it")
    r = subprocess.run([sys.executable, "-m", "storaged", "ocf", "install"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        yield AGENT
    finally:
        subprocess.run([sys.executable, "-m", "storaged", "ocf", "install", "--remove"],
                       capture_output=True, timeout=60)
        assert not os.path.exists(AGENT)


def test_metadata_validates(installed):
    xmllint = require_tool("xmllint", "libxml2-utils")
    if not os.path.exists(RNG):
        pytest.fail(f"{RNG} missing: install Debian package resource-agents")
    meta = subprocess.run([installed, "meta-data"], capture_output=True, text=True,
                          check=True).stdout
    r = subprocess.run([xmllint, "--noout", "--relaxng", RNG, "-"], input=meta,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ocf_tester(installed, tmp_path):
    tester = require_tool("ocf-tester", "resource-agents")
    state = str(tmp_path / "state")
    try:
        r = subprocess.run([tester, "-n", "storaged-test", "-o", f"state_dir={state}",
                            installed], capture_output=True, text=True, timeout=170)
    finally:
        subprocess.run([installed, "stop"], env=dict(os.environ, OCF_RESKEY_state_dir=state),
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout + r.stderr


def test_crm_resource_validate(installed, tmp_path):
    crm = require_tool("crm_resource", "pacemaker-cli-utils")

    def validate(*opts: str) -> subprocess.CompletedProcess:
        args = [crm, "--validate", "--class", "ocf", "--provider", "storaged",
                "--agent", "storaged"]
        for o in opts:
            args += ["--option", o]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    r = validate(f"state_dir={tmp_path}")
    assert r.returncode == 0 and "returned 0 (ok)" in r.stdout, r.stdout + r.stderr
    r = validate("state_dir=relative/dir")
    assert "returned 6 (not configured)" in r.stdout and "absolute path" in r.stdout
    r = validate()
    assert "returned 6 (not configured)" in r.stdout and "state_dir is required" in r.stdout
    r = validate(f"state_dir={tmp_path}", "metrics=not-an-address")
    assert "returned 6 (not configured)" in r.stdout, r.stdout
