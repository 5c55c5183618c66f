"""Client of a storage node's management endpoint (storaged.control.mgmt_server)."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

from storaged.control import mgmt_auth as auth


class EndpointError(Exception):
    """The storage node did not answer as it should (connect, timeout, protocol)."""


class AuthFailed(EndpointError):
    """The storage node refused the credentials (or failed to prove itself)."""


class OpFailed(Exception):
    """The storage node answered the request with an error (e.g. unknown node)."""


class Endpoint:
    """One authenticated session with a storage node; ``call`` runs an operation."""

    def __init__(self, host: str, port: int, user: str, password: str, *,
                 use_ssl: bool = False, ssl_insecure: bool = True,
                 timeout: float = 10.0) -> None:
        self.where = f"{host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise EndpointError(f"{self.where}: connection timed out") from None
        except OSError as e:
            raise EndpointError(f"{self.where}: cannot connect: {e.strerror or e}") from None
        if use_ssl:
            ctx = ssl.create_default_context()
            if ssl_insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            try:
                raw = ctx.wrap_socket(raw, server_hostname=host)
            except (OSError, ssl.SSLError) as e:
                raw.close()
                raise EndpointError(f"{self.where}: TLS handshake failed: {e}") from None
        self.sock = raw
        self.file = raw.makefile("rb")
        self.seq = 0
        try:
            self.key = self._login(user, password)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except TimeoutError:
            raise EndpointError(f"{self.where}: timed out sending") from None
        except OSError as e:
            raise EndpointError(f"{self.where}: send failed: {e.strerror or e}") from None

    def _recv(self) -> dict[str, Any]:
        try:
            line = self.file.readline(1 << 20)
        except TimeoutError:
            raise EndpointError(f"{self.where}: timed out waiting for an answer") from None
        except OSError as e:
            raise EndpointError(f"{self.where}: receive failed: {e.strerror or e}") from None
        if not line:
            raise EndpointError(f"{self.where}: connection closed")
        try:
            value = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EndpointError(f"{self.where}: not a storaged management endpoint") from None
        if not isinstance(value, dict):
            raise EndpointError(f"{self.where}: not a storaged management endpoint")
        return value

    def _login(self, user: str, password: str) -> bytes:
        cnonce = auth.new_nonce()
        self._send({"user": user, "nonce": cnonce})
        ch = self._recv()
        if ch.get("ok") is False:
            raise AuthFailed(f"{self.where}: login refused: {ch.get('error')}")
        try:
            salt, iterations, nonce = bytes.fromhex(ch["salt"]), int(ch["iterations"]), \
                str(ch["nonce"])
        except (KeyError, TypeError, ValueError):
            raise EndpointError(f"{self.where}: bad login challenge") from None
        if not nonce.startswith(cnonce) or not 4096 <= iterations <= 10_000_000:
            raise EndpointError(f"{self.where}: bad login challenge")
        msg = auth.auth_message(user, cnonce, nonce)
        proof, server_sig, key = auth.client_proof(password, salt, iterations, msg)
        self._send({"proof": proof.hex()})
        r = self._recv()
        if not r.get("ok"):
            raise AuthFailed(f"{self.where}: authentication failed for user {user!r}")
        if r.get("server_signature") != server_sig.hex():
            raise AuthFailed(f"{self.where}: the storage node failed to prove itself")
        return key

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Run ``op``; its result, or OpFailed with the node's message."""
        self.seq += 1
        body = {"seq": self.seq, "op": op, "args": args or {}}
        self._send({**body, "mac": auth.sign(self.key, self.seq, body)})
        r = self._recv()
        mac = r.pop("mac", None)
        if r.get("seq") != self.seq or not auth.check(self.key, self.seq, r, mac):
            raise EndpointError(f"{self.where}: answer failed its integrity check "
                                f"({r.get('error') or 'bad MAC'})")
        if not r.get("ok"):
            raise OpFailed(f"{self.where}: {r.get('error')}")
        return r.get("result")
