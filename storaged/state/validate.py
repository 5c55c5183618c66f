"""Validators and normalizers for config values: names, iSCSI names, portals, CHAP.

Each ``normalize_*`` function returns the canonical form of a value or raises
``ValidationError`` with a message that names the problem.  Records, control
operations and the iSCSI login code all use these, so "what is a valid IQN"
is answered in exactly one place.
"""

from __future__ import annotations

import ipaddress
import re

from storaged.state.errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# RFC 3720 §3.2.6.3 / RFC 3722: after stringprep an iSCSI name holds only
# lowercase ASCII letters, digits, '-', '.' and ':' and is at most 223 bytes.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_IQN_RE = re.compile(rf"^iqn\.(\d{{4}})-(\d{{2}})\.{_LABEL}(?:\.{_LABEL})*(?::[a-z0-9.:-]+)?$")
_EUI_RE = re.compile(r"^eui\.[0-9a-f]{16}$")
_NAA_RE = re.compile(r"^naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})$")
MAX_ISCSI_NAME = 223

DEFAULT_ISCSI_PORT = 3260
CHAP_SECRET_MIN = 12  # RFC 7143 §12.1.3: CHAP secrets of at least 96 bits
CHAP_MAX = 255


def normalize_name(value: object, what: str = "name") -> str:
    """Check an object name (backstore etc.): ``[A-Za-z0-9_.-]{1,64}``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    return value


def normalize_iscsi_name(value: object) -> str:
    """Return the canonical (lowercase) iSCSI name or raise ValidationError.

    Accepts the three RFC 3720 §3.2.6.3 formats: ``iqn.YYYY-MM.reversed.domain[:id]``,
    ``eui.`` + 16 hex digits and ``naa.`` + 16 or 32 hex digits.  Names compare
    case-insensitively (RFC 3722 maps to lowercase), so the login code must
    normalize what an initiator sends with this same function before lookups.
    """
    if not isinstance(value, str):
        raise ValidationError(f"iSCSI name must be a string, got {type(value).__name__}")
    name = value.lower()
    if len(name.encode()) > MAX_ISCSI_NAME:
        raise ValidationError(f"iSCSI name {value!r} is longer than {MAX_ISCSI_NAME} bytes")
    if name.startswith("iqn."):
        m = _IQN_RE.match(name)
        if not m:
            raise ValidationError(
                f"invalid iqn name {value!r}: expected iqn.YYYY-MM.reversed.domain[:identifier]"
                " using only letters, digits, '-', '.' and ':'")
        if not 1 <= int(m.group(2)) <= 12:
            raise ValidationError(f"invalid iqn name {value!r}: month must be 01-12")
        return name
    if name.startswith("eui."):
        if not _EUI_RE.match(name):
            raise ValidationError(f"invalid eui name {value!r}: expected eui. + 16 hex digits")
        return name
    if name.startswith("naa."):
        if not _NAA_RE.match(name):
            raise ValidationError(
                f"invalid naa name {value!r}: expected naa. + 16 or 32 hex digits")
        return name
    raise ValidationError(
        f"invalid iSCSI name {value!r}: must start with 'iqn.', 'eui.' or 'naa.'")


def _parse_port(text: str, portal: str) -> int:
    if text == "":
        return DEFAULT_ISCSI_PORT
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValidationError(f"invalid portal {portal!r}: port must be 1-65535")
    return int(text)


def normalize_portal(value: object) -> str:
    """Return a portal as ``ip:port`` / ``[ipv6]:port`` (port defaults to 3260).

    Only IP literals are accepted: the daemon binds these addresses, and a
    hostname would make the bound address depend on DNS at start-up.
    """
    if not isinstance(value, str):
        raise ValidationError(f"portal must be a string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:] if end > 0 else "?"
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValidationError(f"invalid portal {value!r}: expected [ipv6-address]:port")
        try:
            ip6 = ipaddress.IPv6Address(text[1:end])
        except ValueError:
            raise ValidationError(f"invalid portal {value!r}: bad IPv6 address") from None
        return f"[{ip6.compressed}]:{_parse_port(rest[1:], value)}"
    if text.count(":") > 1:
        raise ValidationError(
            f"invalid portal {value!r}: IPv6 addresses go in brackets, e.g. [::]:3260")
    host, _, port = text.partition(":")
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValidationError(
            f"invalid portal {value!r}: expected IPv4-address:port or [IPv6-address]:port"
        ) from None
    return f"{ip4}:{_parse_port(port, value)}"


def split_portal(portal: str) -> tuple[str, int]:
    """Split a normalized portal into (host, port) for socket binding."""
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


def check_chap_user(value: object, what: str = "user") -> str:
    """CHAP_N: 1-255 characters, no control characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(f"CHAP {what} must be a non-empty string")
    if len(value.encode()) > CHAP_MAX:
        raise ValidationError(f"CHAP {what} is longer than {CHAP_MAX} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationError(f"CHAP {what} contains control characters")
    return value


def check_chap_secret(value: object, what: str = "password") -> str:
    """CHAP secret: 12-255 bytes (RFC 7143 wants at least 96 bits), no control chars.

    The message never includes the secret itself.
    """
    if not isinstance(value, str):
        raise ValidationError(f"CHAP {what} must be a string")
    n = len(value.encode())
    if n < CHAP_SECRET_MIN:
        raise ValidationError(
            f"CHAP {what} is too short ({n} bytes): RFC 7143 requires at least "
            f"{CHAP_SECRET_MIN} bytes (96 bits)")
    if n > CHAP_MAX:
        raise ValidationError(f"CHAP {what} is longer than {CHAP_MAX} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationError(f"CHAP {what} contains control characters")
    return value


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    """An int (not a bool) within ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValidationError(f"{what} must be {lo}..{hi}, got {value}")
    return value


def check_bool(value: object, what: str) -> bool:
    """A real bool (JSON true/false), not 0/1 or "yes"."""
    if not isinstance(value, bool):
        raise ValidationError(f"{what} must be true or false, got {value!r}")
    return value
