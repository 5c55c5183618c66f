"""A portal that cannot be opened is a clear error, at start and on a live change."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.support import free_port, running, storaged

IQN = "iqn.2026-12.com.example:portals"


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_serve_refuses_to_start_on_a_busy_portal(tmp_path):
    state = str(tmp_path / "state")
    holder, port = _busy_port()
    with holder:
        storaged("target", "create", IQN, "--portal", f"127.0.0.1:{port}", directory=state)
        r = subprocess.run([sys.executable, "-m", "storaged", "--dir", state, "serve"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"storaged: error: cannot listen for iSCSI on 127.0.0.1:{port}: "
            "Address already in use") in r.stderr
    assert "Traceback" not in r.stderr


def test_live_portal_on_a_busy_port_is_reported_and_others_keep_serving(tmp_path):
    state = str(tmp_path / "state")
    holder, busy = _busy_port()
    with holder, running(state, free_port()) as d:
        storaged("target", "create", IQN, "--portal", f"127.0.0.1:{free_port()}",
                 directory=state)
        r = storaged("portal", "add", IQN, f"127.0.0.1:{busy}", directory=state, check=False)
        assert r.returncode == 1
        assert "change saved, but the daemon failed to apply it" in r.stderr
        assert f"cannot listen for iSCSI on 127.0.0.1:{busy}: Address already in use" in r.stderr
        with socket.create_connection(("127.0.0.1", d.port), timeout=5):
            pass  # the demo portal still answers
