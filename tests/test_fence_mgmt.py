"""The network management endpoint: SCRAM-style login, MACed requests, only
fencing operations, refusals logged; against a real daemon on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fence.client import AuthFailed, Endpoint, EndpointError, OpFailed
from storaged.control import mgmt_auth as auth
from tests.support import free_port, running, storaged

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-fence-pw"


def test_auth_core_roundtrip():
    v = auth.make_verifier(PASSWORD, iterations=4096)
    msg = auth.auth_message("agent", "aa" * 9, "aa" * 9 + "bb" * 9)
    proof, server_sig, key = auth.client_proof(PASSWORD, v.salt, v.iterations, msg)
    assert auth.verify_proof(v, msg, proof) == key
    assert auth.server_signature(v, msg) == server_sig
    bad, _, _ = auth.client_proof("wrong-password", v.salt, v.iterations, msg)
    assert auth.verify_proof(v, msg, bad) is None
    other = auth.auth_message("agent", "aa" * 9, "aa" * 9 + "cc" * 9)
    assert auth.verify_proof(v, other, proof) is None          # no replay on a new nonce
    body = {"seq": 1, "op": "fence_off", "args": {"node": "n1"}}
    assert auth.check(key, 1, body, auth.sign(key, 1, body))
    assert not auth.check(key, 2, body, auth.sign(key, 1, body))


def _setup(directory: str) -> int:
    port = free_port()
    storaged("fence", "map", "node1", "--initiator", "iqn.2026-11.test.cluster:node1",
             directory=directory)
    storaged("mgmt", "listen", f"127.0.0.1:{port}", directory=directory)
    storaged("mgmt", "user-add", "agent", "--password-stdin", directory=directory,
             input=PASSWORD + "\n")
    return port


def _wait(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def test_endpoint_fences_and_refuses(tmp_path):
    directory = str(tmp_path / "d")
    with running(directory) as d:
        port = _setup(directory)
        _wait(port)
        with Endpoint("127.0.0.1", port, "agent", PASSWORD) as ep:
            assert ep.call("ping")["user"] == "agent"
            r = ep.call("fence_off", {"node": "node1", "by": "forged"})
            assert r["fenced"] and r["by"] == "agent@127.0.0.1"
            assert ep.call("fence_status", {"node": "node1"})["fenced"] is True
            with pytest.raises(OpFailed, match="unknown node 'nobody'"):
                ep.call("fence_off", {"node": "nobody"})
            with pytest.raises(OpFailed, match="not allowed"):
                ep.call("target_delete", {"iqn": "iqn.2026-11.org.storaged:demo"})
            ep.call("fence_on", {"node": "node1"})
        with pytest.raises(AuthFailed):
            Endpoint("127.0.0.1", port, "agent", "wrong-password")
        with pytest.raises(AuthFailed):
            Endpoint("127.0.0.1", port, "nobody", PASSWORD)
        # a request with a forged MAC ends the session
        ep = Endpoint("127.0.0.1", port, "agent", PASSWORD)
        ep.sock.sendall(json.dumps({"seq": 1, "op": "fence_off", "args": {"node": "node1"},
                                    "mac": "00" * 32}).encode() + b"\n")
        assert json.loads(ep.file.readline())["ok"] is False
        ep.close()
        st = json.loads(storaged("fence", "status", "node1", "--json", directory=directory,
                                 check=False).stdout)
        assert st["fenced"] is False
        log = d.output()
        assert "authentication failed for user 'agent' from 127.0.0.1" in log
        assert "authentication failed for user 'nobody'" in log
        assert "bad MAC or sequence number" in log
        hist = json.loads(storaged("fence", "history", "--json", directory=directory).stdout)
        assert [e["by"] for e in hist["events"] if e["action"] in ("off", "on")] == \
            ["agent@127.0.0.1", "agent@127.0.0.1"]
        storaged("mgmt", "listen", "off", directory=directory)
        with pytest.raises(Exception):  # noqa: B017 - connection refused once off
            Endpoint("127.0.0.1", port, "agent", PASSWORD, timeout=2)


def test_mgmt_bad_input(tmp_path):
    directory = str(tmp_path / "d")
    r = storaged("mgmt", "listen", "127.0.0.1", directory=directory, check=False)
    assert r.returncode == 1 and "needs a port" in r.stderr
    r = storaged("mgmt", "user-add", "a", "--password-stdin", directory=directory,
                 input="short\n", check=False)
    assert r.returncode == 1 and "at least 8 characters" in r.stderr
    storaged("mgmt", "user-add", "a", "--password-stdin", directory=directory,
             input=PASSWORD + "\n")
    out = json.loads(storaged("mgmt", "ls", "--json", directory=directory).stdout)
    assert out == {"address": None, "tls": False, "tls_cert": None, "users": ["a"]}


def test_endpoint_over_tls(tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "openssl missing: install Debian package openssl"
    key, cert = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-keyout", key, "-out", cert, "-days", "1"],
                   check=True, capture_output=True)
    directory = str(tmp_path / "d")
    with running(directory):
        port = _setup(directory)
        storaged("mgmt", "listen", f"127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key,
                 directory=directory)
        _wait(port)
        with Endpoint("127.0.0.1", port, "agent", PASSWORD, use_ssl=True) as ep:
            assert ep.sock.version().startswith("TLS")
            assert ep.call("fence_status", {"node": "node1"})["fenced"] is False
        r = subprocess.run([sys.executable, "-m", "fence.storaged_agent"], text=True,
                           capture_output=True, timeout=60,
                           input=f"action=status\nip=127.0.0.1\nipport={port}\nusername=agent\n"
                                 f"password={PASSWORD}\nplug=node1\nssl_insecure=1\n")
        assert (r.returncode, r.stdout.strip()) == (0, "Status: ON"), r.stderr
        with pytest.raises(EndpointError):      # plain TCP to a TLS port fails
            Endpoint("127.0.0.1", port, "agent", PASSWORD, timeout=3)
