"""The daemon's control socket: newline-delimited JSON over a root-only unix socket.

Request:  ``{"op": "<name>", "args": {...}}`` (one line)
Response: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "message"}``
(one line; errors may also carry ``"errors": [...]`` listing every problem).

Config operations come from ``storaged.control.ops`` and run in a worker
thread (LMDB I/O stays off the event loop), one at a time; after a
successful mutating operation ``on_change()`` is awaited so the daemon can
apply the new config live.  ``extra_ops`` adds daemon-only operations
(status, sessions, ...); they take precedence over built-in names.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from storaged.control.ops import OPS, ConfigError, apply, check_args
from storaged.state import StateError, Store

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024 * 1024  # a whole-config import travels as one line

ExtraOp = Callable[[dict[str, Any]], Any]


class ControlServerError(RuntimeError):
    """The control socket cannot be created (path in use, live daemon, ...)."""


def _prepare_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse if a daemon answers or it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlServerError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listening
        return
    except OSError as e:
        raise ControlServerError(f"cannot check existing socket {path}: {e}") from e
    finally:
        probe.close()
    raise ControlServerError(f"another storaged daemon is already listening on {path}")


def _bind(path: str) -> socket.socket:
    """Bind at a temporary name, chmod 0600, then rename: never visible with wider modes."""
    _prepare_path(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".c{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        raise ControlServerError(f"cannot create control socket {path}: {e}") from e
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    size = struct.calcsize("3i")
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, size))
    return uid


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _error(message: str, errors: list[str] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"ok": False, "error": message}
    if errors and errors != [message]:
        response["errors"] = errors
    return response


class _Handler:
    """Per-server state: the store, the change hook and a lock serializing config ops."""

    def __init__(self, store: Store, on_change: Callable[[], Awaitable[None] | None],
                 extra_ops: dict[str, ExtraOp]) -> None:
        self.store = store
        self.on_change = on_change
        self.extra_ops = extra_ops
        self.lock = asyncio.Lock()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(f"invalid request: not JSON ({e})")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _error('invalid request: expected {"op": "...", "args": {...}}')
        op, args = request["op"], request.get("args") or {}
        try:
            if op in self.extra_ops:
                if not isinstance(args, dict):
                    raise ConfigError(f"{op}: arguments must be an object")
                return {"ok": True, "result": await _maybe_await(self.extra_ops[op](args))}
            if op == "ping":
                return {"ok": True, "result": {"pong": True, "pid": os.getpid()}}
            spec = check_args(op, args)
            async with self.lock:
                result = await asyncio.to_thread(apply, self.store, op, args)
                if spec.mutating:
                    try:
                        await _maybe_await(self.on_change())
                    except Exception as e:
                        log.exception("applying config change %s failed", op)
                        return _error(f"{op}: change saved, but the daemon failed to apply "
                                      f"it: {e}")
            return {"ok": True, "result": result}
        except ConfigError as e:
            return _error(str(e), e.errors)
        except StateError as e:
            return _error(f"state store error: {e}")
        except Exception as e:  # one bad request must never take the daemon down
            log.exception("control op %s failed", op)
            return _error(f"internal error in {op}: {type(e).__name__}: {e}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid not in (0, os.geteuid()):
                await self._send(writer, _error("permission denied: only root may use the "
                                                "control socket"))
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    await self._send(writer, _error("request too large"))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await self._send(writer, await self.dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        try:
            data = json.dumps(response)
        except (TypeError, ValueError) as e:
            data = json.dumps(_error(f"result is not JSON-serializable: {e}"))
        writer.write(data.encode() + b"\n")
        await writer.drain()


async def start_control_server(
    path: str,
    store: Store,
    on_change: Callable[[], Awaitable[None] | None],
    extra_ops: dict[str, ExtraOp] | None = None,
) -> asyncio.AbstractServer:
    """Listen on the unix socket ``path`` (mode 0600) for control requests.

    A stale socket file is removed; if a live daemon still answers on it,
    ``ControlServerError`` is raised.  Peers must be root or the server's own
    uid (checked with SO_PEERCRED as well as by the file mode).  ``extra_ops``
    maps op names to ``fn(args: dict)`` returning a JSON-ready value or an
    awaitable of one; raising ConfigError gives the client a clean error.
    Stop with ``stop_control_server``.
    """
    handler = _Handler(store, on_change, dict(extra_ops or {}))
    sock = _bind(path)
    return await asyncio.start_unix_server(handler.handle, sock=sock, limit=MAX_REQUEST)


async def stop_control_server(server: asyncio.AbstractServer, path: str) -> None:
    """Close the server and remove its socket file."""
    server.close()
    await server.wait_closed()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def builtin_ops() -> list[str]:
    """Names of the config operations every control server understands."""
    from storaged.registry import load_operations

    load_operations()
    return sorted([*OPS, "ping"])
