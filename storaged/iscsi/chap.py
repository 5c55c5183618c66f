"""CHAP with MD5 for iSCSI login (RFC 7143 §12.1.3, RFC 1994).

The target challenges the initiator; with mutual CHAP the initiator then
challenges the target.  A challenge the initiator reflects back at us is
refused (§12.1.3: it would let an attacker use the target as an oracle).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

CHAP_MD5 = "5"
CHALLENGE_LEN = 16


class ChapError(Exception):
    """Authentication failed; the login answers 0x0201."""


@dataclass(slots=True)
class Credentials:
    """What the target needs: the initiator's user/secret, and for mutual CHAP
    the name/secret the target answers with."""

    user: str
    password: str
    mutual_user: str | None = None
    mutual_password: str | None = None


def decode_binary(value: str) -> bytes:
    """Decode a CHAP binary value: 0x hex or 0b base64 (RFC 7143 §6.1)."""
    if len(value) > 2 and value[:2] in ("0x", "0X"):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        try:
            return bytes.fromhex(digits)
        except ValueError as e:
            raise ChapError(f"bad hex value {value[:32]!r}") from e
    if len(value) > 2 and value[:2] in ("0b", "0B"):
        try:
            return base64.b64decode(value[2:], validate=True)
        except ValueError as e:
            raise ChapError(f"bad base64 value {value[:32]!r}") from e
    raise ChapError(f"binary value without 0x/0b prefix: {value[:32]!r}")


def response(identifier: int, secret: str, challenge: bytes) -> bytes:
    """MD5(identifier || secret || challenge) per RFC 1994 §4.1."""
    return hashlib.md5(bytes([identifier]) + secret.encode() + challenge).digest()


class ChapTarget:
    """Target side of one CHAP exchange."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.identifier = secrets.randbelow(256)
        self.challenge = secrets.token_bytes(CHALLENGE_LEN)
        self.sent_challenge = False

    def select_algorithm(self, offered: str) -> list[tuple[str, str]]:
        """Answer CHAP_A with MD5 and our challenge."""
        algos = [a.strip() for a in offered.split(",")]
        if CHAP_MD5 not in algos:
            raise ChapError("initiator offers no CHAP algorithm we support (need MD5 = 5)")
        self.sent_challenge = True
        return [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self.identifier)),
                ("CHAP_C", "0x" + self.challenge.hex())]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; answer a mutual challenge if the initiator sent one."""
        if not self.sent_challenge:
            raise ChapError("CHAP response before challenge")
        name = keys.get("CHAP_N")
        resp = keys.get("CHAP_R")
        if name is None or resp is None:
            raise ChapError("CHAP_N and CHAP_R are required")
        expected = response(self.identifier, self.creds.password, self.challenge)
        got = decode_binary(resp)
        name_ok = hmac.compare_digest(name.encode(), self.creds.user.encode())
        if not (hmac.compare_digest(got, expected) and name_ok):
            raise ChapError(f"CHAP authentication failed for user {name!r}")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            if self.creds.mutual_user:
                raise ChapError("mutual CHAP is configured but the initiator did not ask")
            return []
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise ChapError("mutual CHAP needs both CHAP_I and CHAP_C")
        if not self.creds.mutual_user or not self.creds.mutual_password:
            raise ChapError("initiator asked for mutual CHAP but none is configured")
        try:
            ident = int(keys["CHAP_I"], 0)
        except ValueError as e:
            raise ChapError("bad CHAP_I") from e
        if not 0 <= ident <= 255:
            raise ChapError("CHAP_I out of range")
        their_challenge = decode_binary(keys["CHAP_C"])
        if their_challenge == self.challenge:
            raise ChapError("initiator reflected the target's challenge")
        if len(their_challenge) == 0 or len(their_challenge) > 1024:
            raise ChapError("mutual CHAP challenge length invalid")
        answer = response(ident, self.creds.mutual_password, their_challenge)
        return [("CHAP_N", self.creds.mutual_user), ("CHAP_R", "0x" + answer.hex())]
