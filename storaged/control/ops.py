"""Config operations shared by the CLI (offline, on the Store) and the daemon (live).

Every operation takes a write ``Txn`` first, validates everything before it
changes anything, and raises ``ConfigError`` naming the problem.  ``apply``
runs one named operation in its own transaction (so a failed operation leaves
the store untouched) and is what both the CLI and the control socket call.
Results are JSON-ready dicts and never contain CHAP secrets, except for the
deliberate ``export_config`` backup operation.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from storaged.block import FileBlockDevice
from storaged.block.file import probe_direct
from storaged.block.open import is_url, open_device, redact
from storaged.state import (
    MAX_LUN,
    Acl,
    Backstore,
    Chap,
    PrRecord,
    Store,
    Target,
    Txn,
    ValidationError,
)
from storaged.state.params import check_param_set, normalize_param, param_key
from storaged.state.validate import (
    check_bool,
    check_int,
    normalize_iscsi_name,
    normalize_name,
    normalize_portal,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


class ConfigError(Exception):
    """A config operation was refused; the message names the problem.

    ``errors`` holds every individual problem (several for a config import).
    """

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors: list[str] = list(errors) if errors else [message]


@dataclass(frozen=True)
class OpSpec:
    """A registered operation: ``fn(txn, **args)``; ``mutating`` ones run in a write txn."""

    name: str
    fn: Callable[..., dict[str, Any]]
    mutating: bool


OPS: dict[str, OpSpec] = {}


def _op(mutating: bool = True, name: str | None = None
        ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an operation and turn state-layer ValidationErrors into ConfigErrors."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ValidationError as e:
                raise ConfigError(str(e), e.errors) from None
        op = name or fn.__name__
        OPS[op] = OpSpec(op, wrapper, mutating)
        return wrapper
    return deco


# ---------------------------------------------------------------- helpers

def parse_size(value: str | int) -> int:
    """Bytes from ``4096``, ``"512M"``, ``"1G"``, ``"1GiB"``, ``"1.5T"``.

    Suffixes K/M/G/T/P/E (optionally followed by B or iB) are binary
    (powers of 1024), as in targetcli; a bare number is bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number, unit = m.group(1), m.group(2).lower()
        if m.group(3) and not unit and m.group(3).lower() == "ib":
            raise ConfigError(f"invalid size {value!r}")
        scaled = Fraction(number) * 1024 ** _UNITS[unit]
        if scaled.denominator != 1:
            raise ConfigError(f"size {value!r} is not a whole number of bytes")
        n = int(scaled)
    else:
        raise ConfigError(f"invalid size {value!r}: use bytes or a number with K, M, G, T "
                          "(e.g. 512M, 10G, 1GiB)")
    if n <= 0:
        raise ConfigError(f"size must be positive, got {value!r}")
    return n


def format_size(n: int) -> str:
    """Human-readable binary size: ``1.0GiB``, ``512.0MiB``, ``4096B``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n}B"


def _device_size(path: str, block_size: int) -> int:
    """Usable capacity of a block device, probed the way the daemon will open it."""
    try:
        dev = FileBlockDevice(path, block_size=block_size, read_only=True)
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        return dev.size
    finally:
        dev.close()


def _check_direct(path: str, block_size: int) -> None:
    """ConfigError unless PATH takes O_DIRECT I/O (tmpfs before Linux 6.6, ramfs,
    some FUSE/network filesystems refuse it; 4Kn disks refuse 512-byte blocks)."""
    try:
        probe_direct(path, block_size)
    except OSError as e:
        raise ConfigError(f"cannot use O_DIRECT (--direct) on {path}: "
                          f"{e.strerror or e}") from None


def _target(txn: Txn, iqn: str) -> Target:
    iqn = normalize_iscsi_name(iqn)
    target = txn.get(Target, iqn)
    if target is None:
        raise ConfigError(f"target {iqn} does not exist")
    return target


def _described(txn: Txn, target: Target) -> dict[str, Any]:
    return describe_target(target, {b.name: b for b in txn.list(Backstore)})


def _lun_users(txn: Txn, name: str) -> list[tuple[str, int]]:
    return [(t.iqn, lun) for t in txn.list(Target) for lun, b in t.luns.items() if b == name]


# ------------------------------------------------------------- describe

def _chap_text(chap: Chap | None) -> str | None:
    return None if chap is None else chap.describe()


def describe_backstore(b: Backstore, used_by: list[tuple[str, int]]) -> dict[str, Any]:
    """A backstore as a JSON-ready dict plus where it is exported."""
    d = b.to_dict()
    d["path"] = redact(b.path)   # an iscsi:// URL may carry a CHAP secret
    d["used_by"] = [{"iqn": iqn, "lun": lun} for iqn, lun in used_by]
    return d


def describe_target(t: Target, backstores: dict[str, Backstore] | None = None) -> dict[str, Any]:
    """A target as a JSON-ready dict with CHAP redacted to ``user=<u> (mutual: <u2>)``."""
    backstores = backstores or {}
    return {
        "iqn": t.iqn,
        "tpgt": t.tpgt,
        "portals": list(t.portals),
        "luns": [{"lun": lun, "backstore": name,
                  "path": backstores[name].path if name in backstores else None}
                 for lun, name in sorted(t.luns.items())],
        "open_access": t.open_access,
        "acls": [{"initiator": a.initiator, "chap": _chap_text(a.chap)}
                 for a in t.acls.values()],
        "chap": _chap_text(t.chap),
        "params": dict(t.params),
        "queue_depth": t.queue_depth,
    }


@_op(mutating=False, name="describe")
def describe_txn(txn: Txn) -> dict[str, Any]:
    """The whole config tree, secrets redacted (what ``storaged ls`` shows)."""
    backstores = {b.name: b for b in txn.list(Backstore)}
    targets = txn.list(Target)
    users: dict[str, list[tuple[str, int]]] = {}
    for t in targets:
        for lun, name in sorted(t.luns.items()):
            users.setdefault(name, []).append((t.iqn, lun))
    from storaged.cluster.config import ClusterConfig, LocalNode
    from storaged.control.alua_ops import describe_group, stored_groups
    from storaged.nas.exports import Export, NfsSettings
    from storaged.raid.records import RaidVolume
    from storaged.vip.records import FloatingAddress

    nfs = txn.get(NfsSettings, NfsSettings.KEY) or NfsSettings()
    cluster = txn.get(ClusterConfig, ClusterConfig.KEY)
    local = txn.get(LocalNode, LocalNode.KEY)
    exported = {b.path: b.name for b in backstores.values() if b.kind == "raid"}
    return {
        "settings": txn.settings().to_dict(),
        "backstores": [describe_backstore(b, users.get(n, [])) for n, b in backstores.items()],
        "targets": [describe_target(t, backstores) for t in targets],
        "nfs": {"settings": nfs.to_dict(), "exports": [e.describe() for e in txn.list(Export)]},
        "alua": [describe_group(g) for g in stored_groups(txn)],
        "raid_arrays": [{"name": a.name, "level": a.level, "members": a.members,
                         "size": a.size, "size_text": format_size(a.size), "uuid": a.uuid,
                         "backstore": exported.get(a.name)} for a in txn.list(RaidVolume)],
        "cluster": None if cluster is None else {
            **cluster.to_dict(), "local_node": local.node_id if local is not None else None},
        "vips": [v.to_dict() for v in txn.list(FloatingAddress)],
    }


def describe(store: Store) -> dict[str, Any]:
    """The whole config tree with secrets redacted."""
    with store.read() as txn:
        return describe_txn(txn)


@_op(mutating=False)
def export_config(txn: Txn) -> dict[str, Any]:
    """The full config INCLUDING secrets (for ``config save``; root-only socket)."""
    from storaged.control.backup import export_txn

    return export_txn(txn)


@_op()
def import_config(txn: Txn, data: dict[str, Any]) -> dict[str, Any]:
    """Replace the whole config; ConfigError listing every problem if ``data`` is bad."""
    from storaged.control.backup import import_txn, summary

    errors = import_txn(txn, data)
    if errors:
        n = len(errors)
        raise ConfigError(f"config has {n} error{'s' if n > 1 else ''}:\n  " +
                          "\n  ".join(errors), errors)
    return {"backstores": len(txn.keys(Backstore)), "targets": len(txn.keys(Target)),
            "summary": summary(data)}


# ------------------------------------------------------------ backstores

def _detect(path: str) -> tuple[str | None, os.stat_result | None]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise ConfigError(f"cannot access {path}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return "block", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    raise ConfigError(f"{path} is neither a regular file nor a block device")


@_op()
def backstore_create(txn: Txn, name: str, path: str, size: str | int | None = None,
                     kind: str | None = None, block_size: int = 512, read_only: bool = False,
                     wce: bool = True, direct: bool = False,
                     shared: bool = False) -> dict[str, Any]:
    """Register a file or block device as a backstore.

    Files: an existing file is used at its size (``size``, if given, must
    match); a missing file is created sparse (mode 0600) and needs ``size``.
    Block devices: ``size`` 0/None means the whole device.  ``kind`` is
    detected from the path when not given.  ``direct`` opens it O_DIRECT
    (checked here: a filesystem that refuses O_DIRECT is a ConfigError).
    """
    name = normalize_name(name, "backstore name")
    if txn.get(Backstore, name) is not None:
        raise ConfigError(f"backstore {name!r} already exists")
    if block_size not in (512, 4096) or isinstance(block_size, bool):
        raise ConfigError(f"block size must be 512 or 4096, got {block_size!r}")
    check_bool(read_only, "read_only")
    check_bool(wce, "wce")
    check_bool(direct, "direct")
    check_bool(shared, "shared")
    if isinstance(path, str) and is_url(path):
        return _remote_backstore_create(txn, name, path, size, kind, block_size, read_only,
                                        wce, direct)
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ConfigError(f"backstore path must be absolute, got {path!r}")
    path = os.path.normpath(path)
    for other in txn.list(Backstore):
        if other.path == path:
            raise ConfigError(f"{path} is already used by backstore {other.name!r}")
    if kind not in (None, "file", "block"):
        raise ConfigError(f"kind must be 'file' or 'block', got {kind!r}")
    nbytes = parse_size(size) if size not in (None, 0) else None
    detected, st = _detect(path)
    if kind is not None and detected is not None and kind != detected:
        raise ConfigError(f"{path} is a {'block device' if detected == 'block' else 'file'}, "
                          f"not a {'block device' if kind == 'block' else 'file'}")
    kind = kind or detected or "file"
    create = False
    if kind == "block":
        if st is None:
            raise ConfigError(f"block device {path} does not exist")
        if nbytes is not None:
            dev = _device_size(path, block_size)
            if nbytes > dev:
                raise ConfigError(f"size {nbytes} exceeds the size of {path} ({dev} bytes)")
        final = nbytes or 0
    elif st is not None:
        if nbytes is not None and nbytes != st.st_size:
            raise ConfigError(f"{path} already exists with size {st.st_size}, not {nbytes}; "
                              "omit --size to use the existing file")
        if st.st_size == 0:
            raise ConfigError(f"{path} is empty; delete it or give a size")
        final = st.st_size
    else:
        if nbytes is None:
            raise ConfigError(f"size required to create {path}")
        if not os.path.isdir(os.path.dirname(path)):
            raise ConfigError(f"directory {os.path.dirname(path)} does not exist")
        final, create = nbytes, True
    if final % block_size:
        raise ConfigError(f"size {final} of {path} is not a multiple of the block size "
                          f"{block_size}")
    record = Backstore(name=name, kind=kind, path=path, size=final, block_size=block_size,
                       read_only=read_only, wce=wce, direct=direct, shared=shared)
    record.validate()
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, final)
            finally:
                os.close(fd)
        except OSError as e:
            raise ConfigError(f"cannot create {path}: {e.strerror}") from None
    if direct:
        try:
            _check_direct(path, block_size)
        except ConfigError:
            if create:
                os.unlink(path)
            raise
    txn.put(record)
    return describe_backstore(record, [])


def _remote_backstore_create(txn: Txn, name: str, url: str, size: str | int | None,
                             kind: str | None, block_size: int, read_only: bool, wce: bool,
                             direct: bool) -> dict[str, Any]:
    """A backstore on a LUN of another storage node (kind ``iscsi``): probed
    through the initiator now, so a wrong URL fails here and not at start."""
    if kind not in (None, "iscsi"):
        raise ConfigError(f"{redact(url)} is an iscsi:// URL: kind must be 'iscsi'")
    if direct:
        raise ConfigError("direct (O_DIRECT) applies to file and block backstores, not iscsi")
    for other in txn.list(Backstore):
        if other.path == url:
            raise ConfigError(f"{redact(url)} is already used by backstore {other.name!r}")
    try:
        dev = open_device(url, block_size=block_size, read_only=True, login_timeout=10.0,
                          replacement_timeout=5.0)
    except OSError as e:
        raise ConfigError(f"cannot open {e.strerror or e}") from None
    try:
        lun_bytes = dev.size
    finally:
        dev.close()
    nbytes = parse_size(size) if size not in (None, 0) else None
    if nbytes is not None and nbytes > lun_bytes:
        raise ConfigError(f"size {nbytes} exceeds the size of {redact(url)} ({lun_bytes} bytes)")
    final = nbytes or 0
    if final % block_size:
        raise ConfigError(f"size {final} is not a multiple of the block size {block_size}")
    record = Backstore(name=name, kind="iscsi", path=url, size=final, block_size=block_size,
                       read_only=read_only, wce=wce)
    record.validate()
    txn.put(record)
    return describe_backstore(record, [])


@_op()
def backstore_delete(txn: Txn, name: str) -> dict[str, Any]:
    """Forget a backstore (the file itself is kept); refused while a LUN uses it."""
    if txn.get(Backstore, name) is None:
        raise ConfigError(f"backstore {name!r} does not exist")
    users = _lun_users(txn, name)
    if users:
        where = ", ".join(f"target {iqn} lun {lun}" for iqn, lun in users)
        raise ConfigError(f"backstore {name!r} is in use by {where}; remove the LUN first")
    txn.delete(Backstore, name)
    return {"deleted": name}


@_op()
def backstore_set(txn: Txn, name: str, read_only: bool | None = None,
                  online: bool | None = None, wce: bool | None = None,
                  direct: bool | None = None, shared: bool | None = None) -> dict[str, Any]:
    """Change a backstore's flags: write protection, online state, write cache,
    O_DIRECT (switched on the open file, LUNs stay up), shared (persistent
    reservations kept with the other storage nodes of the cluster)."""
    b = txn.get(Backstore, name)
    if b is None:
        raise ConfigError(f"backstore {name!r} does not exist")
    for value, what in ((read_only, "read_only"), (online, "online"), (wce, "wce"),
                        (direct, "direct"), (shared, "shared")):
        if value is not None:
            check_bool(value, what)
            setattr(b, what, value)
    if direct:
        if b.kind in ("raid", "iscsi"):
            raise ConfigError("direct (O_DIRECT) applies to file and block backstores, "
                              f"not {b.kind}")
        _check_direct(b.path, b.block_size)
    txn.put(b)
    return describe_backstore(b, _lun_users(txn, name))


@_op()
def backstore_resize(txn: Txn, name: str, size: str | int) -> dict[str, Any]:
    """Grow a file backstore (initiators get CAPACITY DATA HAS CHANGED).

    Shrinking is refused: it would cut off data an initiator still addresses.
    """
    b = txn.get(Backstore, name)
    if b is None:
        raise ConfigError(f"backstore {name!r} does not exist")
    if b.kind != "file":
        raise ConfigError(f"backstore {name!r} is a {b.kind} backstore; only files can be "
                          "resized here (resize the device, storaged notices)")
    nbytes = parse_size(size)
    if nbytes % b.block_size:
        raise ConfigError(f"size {nbytes} is not a multiple of the block size {b.block_size}")
    if nbytes < b.size:
        raise ConfigError(f"shrinking {name!r} from {b.size} to {nbytes} bytes would lose "
                          "data; only growing is supported")
    if nbytes != b.size:
        try:
            with open(b.path, "r+b") as f:
                f.truncate(nbytes)
        except OSError as e:
            raise ConfigError(f"cannot resize {b.path}: {e.strerror}") from None
        b.size = nbytes
        txn.put(b)
    return describe_backstore(b, _lun_users(txn, name))


# --------------------------------------------------------------- targets

@_op()
def target_create(txn: Txn, iqn: str, portals: list[str] | None = None) -> dict[str, Any]:
    """Create a target listening on ``portals`` (default: Settings.default_portal)."""
    iqn = normalize_iscsi_name(iqn)
    if txn.get(Target, iqn) is not None:
        raise ConfigError(f"target {iqn} already exists")
    if portals is not None and not isinstance(portals, list):
        raise ConfigError("portals must be a list")
    target = Target(iqn=iqn, portals=list(portals or [txn.settings().default_portal]))
    txn.put(target)
    return _described(txn, target)


@_op()
def target_delete(txn: Txn, iqn: str) -> dict[str, Any]:
    """Delete a target with its LUN map, ACLs and CHAP (backstores are kept)."""
    target = _target(txn, iqn)
    txn.delete(Target, target.iqn)
    return {"deleted": target.iqn}


@_op()
def target_open(txn: Txn, iqn: str, open: bool) -> dict[str, Any]:
    """Open access (any initiator may log in) on or off; ACL entries still apply CHAP."""
    target = _target(txn, iqn)
    target.open_access = check_bool(open, "open")
    txn.put(target)
    return _described(txn, target)


def _set_one(target: Target, key: str, value: str | int | None) -> None:
    if isinstance(key, str) and key.lower() in ("queue_depth", "queuedepth"):
        if value is None or value == "":
            target.queue_depth = 128
            return
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit():
            raise ConfigError(f"queue_depth must be an integer 1..1024, got {value!r}")
        target.queue_depth = check_int(int(text), "queue_depth", 1, 1024)
        return
    if isinstance(key, str) and key.lower() == "tpgt":
        # Target portal group tag = relative target port id (ALUA, docs/alua.md).
        text = "1" if value is None or value == "" else str(value).strip()
        if isinstance(value, bool) or not text.isdigit():
            raise ConfigError(f"tpgt must be an integer 1..65535, got {value!r}")
        target.tpgt = check_int(int(text), "tpgt", 1, 65535)
        return
    if value is None or value == "":
        target.params.pop(param_key(key), None)
        return
    canon, norm = normalize_param(key, value)
    target.params[canon] = norm


@_op()
def params_set(txn: Txn, iqn: str, params: dict[str, str | int | None]) -> dict[str, Any]:
    """Set several iSCSI parameters / ``queue_depth`` at once (all or nothing).

    A value of None or "" removes the override (back to the RFC default).
    """
    target = _target(txn, iqn)
    if not isinstance(params, dict) or not params:
        raise ConfigError("give at least one KEY=VALUE")
    for key, value in params.items():
        _set_one(target, key, value)
    problems = check_param_set(target.params)
    if problems:
        raise ConfigError("; ".join(problems), problems)
    txn.put(target)
    return _described(txn, target)


@_op()
def param_set(txn: Txn, iqn: str, key: str, value: str | int | None) -> dict[str, Any]:
    """Set one iSCSI operational parameter (RFC 7143 §13 whitelist) or ``queue_depth``."""
    return params_set(txn, iqn, {key: value})


# ------------------------------------------------------------------ LUNs

@_op()
def lun_add(txn: Txn, iqn: str, backstore: str, lun: int | None = None) -> dict[str, Any]:
    """Export ``backstore`` as ``lun`` (default: lowest free id) of the target."""
    target = _target(txn, iqn)
    if txn.get(Backstore, backstore) is None:
        raise ConfigError(f"backstore {backstore!r} does not exist")
    for used, name in target.luns.items():
        if name == backstore:
            raise ConfigError(f"backstore {backstore!r} is already lun {used} of {target.iqn}")
    if lun is None:
        lun = next(i for i in range(MAX_LUN + 1) if i not in target.luns)
    else:
        check_int(lun, "lun", 0, MAX_LUN)
        if lun in target.luns:
            raise ConfigError(f"lun {lun} of {target.iqn} is already used by backstore "
                              f"{target.luns[lun]!r}")
    target.luns[lun] = backstore
    txn.put(target)
    return {"iqn": target.iqn, "lun": lun, "backstore": backstore}


@_op()
def lun_remove(txn: Txn, iqn: str, lun: int) -> dict[str, Any]:
    """Unmap a LUN (the backstore stays)."""
    target = _target(txn, iqn)
    check_int(lun, "lun", 0, MAX_LUN)
    if lun not in target.luns:
        raise ConfigError(f"target {target.iqn} has no lun {lun}")
    name = target.luns.pop(lun)
    txn.put(target)
    return {"iqn": target.iqn, "lun": lun, "backstore": name}


# --------------------------------------------------------------- portals

@_op()
def portal_add(txn: Txn, iqn: str, portal: str) -> dict[str, Any]:
    """Add a listening portal ``ip:port`` (port defaults to 3260)."""
    target = _target(txn, iqn)
    portal = normalize_portal(portal)
    if portal in target.portals:
        raise ConfigError(f"target {target.iqn} already has portal {portal}")
    target.portals.append(portal)
    txn.put(target)
    return _described(txn, target)


@_op()
def portal_remove(txn: Txn, iqn: str, portal: str) -> dict[str, Any]:
    """Remove a portal from a target."""
    target = _target(txn, iqn)
    portal = normalize_portal(portal)
    if portal not in target.portals:
        raise ConfigError(f"target {target.iqn} has no portal {portal}")
    target.portals.remove(portal)
    txn.put(target)
    return _described(txn, target)


# ------------------------------------------------------------- ACLs/CHAP

@_op()
def acl_add(txn: Txn, iqn: str, initiator: str) -> dict[str, Any]:
    """Allow ``initiator`` to log in to the target."""
    target = _target(txn, iqn)
    initiator = normalize_iscsi_name(initiator)
    if initiator in target.acls:
        raise ConfigError(f"target {target.iqn} already has an ACL for {initiator}")
    target.acls[initiator] = Acl(initiator=initiator)
    txn.put(target)
    return _described(txn, target)


@_op()
def acl_remove(txn: Txn, iqn: str, initiator: str) -> dict[str, Any]:
    """Remove an initiator's ACL entry (and its CHAP credentials)."""
    target = _target(txn, iqn)
    initiator = normalize_iscsi_name(initiator)
    if target.acls.pop(initiator, None) is None:
        raise ConfigError(f"target {target.iqn} has no ACL for {initiator}")
    txn.put(target)
    return _described(txn, target)


def _acl(target: Target, initiator: str) -> Acl:
    initiator = normalize_iscsi_name(initiator)
    acl = target.acls.get(initiator)
    if acl is None:
        raise ConfigError(f"target {target.iqn} has no ACL for {initiator}; "
                          "add it first with 'storaged acl add'")
    return acl


@_op()
def chap_set(txn: Txn, iqn: str, user: str, password: str, mutual_user: str | None = None,
             mutual_password: str | None = None, initiator: str | None = None
             ) -> dict[str, Any]:
    """Set CHAP credentials: target-wide (``initiator=None``) or for one ACL entry.

    ``mutual_*`` enables two-way CHAP (the target proves itself too).
    """
    target = _target(txn, iqn)
    chap = Chap(user=user, password=password, mutual_user=mutual_user,
                mutual_password=mutual_password)
    chap.validate()
    if initiator is None:
        target.chap = chap
    else:
        _acl(target, initiator).chap = chap
    txn.put(target)
    return _described(txn, target)


@_op()
def chap_clear(txn: Txn, iqn: str, initiator: str | None = None) -> dict[str, Any]:
    """Remove CHAP credentials (target-wide or one ACL entry's); idempotent."""
    target = _target(txn, iqn)
    if initiator is None:
        target.chap = None
    else:
        _acl(target, initiator).chap = None
    txn.put(target)
    return _described(txn, target)


# -------------------------------------------------------------- settings

@_op()
def settings_set(txn: Txn, values: dict[str, str | int]) -> dict[str, Any]:
    """Change global settings (nop_interval, nop_timeout, default_portal)."""
    settings = txn.settings()
    if not isinstance(values, dict) or not values:
        raise ConfigError("give at least one KEY=VALUE")
    for key, value in values.items():
        if key in ("nop_interval", "nop_timeout"):
            text = str(value).strip()
            if isinstance(value, bool) or not text.isdigit():
                raise ConfigError(f"{key} must be a whole number of seconds, got {value!r}")
            setattr(settings, key, int(text))
        elif key == "default_portal":
            settings.default_portal = str(value)
        else:
            raise ConfigError(f"unknown setting {key!r} "
                              "(known: nop_interval, nop_timeout, default_portal)")
    txn.put(settings)
    return settings.to_dict()


# ------------------------------------------------ persistent reservations

def _pr_backstores(txn: Txn, backstore: str | None) -> list[Backstore]:
    if backstore is None:
        return txn.list(Backstore)
    b = txn.get(Backstore, backstore)
    if b is None:
        raise ConfigError(f"backstore {backstore!r} does not exist")
    return [b]


@_op(mutating=False)
def pr_ls(txn: Txn, backstore: str | None = None) -> dict[str, Any]:
    """Persistent reservations saved with APTPL (the daemon answers this op
    itself with the live state of every LUN)."""
    from storaged.scsi.pr import describe_state

    out = []
    for b in _pr_backstores(txn, backstore):
        record = txn.get(PrRecord, b.name)
        state = record.state() if record is not None and record.wwn in ("", b.wwn) else {}
        out.append({"backstore": b.name,
                    "luns": [{"iqn": iqn, "lun": lun} for iqn, lun in _lun_users(txn, b.name)],
                    **describe_state(state)})
    return {"live": False, "backstores": out}


@_op()
def pr_clear(txn: Txn, backstore: str) -> dict[str, Any]:
    """Forget the saved (APTPL) registrations and reservation of a backstore
    (the daemon answers this op itself and clears the live state too)."""
    from storaged.scsi.pr import describe_state

    [b] = _pr_backstores(txn, backstore)
    record = txn.get(PrRecord, b.name)
    before = describe_state(record.state() if record is not None else {})
    txn.delete(PrRecord, b.name)
    return {"backstore": b.name, "cleared": before}


# -------------------------------------------------------------- dispatch

def check_args(op: str, args: Any) -> OpSpec:
    """Look up ``op`` and check ``args`` fit its signature; ConfigError otherwise."""
    from storaged.registry import load_operations

    load_operations()
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise ConfigError(f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise ConfigError(f"{op}: arguments must be an object")
    try:
        inspect.signature(spec.fn).bind(None, **args)
    except TypeError as e:
        raise ConfigError(f"{op}: {e}") from None
    return spec


def apply(store: Store, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run operation ``op`` with ``args`` in its own transaction; return its result.

    Mutating operations commit only if they succeed; any error aborts the
    transaction, so the store is unchanged.
    """
    args = {} if args is None else args
    spec = check_args(op, args)
    if spec.mutating:
        with store.write() as txn:
            return spec.fn(txn, **args)
    with store.read() as txn:
        return spec.fn(txn, **args)


def is_mutating(op: str) -> bool:
    """True if ``op`` is a registered operation that changes the config."""
    from storaged.registry import load_operations

    load_operations()
    spec = OPS.get(op)
    return bool(spec and spec.mutating)
