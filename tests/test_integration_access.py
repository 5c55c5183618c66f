"""ACLs and CHAP with libiscsi as the initiator; admin changes applied live."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import DEMO_IQN, require_tool, running, storaged

pytestmark = pytest.mark.peer

ALLOWED = "iqn.2026-11.test:allowed"
OTHER = "iqn.2026-11.test:other"
SECRET = "initiator-secret-1"
MUTUAL_SECRET = "target-secret-22"


def inq(url: str, initiator: str) -> subprocess.CompletedProcess:
    tool = require_tool("iscsi-inq", "libiscsi-bin")
    return subprocess.run([tool, "-i", initiator, url], capture_output=True, text=True,
                          timeout=60)


def ls(port: int, initiator: str, auth: str = "") -> str:
    tool = require_tool("iscsi-ls", "libiscsi-bin")
    r = subprocess.run([tool, "-i", initiator, "-s", f"iscsi://{auth}127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


@pytest.fixture()
def daemon(tmp_path):
    with running(str(tmp_path / "demo")) as d:
        yield d


def test_acl_refuses_outsider_and_hides_target(daemon):
    dirs = daemon.directory
    storaged("acl", "add", DEMO_IQN, ALLOWED, directory=dirs)
    storaged("target", "close", DEMO_IQN, directory=dirs)  # live: ACL now enforced
    r = inq(daemon.url, OTHER)
    assert r.returncode != 0
    assert "Authorization failure" in r.stdout + r.stderr, r.stdout + r.stderr
    assert DEMO_IQN not in ls(daemon.port, OTHER)
    assert DEMO_IQN in ls(daemon.port, ALLOWED)
    assert inq(daemon.url, ALLOWED).returncode == 0


def test_chap_one_way(daemon):
    dirs = daemon.directory
    storaged("acl", "add", DEMO_IQN, ALLOWED, directory=dirs)
    storaged("chap", "set", DEMO_IQN, "--user", "alice", "--password", SECRET,
             "--initiator", ALLOWED, directory=dirs)
    url_ok = daemon.url.replace("iscsi://", f"iscsi://alice%{SECRET}@")
    url_bad = daemon.url.replace("iscsi://", "iscsi://alice%wrong-secret-99@")
    url_none = daemon.url
    r = inq(url_ok, ALLOWED)
    assert r.returncode == 0, r.stdout + r.stderr
    r = inq(url_bad, ALLOWED)
    assert r.returncode != 0
    assert "Authentication failure" in r.stdout + r.stderr, r.stdout + r.stderr
    r = inq(url_none, ALLOWED)
    assert r.returncode != 0
    # The secret never shows up in ls output or the daemon log.
    out = storaged("ls", directory=dirs).stdout
    assert SECRET not in out and "alice" in out
    assert SECRET not in daemon.output()


def test_chap_mutual(daemon):
    dirs = daemon.directory
    storaged("chap", "set", DEMO_IQN, "--user", "bob", "--password", SECRET,
             "--mutual-user", "tgt", "--mutual-password", MUTUAL_SECRET, directory=dirs)
    base = daemon.url.replace("iscsi://", f"iscsi://bob%{SECRET}@")
    ok = f"{base}?target_user=tgt&target_password={MUTUAL_SECRET}"
    bad = f"{base}?target_user=tgt&target_password=not-the-secret1"
    r = inq(ok, ALLOWED)
    assert r.returncode == 0, r.stdout + r.stderr
    r = inq(bad, ALLOWED)
    assert r.returncode != 0, "initiator must reject a target that answers wrongly"
