"""`storaged iscsi discover/inq/dd` as subprocesses against storaged's target."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import DEMO_IQN, free_port, running

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storaged", "iscsi", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("cli") / "demo")) as d:
        yield d


def test_discover(daemon):
    r = cli("discover", f"127.0.0.1:{daemon.port}")
    assert r.returncode == 0, r.stderr
    assert f"127.0.0.1:{daemon.port},1 {DEMO_IQN}" in r.stdout


def test_inq(daemon):
    r = cli("inq", daemon.url + "?header_digest=CRC32C")
    assert r.returncode == 0, r.stderr
    assert "Vendor: STORAGED" in r.stdout
    assert f"Capacity: {1 << 30} bytes" in r.stdout
    assert "Digests: header CRC32C" in r.stdout
    assert "Identity: 6" in r.stdout


def test_dd_in_and_out(daemon, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom((8 << 20) + 1000))      # not a block multiple
    r = cli("dd", "--if", str(src), "--of", daemon.url, "--bs", "262144")
    assert r.returncode == 0, r.stderr
    assert f"{(8 << 20) + 1000} bytes copied" in r.stderr
    out = tmp_path / "out.img"
    r = cli("dd", "--if", daemon.url, "--of", str(out), "--count", str((8 << 20) + 1000),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()


def test_errors_are_clear(daemon, tmp_path):
    r = cli("inq", f"iscsi://127.0.0.1:{free_port()}/{DEMO_IQN}/0")
    assert r.returncode == 1 and r.stderr.startswith("storaged: error: ")
    assert "cannot connect" in r.stderr
    r = cli("inq", f"iscsi://127.0.0.1:{daemon.port}/iqn.2026-11.nope:x/0")
    assert r.returncode == 1 and "target not found" in r.stderr, r.stderr
    r = cli("inq", f"iscsi://127.0.0.1:{daemon.port}/{DEMO_IQN}/7")
    assert r.returncode == 1 and "LUN 7 not found" in r.stderr, r.stderr
    r = cli("dd", "--if", str(tmp_path / "a"), "--of", str(tmp_path / "b"))
    assert r.returncode == 1 and "iscsi:// URL" in r.stderr
    r = cli("inq", "http://example/x")
    assert r.returncode == 1 and "not an iscsi:// URL" in r.stderr
