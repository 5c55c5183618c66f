"""Helpers for tests that run the real daemon and real peer tools."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from storaged.fastio import extensions_disabled

DEMO_IQN = "iqn.2026-11.org.storaged:demo"


def compiled_module(name: str) -> Any:
    """The compiled ``_fastio.<name>``: the test is skipped under
    STORAGED_NO_EXTENSIONS=1, and fails saying how to build it otherwise."""
    try:
        return importlib.import_module(f"_fastio.{name}")
    except ImportError as exc:
        if extensions_disabled():
            pytest.skip("STORAGED_NO_EXTENSIONS=1 and the _fastio extensions are not built")
        pytest.fail(f"_fastio.{name} cannot be imported ({exc}); run `pip install -e .` "
                    "to build the Cython extensions", pytrace=False)


def require_tool(tool: str, package: str) -> str:
    """Path of a peer tool; fail (never skip) naming the Debian package if missing."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{tool} not found: install the Debian package '{package}' "
                    f"(scripts/setup.sh does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def storaged(*args: str, directory: str, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess:
    """Run a storaged CLI command against a state directory."""
    return subprocess.run([sys.executable, "-m", "storaged", "--dir", directory, *args],
                          capture_output=True, text=True, check=check, input=input,
                          timeout=60)


class Daemon:
    """A storaged process serving a state directory."""

    def __init__(self, directory: str, port: int, demo: bool = True,
                 metrics_port: int | None = None, log_level: str = "WARNING",
                 plain: bool = True) -> None:
        self.directory = directory
        self.port = port
        self.demo = demo
        self.metrics_port = metrics_port
        self.log_level = log_level
        self.plain = plain  # demo LUN on one sparse file instead of the RAID-5 default
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(directory, "daemon.log")

    def start(self) -> Daemon:
        os.makedirs(self.directory, exist_ok=True)
        if self.demo:
            # iSCSI-only demo: NFS tests start their own daemons (tests/nfs_client.py).
            cmd = [sys.executable, "-m", "storaged", "demo", "--dir", self.directory,
                   "--iscsi", f"127.0.0.1:{self.port}", "--nfs", "off"]
            if self.plain:
                cmd.append("--plain")
        else:
            cmd = [sys.executable, "-m", "storaged", "--dir", self.directory, "serve"]
        if self.metrics_port:
            cmd += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        env = dict(os.environ, STORAGED_LOG=self.log_level)
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        wait_port(self.port, self.proc)
        # Ready once the control socket exists too (the CLI goes live through it).
        sock = os.path.join(self.directory, "control.sock")
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storaged exited with {self.proc.returncode}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()
        return self.proc.returncode

    def output(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{DEMO_IQN}/0"


def direct_target(state: str, iqn: str, backing: str, size: str, port: int) -> None:
    """Configure (not start) a daemon in ``state``: target ``iqn`` on
    127.0.0.1:``port`` with LUN 0 on a new O_DIRECT backstore ``d0``."""
    storaged("backstore", "create", "d0", backing, "--size", size, "--direct", directory=state)
    storaged("target", "create", iqn, "--portal", f"127.0.0.1:{port}", directory=state)
    storaged("lun", "add", iqn, "d0", "--lun", "0", directory=state)
    storaged("target", "open", iqn, directory=state)


@contextlib.contextmanager
def running(directory: str, port: int | None = None, **kw) -> Iterator[Daemon]:
    d = Daemon(directory, port or free_port(), **kw).start()
    try:
        yield d
    finally:
        d.stop()
