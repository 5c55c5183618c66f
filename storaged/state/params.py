"""Whitelist of iSCSI operational parameters an admin may override per target.

The table mirrors RFC 7143 §13: key, value type, allowed range and the RFC
default.  Values are stored as canonical strings (``"Yes"``, ``"CRC32C,None"``,
``"262144"``) exactly as they would appear in a login text key, so the login
code can offer them without further conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from storaged.state.errors import ValidationError


@dataclass(frozen=True)
class ParamSpec:
    """One negotiable key: ``kind`` is "int", "bool" or "digest"."""

    name: str
    kind: str
    default: str
    lo: int = 0
    hi: int = 0
    section: str = ""


_MAX_DSL = 2**24 - 1

ISCSI_PARAMS: dict[str, ParamSpec] = {p.name: p for p in [
    ParamSpec("HeaderDigest", "digest", "None", section="13.1"),
    ParamSpec("DataDigest", "digest", "None", section="13.1"),
    ParamSpec("MaxConnections", "int", "1", 1, 65535, "13.2"),
    ParamSpec("InitialR2T", "bool", "Yes", section="13.10"),
    ParamSpec("ImmediateData", "bool", "Yes", section="13.11"),
    ParamSpec("MaxRecvDataSegmentLength", "int", "8192", 512, _MAX_DSL, "13.12"),
    ParamSpec("MaxBurstLength", "int", "262144", 512, _MAX_DSL, "13.13"),
    ParamSpec("FirstBurstLength", "int", "65536", 512, _MAX_DSL, "13.14"),
    ParamSpec("DefaultTime2Wait", "int", "2", 0, 3600, "13.15"),
    ParamSpec("DefaultTime2Retain", "int", "20", 0, 3600, "13.16"),
    ParamSpec("MaxOutstandingR2T", "int", "1", 1, 65535, "13.17"),
    ParamSpec("DataPDUInOrder", "bool", "Yes", section="13.18"),
    ParamSpec("DataSequenceInOrder", "bool", "Yes", section="13.19"),
    ParamSpec("ErrorRecoveryLevel", "int", "0", 0, 2, "13.20"),
]}

_BY_LOWER = {k.lower(): k for k in ISCSI_PARAMS}
_DIGESTS = {"none": "None", "crc32c": "CRC32C"}


def param_key(key: object) -> str:
    """The canonical spelling of a whitelisted key (case-insensitive match)."""
    if not isinstance(key, str) or key.lower() not in _BY_LOWER:
        known = ", ".join(sorted(ISCSI_PARAMS))
        raise ValidationError(f"unknown iSCSI parameter {key!r} (known: {known})")
    return _BY_LOWER[key.lower()]


def normalize_param(key: object, value: object) -> tuple[str, str]:
    """Return ``(canonical_key, canonical_value)`` or raise ValidationError.

    Keys match case-insensitively; bools accept yes/no/true/false/1/0;
    digests accept a comma list of None/CRC32C in preference order.
    """
    spec = ISCSI_PARAMS[param_key(key)]
    text = str(value).strip() if isinstance(value, (str, int)) else None
    if text is None or isinstance(value, bool):
        raise ValidationError(f"{spec.name}: value must be a string, got {value!r}")
    if spec.kind == "int":
        if not text.isdigit():
            raise ValidationError(f"{spec.name}: expected an integer, got {value!r}")
        n = int(text)
        if not spec.lo <= n <= spec.hi:
            raise ValidationError(f"{spec.name} must be {spec.lo}..{spec.hi}, got {n}")
        return spec.name, str(n)
    if spec.kind == "bool":
        low = text.lower()
        if low in ("yes", "true", "1", "on"):
            return spec.name, "Yes"
        if low in ("no", "false", "0", "off"):
            return spec.name, "No"
        raise ValidationError(f"{spec.name}: expected Yes or No, got {value!r}")
    items = [i.strip().lower() for i in text.split(",")]
    if not text or any(i not in _DIGESTS for i in items) or len(set(items)) != len(items):
        raise ValidationError(
            f"{spec.name}: expected a list of None and/or CRC32C (e.g. CRC32C,None), "
            f"got {value!r}")
    return spec.name, ",".join(_DIGESTS[i] for i in items)


def effective_param(params: dict[str, str], key: str) -> str:
    """The value a target offers for ``key``: its override or the RFC default."""
    return params.get(key, ISCSI_PARAMS[key].default)


def check_param_set(params: dict[str, str]) -> list[str]:
    """Cross-key rules (RFC 7143 §13.14: FirstBurstLength <= MaxBurstLength)."""
    first = int(effective_param(params, "FirstBurstLength"))
    burst = int(effective_param(params, "MaxBurstLength"))
    if first > burst:
        return [f"FirstBurstLength ({first}) must not exceed MaxBurstLength ({burst})"]
    return []
