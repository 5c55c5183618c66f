"""Client side of the control socket, used by the CLI when a daemon is running."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from storaged.control.ops import ConfigError


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    """Send one request to the daemon at ``path`` and return its result.

    Raises ConfigError with the daemon's message if the operation failed, or
    if the daemon cannot be reached or does not answer within ``timeout``.
    """
    request = json.dumps({"op": op, "args": args or {}}).encode() + b"\n"
    buf = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise ConfigError(f"cannot reach the storaged daemon at {path}: "
                              f"{e.strerror or e}") from None
        try:
            sock.sendall(request)
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ConfigError(f"the storaged daemon did not answer {op!r} within "
                              f"{timeout:g}s") from None
        except OSError as e:
            raise ConfigError(f"lost connection to the storaged daemon: {e}") from None
    if not buf:
        raise ConfigError("the storaged daemon closed the connection without answering")
    try:
        response = json.loads(buf)
    except json.JSONDecodeError as e:
        raise ConfigError(f"bad answer from the storaged daemon: {e}") from None
    if response.get("ok"):
        return response.get("result")
    raise ConfigError(str(response.get("error", "unknown error")), response.get("errors"))


def daemon_running(path: str, timeout: float = 1.0) -> bool:
    """True if something listens on the control socket ``path``.

    A socket we may not open (EACCES) also counts as running, so a non-root
    user gets "permission denied" from ``call`` rather than silently editing
    the store behind the daemon's back.
    """
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            return True
        except OSError:
            return False
    return True


def probe_json(path: str, request: bytes | None = None, timeout: float = 5.0) -> Any:
    """One JSON line from the unix socket ``path`` (after sending ``request``), or None.

    For status sockets polled by ``fs status`` and ``lab status``: a socket that
    is gone, silent or answers garbage is "not answering", never an exception.
    """
    buf = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            if request is not None:
                sock.sendall(request)
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return json.loads(buf)
        except (OSError, ValueError):
            return None
