"""Typed config records: Backstore, Target (with Acl and Chap) and Settings.

Records are plain mutable dataclasses.  ``validate()`` checks every field,
normalizes in place (lowercase IQNs, canonical portals and parameter values)
and raises ``ValidationError`` listing *all* problems.  ``to_dict`` /
``from_dict`` give the JSON form stored in LMDB and used by config
export/import; ``from_dict`` rejects unknown fields so a typo in a hand-edited
config file is an error, not a silently ignored setting.

Top-level records have a ``RECORD_KIND`` string (the Store keeps them under
``<kind>/<key>``); those that are configuration also name their section of a
``storaged config save`` file (``CONFIG_SECTION``).  Every kind of every layer
is listed once, in :mod:`storaged.registry`.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from storaged.state.errors import ValidationError
from storaged.state.params import check_param_set, normalize_param
from storaged.state.validate import (
    check_bool,
    check_chap_secret,
    check_chap_user,
    check_int,
    normalize_iscsi_name,
    normalize_name,
    normalize_portal,
)

R = TypeVar("R", bound="Record")

MAX_LUN = 16383
BLOCK_SIZES = (512, 4096)
BACKSTORE_KINDS = ("file", "block", "raid", "iscsi")  # raid: path is the RAID array name;
# iscsi: path is the iscsi:// URL of a remote LUN (storaged.block.open)
_SERIAL_RE = re.compile(r"^[0-9A-Za-z._-]{1,64}$")
_WWN_RE = re.compile(r"^6[0-9a-f]{31}$")

def new_serial() -> str:
    """A fresh unit serial number: 16 hex digits from a uuid4."""
    return uuid.uuid4().hex[:16]


def new_wwn() -> str:
    """A fresh NAA-6 (IEEE Registered Extended) id: '6' + OUI 001405 + 25 hex digits."""
    return "6001405" + secrets.token_hex(13)[:25]


def _collect(errors: list[str], check: Callable[..., Any], *args: Any, prefix: str = "") -> Any:
    """Run a validator; on failure append its messages to ``errors`` and return None."""
    try:
        return check(*args)
    except ValidationError as e:
        errors.extend(f"{prefix}{m}" for m in e.errors)
        return None


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        try:
            items = sorted(value.items())
        except TypeError:  # mixed key types in an unvalidated record
            items = list(value.items())
        return {str(k): _encode(v) for k, v in items}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


class Record:
    """Base class: dict round trip, unknown-field rejection, validate()."""

    RECORD_KIND: ClassVar[str] = ""
    #: the record's key in ``config save`` files; None: runtime state, not config
    CONFIG_SECTION: ClassVar[str | None] = None
    #: one record per store (its section is an object, not a list)
    CONFIG_SINGLETON: ClassVar[bool] = False
    #: what messages call one record of this kind ("backstore", "raid array")
    CONFIG_LABEL: ClassVar[str] = ""

    @property
    def key(self) -> str:
        """The record's key within its kind."""
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Normalize fields in place and return every rule they break."""
        return []

    @classmethod
    def config_label(cls, item: Any, index: int) -> str:
        """How errors name item ``index`` of this kind's config section (maybe invalid)."""
        return f"{cls.CONFIG_LABEL} #{index + 1}"

    @classmethod
    def config_ref(cls, key: str) -> str:
        """How errors name the valid record with key ``key``."""
        return f"{cls.CONFIG_LABEL} {key!r}"

    @classmethod
    def check_section(cls, records: list[Any]) -> list[str]:
        """Rules across the records of one config section (default: unique keys)."""
        seen: set[str] = set()
        errors: list[str] = []
        for r in records:
            if r.key in seen:
                errors.append(f"{cls.config_ref(r.key)} is defined twice")
            seen.add(r.key)
        return errors

    def validate(self) -> None:
        """Normalize in place; raise ValidationError listing all problems."""
        errors = self.problems()
        if errors:
            raise ValidationError(errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (includes secrets: this is the stored form)."""
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def _decode(cls, data: dict[str, Any], errors: list[str]) -> None:
        """Convert nested JSON values in ``data`` to typed values (in place)."""

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        """Build and validate a record from its dict form; unknown fields are errors."""
        what = cls.RECORD_KIND or cls.__name__.lower()
        if not isinstance(data, dict):
            raise ValidationError(f"{what}: expected an object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        errors = [f"unknown field {k!r} in {what}" for k in data if k not in known]
        errors += [
            f"missing field {name!r} in {what}" for name, f in known.items()
            if name not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if errors:
            raise ValidationError(errors)
        values = dict(data)
        cls._decode(values, errors)
        if errors:
            raise ValidationError(errors)
        record = cls(**values)
        record.validate()
        return record


@dataclass
class Chap(Record):
    """CHAP credentials; ``mutual_*`` is what the target answers with (two-way CHAP)."""

    user: str
    password: str
    mutual_user: str | None = None
    mutual_password: str | None = None

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_chap_user, self.user, "user")
        _collect(errors, check_chap_secret, self.password, "password")
        if (self.mutual_user is None) != (self.mutual_password is None):
            errors.append("mutual CHAP needs both mutual_user and mutual_password")
        elif self.mutual_user is not None:
            _collect(errors, check_chap_user, self.mutual_user, "mutual_user")
            _collect(errors, check_chap_secret, self.mutual_password, "mutual_password")
            if self.mutual_password == self.password:
                errors.append("mutual_password must differ from password (RFC 7143 §12.1.3)")
        return errors

    def describe(self) -> str:
        """Redacted one-line form: ``user=<u> (mutual: <u2>)``; never the secrets."""
        text = f"user={self.user}"
        if self.mutual_user is not None:
            text += f" (mutual: {self.mutual_user})"
        return text


def _decode_chap(data: dict[str, Any], errors: list[str], prefix: str = "") -> None:
    if data.get("chap") is not None:
        try:
            data["chap"] = Chap.from_dict(data["chap"])
        except ValidationError as e:
            errors.extend(f"{prefix}chap: {m}" for m in e.errors)


@dataclass
class Acl(Record):
    """One initiator allowed to log in to a target, optionally with its own CHAP."""

    initiator: str
    chap: Chap | None = None

    @property
    def key(self) -> str:
        return self.initiator

    def problems(self) -> list[str]:
        errors: list[str] = []
        name = _collect(errors, normalize_iscsi_name, self.initiator)
        if name:
            self.initiator = name
        if self.chap is not None:
            if not isinstance(self.chap, Chap):
                errors.append("chap must be a Chap record or null")
            else:
                errors += [f"chap: {m}" for m in self.chap.problems()]
        return errors

    @classmethod
    def _decode(cls, data: dict[str, Any], errors: list[str]) -> None:
        _decode_chap(data, errors)


@dataclass
class Backstore(Record):
    """A file or block device that backs LUNs.

    ``size`` is in bytes: the file size for ``kind="file"``; for block devices
    0 means the whole device.  ``serial`` (VPD 0x80) and ``wwn`` (VPD 0x83,
    NAA-6) are generated once at creation so initiators see stable identities.
    """

    RECORD_KIND: ClassVar[str] = "backstore"
    CONFIG_SECTION: ClassVar[str | None] = "backstores"
    CONFIG_LABEL: ClassVar[str] = "backstore"

    name: str
    kind: str
    path: str
    size: int
    block_size: int = 512
    read_only: bool = False
    wce: bool = True
    serial: str = field(default_factory=new_serial)
    wwn: str = field(default_factory=new_wwn)
    online: bool = True
    direct: bool = False  # O_DIRECT: bypass the page cache (files and block devices)
    shared: bool = False
    """Served by several storage nodes of the cluster over the same backing storage:
    persistent reservations are one state for all of them (storaged.scsi.pr_cluster)."""

    @classmethod
    def config_label(cls, item: Any, index: int) -> str:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            return cls.config_ref(item["name"])
        return f"backstores[{index}]"

    @classmethod
    def check_section(cls, records: list[Any]) -> list[str]:
        """Names unique, and no two backstores on one path."""
        errors = super().check_section(records)
        paths: dict[str, str] = {}
        for b in records:
            if b.path in paths and paths[b.path] != b.name:
                errors.append(f"backstore {b.name!r}: path {b.path} is already used by "
                              f"backstore {paths[b.path]!r}")
            paths.setdefault(b.path, b.name)
        return errors

    @property
    def key(self) -> str:
        return self.name

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, normalize_name, self.name, "backstore name")
        if self.kind not in BACKSTORE_KINDS:
            errors.append(f"kind must be 'file', 'block', 'raid' or 'iscsi', got {self.kind!r}")
        if self.kind == "raid":
            _collect(errors, normalize_name, self.path, "raid array name")
        elif self.kind == "iscsi":
            if not isinstance(self.path, str) or not self.path.startswith("iscsi://"):
                errors.append(f"path of an iscsi backstore must be an iscsi:// URL, "
                              f"got {self.path!r}")
        elif not isinstance(self.path, str) or not os.path.isabs(self.path) or "\0" in self.path:
            errors.append(f"path must be an absolute path, got {self.path!r}")
        else:
            self.path = os.path.normpath(self.path)
        if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
            errors.append(f"block_size must be 512 or 4096, got {self.block_size!r}")
        size = _collect(errors, check_int, self.size, "size", 0, 2**63 - 1)
        if size is not None and self.block_size in BLOCK_SIZES:
            if self.kind == "file" and size == 0:
                errors.append("size of a file backstore must be > 0")
            elif size % self.block_size:
                errors.append(f"size {size} is not a multiple of block_size {self.block_size}")
        for name in ("read_only", "wce", "online", "direct", "shared"):
            _collect(errors, check_bool, getattr(self, name), name)
        if self.direct is True and self.kind in ("raid", "iscsi"):
            errors.append("direct (O_DIRECT) applies to file and block backstores, "
                          f"not {self.kind}")
        if not isinstance(self.serial, str) or not _SERIAL_RE.match(self.serial):
            errors.append(f"serial must be 1-64 characters [0-9A-Za-z._-], got {self.serial!r}")
        if isinstance(self.wwn, str):
            self.wwn = self.wwn.lower()
        if not isinstance(self.wwn, str) or not _WWN_RE.match(self.wwn):
            errors.append(f"wwn must be 32 hex digits starting with 6 (NAA-6), got {self.wwn!r}")
        return errors


@dataclass
class Target(Record):
    """An iSCSI target: its portals, LUN map, access control and parameters.

    Access: an initiator may log in if it has an ACL entry or ``open_access``
    is on.  CHAP required of it is its ACL entry's ``chap`` if set, else the
    target-wide ``chap`` (if set); see ``effective_chap``.
    """

    RECORD_KIND: ClassVar[str] = "target"
    CONFIG_SECTION: ClassVar[str | None] = "targets"
    CONFIG_LABEL: ClassVar[str] = "target"

    iqn: str
    tpgt: int = 1
    portals: list[str] = field(default_factory=list)
    luns: dict[int, str] = field(default_factory=dict)
    open_access: bool = False
    acls: dict[str, Acl] = field(default_factory=dict)
    chap: Chap | None = None
    params: dict[str, str] = field(default_factory=dict)
    queue_depth: int = 128

    @classmethod
    def config_label(cls, item: Any, index: int) -> str:
        if isinstance(item, dict) and isinstance(item.get("iqn"), str):
            return cls.config_ref(item["iqn"])
        return f"targets[{index}]"

    @classmethod
    def config_ref(cls, key: str) -> str:
        return f"target {key}"

    @property
    def key(self) -> str:
        return self.iqn

    def problems(self) -> list[str]:
        errors: list[str] = []
        iqn = _collect(errors, normalize_iscsi_name, self.iqn)
        if iqn:
            self.iqn = iqn
        _collect(errors, check_int, self.tpgt, "tpgt", 1, 65535)
        _collect(errors, check_int, self.queue_depth, "queue_depth", 1, 1024)
        _collect(errors, check_bool, self.open_access, "open_access")
        errors += self._portal_problems() + self._lun_problems() + self._acl_problems()
        if self.chap is not None:
            if not isinstance(self.chap, Chap):
                errors.append("chap must be a Chap record or null")
            else:
                errors += [f"chap: {m}" for m in self.chap.problems()]
        errors += self._param_problems()
        return errors

    def _portal_problems(self) -> list[str]:
        if not isinstance(self.portals, list):
            return ["portals must be a list"]
        errors: list[str] = []
        out: list[str] = []
        for p in self.portals:
            norm = _collect(errors, normalize_portal, p)
            if norm in out:
                errors.append(f"portal {norm} listed twice")
            elif norm:
                out.append(norm)
        if not errors:
            self.portals = out
        return errors

    def _lun_problems(self) -> list[str]:
        if not isinstance(self.luns, dict):
            return ["luns must be a mapping of LUN id to backstore name"]
        errors: list[str] = []
        seen: dict[str, int] = {}
        for lun, name in sorted(self.luns.items(), key=lambda kv: str(kv[0])):
            if _collect(errors, check_int, lun, "lun id", 0, MAX_LUN) is None:
                continue
            if _collect(errors, normalize_name, name, "backstore name", prefix=f"lun {lun}: "):
                if name in seen:
                    errors.append(f"backstore {name!r} is mapped twice (lun {seen[name]} "
                                  f"and lun {lun})")
                seen[name] = lun
        if not errors:
            self.luns = dict(sorted(self.luns.items()))
        return errors

    def _acl_problems(self) -> list[str]:
        if not isinstance(self.acls, dict):
            return ["acls must be a mapping of initiator name to acl"]
        errors: list[str] = []
        out: dict[str, Acl] = {}
        for key, acl in self.acls.items():
            if not isinstance(acl, Acl):
                errors.append(f"acl {key!r}: must be an Acl record")
                continue
            sub = acl.problems()
            errors += [f"acl {key!r}: {m}" for m in sub]
            if sub:
                continue
            norm_key = _collect(errors, normalize_iscsi_name, key, prefix="acl key: ")
            if norm_key is None:
                continue
            if norm_key != acl.initiator:
                errors.append(f"acl key {key!r} does not match its initiator {acl.initiator!r}")
            elif acl.initiator in out:
                errors.append(f"acl for {acl.initiator} listed twice")
            else:
                out[acl.initiator] = acl
        if not errors:
            self.acls = dict(sorted(out.items()))
        return errors

    def _param_problems(self) -> list[str]:
        if not isinstance(self.params, dict):
            return ["params must be a mapping of iSCSI key to value"]
        errors: list[str] = []
        out: dict[str, str] = {}
        for key, value in self.params.items():
            kv = _collect(errors, normalize_param, key, value)
            if kv:
                out[kv[0]] = kv[1]
        if not errors:
            errors += check_param_set(out)
            self.params = dict(sorted(out.items()))
        return errors

    @classmethod
    def _decode(cls, data: dict[str, Any], errors: list[str]) -> None:
        luns = data.get("luns")
        if isinstance(luns, dict):
            decoded: dict[Any, Any] = {}
            for k, v in luns.items():
                if isinstance(k, str) and k.isdigit():
                    decoded[int(k)] = v
                else:
                    errors.append(f"lun id {k!r} is not a non-negative integer")
            data["luns"] = decoded
        acls = data.get("acls")
        if isinstance(acls, dict):
            out: dict[str, Any] = {}
            for k, v in acls.items():
                try:
                    out[k] = Acl.from_dict(v)
                except ValidationError as e:
                    errors.extend(f"acl {k!r}: {m}" for m in e.errors)
            data["acls"] = out
        _decode_chap(data, errors)


@dataclass
class Settings(Record):
    """Daemon-wide defaults; a single record stored under the key ``global``.

    ``nop_interval``: seconds between NOP-In pings on an idle connection
    (0 disables); ``nop_timeout``: seconds without an answer before the
    connection is dropped; ``default_portal``: used by ``target_create``
    when no portal is given.
    """

    RECORD_KIND: ClassVar[str] = "settings"
    CONFIG_SECTION: ClassVar[str | None] = "settings"
    CONFIG_SINGLETON: ClassVar[bool] = True
    CONFIG_LABEL: ClassVar[str] = "settings"
    KEY: ClassVar[str] = "global"

    nop_interval: int = 15
    nop_timeout: int = 30
    default_portal: str = "0.0.0.0:3260"

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_int, self.nop_interval, "nop_interval", 0, 3600)
        _collect(errors, check_int, self.nop_timeout, "nop_timeout", 1, 3600)
        portal = _collect(errors, normalize_portal, self.default_portal, prefix="default_portal: ")
        if portal:
            self.default_portal = portal
        return errors


def effective_chap(target: Target, initiator: str) -> Chap | None:
    """CHAP an initiator must pass for ``target``: its ACL's, else the target's, else None.

    ``initiator`` must already be normalized with ``normalize_iscsi_name``.
    """
    acl = target.acls.get(initiator)
    if acl is not None and acl.chap is not None:
        return acl.chap
    return target.chap


def initiator_allowed(target: Target, initiator: str) -> bool:
    """True if ``initiator`` (normalized) may log in: it has an ACL or access is open."""
    return target.open_access or initiator in target.acls
