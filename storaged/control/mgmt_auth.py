"""Challenge-response authentication for the network management endpoint
(sans-IO, stdlib only: the fence agent imports it too).

The scheme is SCRAM-SHA-256's key schedule (RFC 5802 §3, RFC 7677) over
newline-delimited JSON, without SASL framing:

* the store keeps, per user, a random salt, the PBKDF2 iteration count,
  ``StoredKey = H(ClientKey)`` and ``ServerKey``; never the password nor
  anything that can log in by itself (a stolen store cannot be replayed);
* the client proves it knows the password without sending it
  (``ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)``) over a
  fresh nonce from both sides, so a recorded exchange cannot be replayed;
* the server proves it knows the verifier (``ServerSignature``), so the
  agent does not fence against an impostor that only pretends to succeed;
* every later request and response carries an HMAC under a session key
  derived from ClientKey and the nonces, with a sequence number, so a
  man in the middle can neither change nor replay a fence request.

The channel is not encrypted unless TLS is configured; nothing in it is
secret (node names and states).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

ITERATIONS = 100_000
NONCE_BYTES = 18


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Hi(Normalize(password), salt, i) of RFC 5802 §2.2 (no SASLprep: UTF-8 as given)."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


@dataclass(frozen=True)
class Verifier:
    """What the store keeps for one user."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def make_verifier(password: str, iterations: int = ITERATIONS,
                  salt: bytes | None = None) -> Verifier:
    """A new verifier for ``password`` (random 16-byte salt)."""
    salt = salt if salt is not None else os.urandom(16)
    sp = salted_password(password, salt, iterations)
    return Verifier(salt, iterations, _h(_hmac(sp, b"Client Key")), _hmac(sp, b"Server Key"))


def new_nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def auth_message(user: str, client_nonce: str, nonce: str) -> bytes:
    return f"n={user},r={client_nonce},r={nonce}".encode()


def client_proof(password: str, salt: bytes, iterations: int, message: bytes
                 ) -> tuple[bytes, bytes, bytes]:
    """(ClientProof, expected ServerSignature, session key) for the client side."""
    sp = salted_password(password, salt, iterations)
    client_key = _hmac(sp, b"Client Key")
    stored_key = _h(client_key)
    proof = _xor(client_key, _hmac(stored_key, message))
    server_sig = _hmac(_hmac(sp, b"Server Key"), message)
    return proof, server_sig, session_key(client_key, message)


def verify_proof(v: Verifier, message: bytes, proof: bytes) -> bytes | None:
    """The session key if ``proof`` is right, else None (constant-time compare)."""
    if len(proof) != len(v.stored_key):
        return None
    client_key = _xor(proof, _hmac(v.stored_key, message))
    if not hmac.compare_digest(_h(client_key), v.stored_key):
        return None
    return session_key(client_key, message)


def server_signature(v: Verifier, message: bytes) -> bytes:
    return _hmac(v.server_key, message)


def session_key(client_key: bytes, message: bytes) -> bytes:
    return _hmac(client_key, b"storaged session|" + message)


def _canonical(seq: int, body: dict[str, Any]) -> bytes:
    return f"{seq}|".encode() + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(key: bytes, seq: int, body: dict[str, Any]) -> str:
    """The MAC of one request or response ``body`` (without its ``mac``) at ``seq``."""
    return _hmac(key, _canonical(seq, body)).hex()


def check(key: bytes, seq: int, body: dict[str, Any], mac: object) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(sign(key, seq, body), mac)
