"""The cluster node inside ``storaged serve``, and the light start-up of ``storaged lock``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.test_cluster_safety import free_ports

PY = sys.executable


def cli(directory: str, *args: str, check: bool = True, timeout: float = 60):
    return subprocess.run([PY, "-m", "storaged", "--dir", directory, *args],
                          capture_output=True, text=True, check=check, timeout=timeout)


def test_serve_runs_the_configured_cluster_node(tmp_path):
    d = str(tmp_path / "n1")
    port = free_ports(1)[0]
    cli(d, "cluster", "init", "solo", "--id=1", f"--node=1=127.0.0.1:{port}", "--token-ms=500",
        "--fencer=test")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen([PY, "-m", "storaged", "--dir", d, "serve"], stdout=log,
                             stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 30
        r = None
        while time.monotonic() < deadline:
            r = cli(d, "cluster", "status", check=False)
            if "members [1], quorate" in r.stdout and "default (running)" in r.stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{r.stdout}{r.stderr}{open(tmp_path / 'serve.log').read()}")
        counter = tmp_path / "counter"
        counter.write_text("0")
        script = f"n=$(cat {counter}); echo $((n+1)) > {counter}"
        for _ in range(3):
            r = cli(d, "lock", "run", "--mode", "EX", "c", "--", "sh", "-c", script)
            assert r.returncode == 0, r.stderr
        assert counter.read_text().strip() == "3"
        holder = subprocess.Popen([PY, "-m", "storaged", "--dir", d, "lock", "run", "held",
                                   "--", "sleep", "30"])
        try:
            deadline = time.monotonic() + 20
            while "held" not in cli(d, "lock", "ls").stdout:
                assert time.monotonic() < deadline, "lock never showed up in lock ls"
                time.sleep(0.1)
            r = cli(d, "lock", "run", "--noqueue", "held", "--", "true", check=False)
            assert r.returncode == 1 and "EAGAIN" in r.stderr
        finally:
            holder.kill()
            holder.wait()
        # The killed client's lock is released by the node in the daemon.
        r = cli(d, "lock", "run", "--timeout", "10", "held", "--", "true", check=False)
        assert r.returncode == 0, r.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)
    assert serve.returncode == 0
    assert not os.path.exists(os.path.join(d, "cluster.sock"))


def test_serve_without_cluster_config_runs_no_node(tmp_path):
    d = str(tmp_path / "plain")
    serve = subprocess.Popen([PY, "-m", "storaged", "--dir", d, "serve"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(d, "control.sock")):
            assert time.monotonic() < deadline and serve.poll() is None, "serve did not start"
            time.sleep(0.1)
        assert not os.path.exists(os.path.join(d, "cluster.sock"))
        r = cli(d, "lock", "ls", check=False)
        assert r.returncode == 1 and "no cluster node is running" in r.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)


def test_lock_cli_does_not_import_other_subcommands():
    code = ("import sys\n"
            "from storaged.cli import cli\n"
            "try:\n"
            "    cli.main(['lock', 'run', '--help'], prog_name='storaged')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('zmq', 'storaged.control.ops', 'storaged.state', "
            "'storaged.raid.cli', 'storaged.nfs.cli', 'storaged.cluster.cli', 'asyncio') "
            "if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "Hold lock NAME while COMMAND runs" in r.stdout
    assert "HEAVY []" in r.stdout, r.stdout
    r = subprocess.run([PY, "-m", "storaged", "--help"], capture_output=True, text=True,
                       check=True, timeout=60)
    for group in ("cluster", "lock", "nfs", "raid", "alua", "backstore"):
        assert f"\n  {group} " in r.stdout, group
