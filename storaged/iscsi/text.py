"""iSCSI text key=value segments (RFC 7143 §6.1): NUL-separated UTF-8 pairs."""

from __future__ import annotations


class TextError(ValueError):
    """A text segment that cannot be parsed (bad pair, duplicate key)."""


def decode(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Parse a data segment into ordered (key, value) pairs.

    Keys must not repeat within one negotiation (§6.2); that rule is the
    caller's, because SendTargets and continuation PDUs change it.
    """
    raw = bytes(data)
    out: list[tuple[str, str]] = []
    for item in raw.split(b"\x00"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise TextError(f"malformed text pair {item[:64]!r}")
        try:
            out.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise TextError(f"text pair is not UTF-8: {item[:64]!r}") from e
    return out


def encode(pairs: list[tuple[str, str]]) -> bytes:
    """Serialize pairs, each terminated by NUL."""
    return b"".join(f"{k}={v}".encode() + b"\x00" for k, v in pairs)
