"""Client of a running cluster node's local endpoint (``<dir>/cluster.sock``).

Used by ``storaged cluster status|leave|fence-ack`` and ``storaged lock``.
A client's locks live as long as its connection: closing the client (or
the process dying) releases them.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

SOCKET_NAME = "cluster.sock"


class NodeError(Exception):
    """The node refused a request or cannot be reached; ``status`` is the DLM status name."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


def socket_path(directory: str) -> str:
    """The node endpoint of state directory ``directory``."""
    return os.path.join(os.path.abspath(directory), SOCKET_NAME)


class NodeClient:
    """One connection to the local node (not thread-safe)."""

    def __init__(self, directory: str | None = None, *, path: str | None = None) -> None:
        self.path = path or socket_path(directory or ".")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise NodeError(f"no cluster node is running at {self.path} ({e.strerror}; "
                            f"start one with: storaged cluster node)") from None
        self._buf = b""

    def call(self, op: str, args: dict[str, Any] | None = None,
             timeout: float | None = 10.0) -> Any:
        """Send one request and wait for its answer (``timeout`` None waits forever)."""
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise NodeError("the cluster node closed the connection")
                self._buf += chunk
        except TimeoutError:
            raise NodeError(f"the cluster node did not answer {op!r} within "
                            f"{timeout:g}s") from None
        except OSError as e:
            raise NodeError(f"lost the connection to the cluster node: {e}") from None
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise NodeError(reply.get("error", "request failed"), reply.get("status"))
        return reply.get("result")

    def close(self) -> None:
        """Disconnect (the node releases this client's locks)."""
        self._sock.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
