"""Operational and security parameter negotiation (RFC 7143 §6, §13).

Each key is described once in KEYS: its kind (how the result is computed),
its range or value list, its default, and where it may appear.  The target
is always the responder here; Negotiator computes its answers and the
session values that result.
"""

from __future__ import annotations

from dataclasses import dataclass

# Kinds of negotiation (RFC 7143 §6.2.x).
DECLARATIVE = "declarative"
LIST = "list"
BOOL_AND = "and"
BOOL_OR = "or"
NUM_MIN = "min"
NUM_MAX = "max"
# Leading-only / login-only scopes.
LO = "login-only"
ANY = "any"


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    kind: str
    default: str
    low: int = 0
    high: int = 0
    values: tuple[str, ...] = ()
    login_only: bool = True
    leading_only: bool = False
    discovery: bool = True


_M = 2**24 - 1

KEYS: dict[str, Key] = {k.name: k for k in [
    Key("HeaderDigest", LIST, "None", values=("None", "CRC32C")),
    Key("DataDigest", LIST, "None", values=("None", "CRC32C")),
    Key("MaxConnections", NUM_MIN, "1", 1, 65535, leading_only=True, discovery=False),
    Key("InitialR2T", BOOL_OR, "Yes", leading_only=True, discovery=False),
    Key("ImmediateData", BOOL_AND, "Yes", leading_only=True, discovery=False),
    Key("MaxRecvDataSegmentLength", DECLARATIVE, "8192", 512, _M, login_only=False),
    Key("MaxBurstLength", NUM_MIN, "262144", 512, _M, leading_only=True, discovery=False),
    Key("FirstBurstLength", NUM_MIN, "65536", 512, _M, leading_only=True, discovery=False),
    Key("DefaultTime2Wait", NUM_MAX, "2", 0, 3600, leading_only=True),
    Key("DefaultTime2Retain", NUM_MIN, "20", 0, 3600, leading_only=True),
    Key("MaxOutstandingR2T", NUM_MIN, "1", 1, 65535, leading_only=True, discovery=False),
    Key("DataPDUInOrder", BOOL_OR, "Yes", leading_only=True, discovery=False),
    Key("DataSequenceInOrder", BOOL_OR, "Yes", leading_only=True, discovery=False),
    Key("ErrorRecoveryLevel", NUM_MIN, "0", 0, 2, leading_only=True),
    Key("TaskReporting", LIST, "RFC3720", values=("RFC3720", "ResponseFence", "FastAbort"),
        leading_only=True),
    Key("iSCSIProtocolLevel", NUM_MIN, "1", 0, 31, leading_only=True),
    # Obsolete marker keys (RFC 3720 §12.18): still sent by some initiators.
    Key("IFMarker", BOOL_AND, "No"),
    Key("OFMarker", BOOL_AND, "No"),
    Key("OFMarkInt", NUM_MIN, "2048", 1, 65535),
    Key("IFMarkInt", NUM_MIN, "2048", 1, 65535),
]}

# Declarative keys that carry names and session identity (§13.4 - §13.9).
IDENTITY_KEYS = {"InitiatorName", "TargetName", "InitiatorAlias", "TargetAlias",
                 "SessionType", "TargetPortalGroupTag", "TargetAddress"}
SECURITY_KEYS = {"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}

# What this target offers (the responder's own values).
TARGET_DEFAULTS: dict[str, str] = {
    "HeaderDigest": "CRC32C,None",
    "DataDigest": "CRC32C,None",
    "MaxConnections": "1",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "16776192",
    "FirstBurstLength": "262144",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
    "TaskReporting": "RFC3720",
    "iSCSIProtocolLevel": "1",
    "IFMarker": "No",
    "OFMarker": "No",
}


class NegotiationError(Exception):
    """The initiator broke a negotiation rule; login fails with this status."""

    def __init__(self, message: str, status: int = 0x0207) -> None:
        super().__init__(message)
        self.status = status


def _parse_num(key: Key, value: str) -> int | None:
    try:
        n = int(value, 0) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return None
    if n < key.low or n > key.high:
        return None
    return n


def _parse_bool(value: str) -> bool | None:
    return {"Yes": True, "No": False}.get(value)


class Negotiator:
    """Holds negotiated session/connection values and answers offered keys.

    ``ours`` holds this target's values (defaults overlaid with the admin's
    per-target overrides).  ``values`` holds the operational result, starting
    at the RFC defaults.
    """

    def __init__(self, ours: dict[str, str] | None = None, discovery: bool = False) -> None:
        self.ours = dict(TARGET_DEFAULTS)
        if ours:
            self.ours.update(ours)
        self.discovery = discovery
        self.values: dict[str, str] = {k.name: k.default for k in KEYS.values()}
        self.seen: set[str] = set()
        self.declared_mrdsl = False

    def respond(self, offered: list[tuple[str, str]], in_login: bool = True,
                leading: bool = True) -> list[tuple[str, str]]:
        """Answer the operational keys in ``offered``; identity/security keys
        are skipped (handled by the login state machine)."""
        answers: list[tuple[str, str]] = []
        for name, value in offered:
            if name in IDENTITY_KEYS or name in SECURITY_KEYS:
                continue
            key = KEYS.get(name)
            if key is None:
                answers.append((name, "NotUnderstood"))
                continue
            if name in self.seen and in_login:
                # §6.2: a key offered twice in one negotiation is a protocol error.
                raise NegotiationError(f"key {name} negotiated twice", 0x0207)
            if key.login_only and not in_login:
                answers.append((name, "Reject"))
                continue
            if self.discovery and not key.discovery:
                answers.append((name, "Irrelevant"))
                continue
            if key.leading_only and not leading:
                answers.append((name, "Irrelevant"))
                continue
            self.seen.add(name)
            answer = self._answer(key, value)
            if answer is not None:
                answers.append((name, answer))
        # FirstBurstLength is irrelevant when InitialR2T=Yes and ImmediateData=No (§13.14).
        if self.values["InitialR2T"] == "Yes" and self.values["ImmediateData"] == "No":
            answers = [(k, "Irrelevant" if k == "FirstBurstLength" else v) for k, v in answers]
        return answers

    def _answer(self, key: Key, value: str) -> str | None:
        ours = self.ours.get(key.name, key.default)
        if value in ("NotUnderstood", "Irrelevant", "Reject"):
            return None
        if key.kind == DECLARATIVE:
            n = _parse_num(key, value)
            if n is None:
                return "Reject"
            self.values[key.name] = str(n)
            if key.name == "MaxRecvDataSegmentLength":
                # Each side declares its own; ours is sent separately by declare().
                return None
            return None
        if key.kind == LIST:
            offered = [v.strip() for v in value.split(",")]
            supported = [v.strip() for v in ours.split(",")]
            for v in offered:
                if v in supported and v in key.values:
                    self.values[key.name] = v
                    return v
            return "Reject"
        if key.kind in (BOOL_AND, BOOL_OR):
            b = _parse_bool(value)
            if b is None:
                return "Reject"
            mine = ours == "Yes"
            result = (b and mine) if key.kind == BOOL_AND else (b or mine)
            text = "Yes" if result else "No"
            self.values[key.name] = text
            return text
        n = _parse_num(key, value)
        if n is None:
            return "Reject"
        mine_n = int(ours)
        result_n = min(n, mine_n) if key.kind == NUM_MIN else max(n, mine_n)
        if key.name == "MaxConnections":
            result_n = 1
        self.values[key.name] = str(result_n)
        return str(result_n)

    def declarations(self) -> list[tuple[str, str]]:
        """Keys the target declares once per login (its receive segment size)."""
        if self.declared_mrdsl:
            return []
        self.declared_mrdsl = True
        return [("MaxRecvDataSegmentLength", self.ours["MaxRecvDataSegmentLength"])]

    def finish(self) -> None:
        """Apply implied rules once login completes (§13.14: FirstBurst <= MaxBurst)."""
        fb = int(self.values["FirstBurstLength"])
        mb = int(self.values["MaxBurstLength"])
        if fb > mb:
            self.values["FirstBurstLength"] = str(mb)

    # Typed accessors for the data path.
    @property
    def header_digest(self) -> bool:
        return self.values["HeaderDigest"] == "CRC32C"

    @property
    def data_digest(self) -> bool:
        return self.values["DataDigest"] == "CRC32C"

    def num(self, name: str) -> int:
        return int(self.values[name])

    def flag(self, name: str) -> bool:
        return self.values[name] == "Yes"
