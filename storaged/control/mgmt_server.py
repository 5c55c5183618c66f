"""The network management endpoint: fence operations over TCP, authenticated.

Off unless ``storaged mgmt listen ADDR`` set an address.  Newline-delimited
JSON; a connection first authenticates (SCRAM-SHA-256 key schedule, see
:mod:`storaged.control.mgmt_auth`), then sends MACed, sequence-numbered
requests.  Only the fencing operations are reachable this way (``OPS``
below): an agent's password can fence and unfence, not reconfigure the
storage.  Failed logins and bad MACs are refused and logged with the peer's
address; successful fences are recorded with ``user@address``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from storaged.control import mgmt_auth as auth
from storaged.control.ops import ConfigError, apply
from storaged.state import StateError, Store
from storaged.state.mgmt import MgmtEndpoint, MgmtUser

log = logging.getLogger("storaged.mgmt")

#: operations a management user may run; the ones that change state get ``by``
OPS = {"fence_off": True, "fence_on": True, "fence_status": False, "fence_ls": False,
       "fence_history": False, "ping": False}
LINE_LIMIT = 64 * 1024
AUTH_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
FAIL_DELAY = 0.2
_NONCE_RE = re.compile(r"^[0-9a-f]{16,128}$")
_SECRET = os.urandom(32)  # fake salts for unknown users (no user enumeration)


class MgmtServer:
    """Listens where the store's :class:`MgmtEndpoint` says; ``reconcile`` follows it."""

    def __init__(self, store: Store, on_change: Callable[[], Awaitable[None] | None]) -> None:
        self.store = store
        self.on_change = on_change
        self.server: asyncio.AbstractServer | None = None
        self.config: tuple[str, str, str] = ("", "", "")
        self.lock = asyncio.Lock()
        self.address: tuple[str, int] | None = None

    async def reconcile(self) -> None:
        """Start, move or stop the listener to match the stored address."""
        with self.store.read() as txn:
            rec = txn.get(MgmtEndpoint, MgmtEndpoint.KEY) or MgmtEndpoint()
        want = (rec.address, rec.tls_cert, rec.tls_key)
        if want == self.config:
            return
        await self.close()
        self.config = want
        if not rec.address:
            return
        from storaged.state import split_portal

        host, port = split_portal(rec.address)
        ctx = None
        if rec.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(rec.tls_cert, rec.tls_key)
        try:
            self.server = await asyncio.start_server(self._handle, host, port, ssl=ctx,
                                                     limit=LINE_LIMIT)
        except OSError as e:
            log.error("management endpoint: cannot listen on %s: %s", rec.address, e)
            self.config = ("", "", "")
            return
        self.address = self.server.sockets[0].getsockname()[:2]
        log.info("management endpoint on %s%s", rec.address, " (TLS)" if ctx else "")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
            self.address = None

    # ---------------------------------------------------------- one client
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        where = f"{peer[0]}:{peer[1]}"
        try:
            session = await asyncio.wait_for(self._login(reader, writer, where), AUTH_TIMEOUT)
            if session is None:
                return
            user, key = session
            seq = 0
            while True:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                if not line:
                    return
                seq += 1
                try:
                    req = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    req = None
                body = {k: v for k, v in req.items() if k != "mac"} \
                    if isinstance(req, dict) else {}
                if not isinstance(req, dict) or req.get("seq") != seq or \
                        not auth.check(key, seq, body, req.get("mac")):
                    log.warning("management endpoint: refused request from %s (user %r): "
                                "bad MAC or sequence number", where, user)
                    await _send(writer, {"ok": False, "error": "bad request MAC or sequence"})
                    return
                resp = await self._run(user, peer[0], body)
                resp["seq"] = seq
                resp["mac"] = auth.sign(key, seq, resp)
                await _send(writer, resp)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError, ssl.SSLError):
                pass

    async def _login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     where: str) -> tuple[str, bytes] | None:
        hello = _parse(await reader.readline())
        user, cnonce = hello.get("user"), hello.get("nonce")
        if not isinstance(user, str) or not isinstance(cnonce, str) or \
                not _NONCE_RE.match(cnonce):
            log.warning("management endpoint: refused %s: malformed login", where)
            await _send(writer, {"ok": False, "error": "expected {\"user\", \"nonce\"}"})
            return None
        with self.store.read() as txn:
            rec = txn.get(MgmtUser, user) if len(user) <= 64 else None
        if rec is not None:
            v = auth.Verifier(bytes.fromhex(rec.salt), rec.iterations,
                              bytes.fromhex(rec.stored_key), bytes.fromhex(rec.server_key))
        else:  # same answer shape as for a real user; the proof cannot match
            fake = hmac.new(_SECRET, user.encode(), hashlib.sha256).digest()
            v = auth.Verifier(fake[:16], auth.ITERATIONS, os.urandom(32), os.urandom(32))
        nonce = cnonce + auth.new_nonce()
        await _send(writer, {"salt": v.salt.hex(), "iterations": v.iterations, "nonce": nonce})
        msg = auth.auth_message(user, cnonce, nonce)
        proof = _parse(await reader.readline()).get("proof")
        key = None
        if isinstance(proof, str) and re.fullmatch(r"[0-9a-f]{64}", proof):
            key = auth.verify_proof(v, msg, bytes.fromhex(proof))
        if key is None or rec is None:
            log.warning("management endpoint: authentication failed for user %r from %s",
                        user, where)
            await asyncio.sleep(FAIL_DELAY)
            await _send(writer, {"ok": False, "error": "authentication failed"})
            return None
        log.info("management endpoint: user %r logged in from %s", user, where)
        await _send(writer, {"ok": True,
                             "server_signature": auth.server_signature(v, msg).hex()})
        return user, key

    async def _run(self, user: str, host: str, body: dict[str, Any]) -> dict[str, Any]:
        op, args = body.get("op"), body.get("args") or {}
        if op not in OPS or not isinstance(args, dict):
            return {"ok": False, "error": f"operation {op!r} is not allowed on the "
                                          "management endpoint"}
        if op == "ping":
            return {"ok": True, "result": {"pong": True, "user": user}}
        if OPS[op]:
            args = {**args, "by": f"{user}@{host}"}
        try:
            async with self.lock:
                result = await asyncio.to_thread(apply, self.store, op, args)
                if OPS[op]:
                    r = self.on_change()
                    if r is not None:
                        await r
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        except StateError as e:
            return {"ok": False, "error": f"state store error: {e}"}
        if OPS[op]:
            log.warning("management endpoint: %s %s by %s@%s", op, args.get("node"), user, host)
        return {"ok": True, "result": result}


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()
