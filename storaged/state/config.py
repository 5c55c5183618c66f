"""Whole-config JSON export/import (like targetcli saveconfig/restoreconfig).

The export is a backup: it includes CHAP secrets and is written mode 0600.
Import validates *everything* first (every record, every cross reference),
collecting all errors; only if there are none does it replace the config, in
one transaction.  Records of other kinds (persistent runtime state such as
PR registrations) are not config and are left alone.

File format::

    {"format": "storaged-config", "version": 1,
     "settings": {...}, "backstores": [{...}, ...], "targets": [{...}, ...],
     "alua_groups": [{...}, ...],          # only when ALUA groups are configured
     "raid_arrays": [{...}, ...]}          # only when RAID arrays are recorded

RAID array records (kind ``raid``, defined by ``storaged.raid.service``) are
found through the record registry, so this module does not import the
storage layer.  A config without ``raid_arrays`` leaves them alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from storaged.state.alua import AluaGroup
from storaged.state.errors import ValidationError
from storaged.state.records import Backstore, Record, Settings, Target, record_types
from storaged.state.store import Store, Txn

CONFIG_FORMAT = "storaged-config"
CONFIG_VERSION = 1
_TOP_KEYS = {"format", "version", "settings", "backstores", "targets", "alua_groups",
             "raid_arrays"}


def export_txn(txn: Txn) -> dict[str, Any]:
    """The whole config (with secrets) as a JSON-ready dict, from one snapshot."""
    return {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "settings": txn.settings().to_dict(),
        "backstores": [b.to_dict() for b in txn.list(Backstore)],
        "targets": [t.to_dict() for t in txn.list(Target)],
        **_export_alua(txn),
        **_export_raid(txn),
    }


def _export_raid(txn: Txn) -> dict[str, Any]:
    cls = record_types().get("raid")
    arrays = txn.list(cls) if cls is not None else []
    return {"raid_arrays": [a.to_dict() for a in arrays]} if arrays else {}


def _parse_raid(data: dict[str, Any]) -> tuple[list[Record] | None, list[str]]:
    """RAID array records of a config (None: the config has none to restore)."""
    items = data.get("raid_arrays")
    if items is None:
        return None, []
    cls = record_types().get("raid")
    if cls is None:
        return None, ["raid_arrays: RAID support is not loaded"]
    if not isinstance(items, list):
        return None, ["raid_arrays must be a list"]
    out: list[Record] = []
    errors: list[str] = []
    for i, item in enumerate(items):
        try:
            out.append(cls.from_dict(item))
        except ValidationError as e:
            errors += [f"raid array #{i + 1}: {m}" for m in e.errors]
    return out, errors


def _export_alua(txn: Txn) -> dict[str, Any]:
    groups = txn.list(AluaGroup)
    return {"alua_groups": [g.to_dict() for g in groups]} if groups else {}


def _parse_alua(data: dict[str, Any]) -> tuple[list[AluaGroup], list[str]]:
    """ALUA target port group records of a config (docs/alua.md)."""
    items = data.get("alua_groups", [])
    if not isinstance(items, list):
        return [], ["alua_groups must be a list"]
    out: list[AluaGroup] = []
    errors: list[str] = []
    for i, item in enumerate(items):
        try:
            g = AluaGroup.from_dict(item)
        except ValidationError as e:
            errors += [f"alua group #{i + 1}: {m}" for m in e.errors]
            continue
        if any(o.id == g.id for o in out):
            errors.append(f"alua group {g.id} is defined twice")
        out.append(g)
    return out, errors


def export_config(store: Store) -> dict[str, Any]:
    """The whole config (with secrets) as a JSON-ready dict."""
    with store.read() as txn:
        return export_txn(txn)


def _label(kind: str, index: int, item: Any, key: str) -> str:
    if isinstance(item, dict) and isinstance(item.get(key), str):
        return f"{kind} {item[key]!r}" if kind == "backstore" else f"{kind} {item[key]}"
    return f"{kind}s[{index}]"


def _missing_backstores(label: str, luns: Any, known: set[str]) -> list[str]:
    """Errors for LUNs in ``luns`` (a mapping, maybe unvalidated) naming unknown backstores."""
    if not isinstance(luns, dict):
        return []
    return [f"{label}: lun {lun} refers to missing backstore {name!r}"
            for lun, name in luns.items() if isinstance(name, str) and name not in known]


def check_references(backstores: list[Backstore], targets: list[Target],
                     invalid_names: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Cross-record rules: unique names/paths/IQNs and LUNs pointing at real backstores.

    ``invalid_names`` are backstores that exist in the input but failed
    validation: LUNs naming them are not reported again as "missing".
    """
    errors: list[str] = []
    names: set[str] = set()
    paths: dict[str, str] = {}
    for b in backstores:
        if b.name in names:
            errors.append(f"backstore {b.name!r} is defined twice")
        names.add(b.name)
        if b.path in paths and paths[b.path] != b.name:
            errors.append(f"backstore {b.name!r}: path {b.path} is already used by backstore "
                          f"{paths[b.path]!r}")
        paths.setdefault(b.path, b.name)
    iqns: set[str] = set()
    for t in targets:
        if t.iqn in iqns:
            errors.append(f"target {t.iqn} is defined twice")
        iqns.add(t.iqn)
        errors += _missing_backstores(f"target {t.iqn}", t.luns, names | set(invalid_names))
    return errors


def parse_config(data: Any) -> tuple[Settings, list[Backstore], list[Target], list[str]]:
    """Validate a config dict; return typed records and the list of all errors."""
    settings = Settings()
    backstores: list[Backstore] = []
    targets: list[Target] = []
    if not isinstance(data, dict):
        return settings, backstores, targets, ["config must be a JSON object"]
    errors = [f"unknown top-level key {k!r}" for k in data if k not in _TOP_KEYS]
    if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        errors.append(f"not a storaged config (format {data.get('format')!r})")
    if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        errors.append(f"unsupported config version {data.get('version')!r} "
                      f"(this storaged reads version {CONFIG_VERSION})")
    invalid: set[str] = set()
    bad_targets: list[tuple[str, Any]] = []
    if "settings" in data:
        try:
            settings = Settings.from_dict(data["settings"])
        except ValidationError as e:
            errors += [f"settings: {m}" for m in e.errors]
    for kind, cls, key, out in (("backstore", Backstore, "name", backstores),
                                ("target", Target, "iqn", targets)):
        items = data.get(kind + "s", [])
        if not isinstance(items, list):
            errors.append(f"{kind}s must be a list")
            continue
        for i, item in enumerate(items):
            try:
                out.append(cls.from_dict(item))
            except ValidationError as e:
                errors += [f"{_label(kind, i, item, key)}: {m}" for m in e.errors]
                if isinstance(item, dict) and isinstance(item.get(key), str):
                    invalid.add(item[key])
                if kind == "target":
                    bad_targets.append((_label(kind, i, item, key), item))
    errors += check_references(backstores, targets, invalid)
    errors += _parse_alua(data)[1]
    errors += _parse_raid(data)[1]
    # Targets that failed validation still get their LUN references checked.
    known = {b.name for b in backstores} | invalid
    for label, item in bad_targets:
        if isinstance(item, dict):
            errors += _missing_backstores(label, item.get("luns"), known)
    return settings, backstores, targets, errors


def import_txn(txn: Txn, data: Any) -> list[str]:
    """Validate ``data``; if it is clean, replace the config inside ``txn``.

    Returns the list of errors; when it is non-empty nothing was written.
    """
    settings, backstores, targets, errors = parse_config(data)
    if errors:
        return errors
    txn.clear(Target)
    txn.clear(Backstore)
    txn.clear(AluaGroup)
    txn.put(settings)
    for record in [*backstores, *targets, *_parse_alua(data)[0]]:
        txn.put(record)
    arrays = _parse_raid(data)[0]
    if arrays is not None:
        txn.clear(type(arrays[0]) if arrays else record_types()["raid"])
        for record in arrays:
            txn.put(record)
    return []


def import_config(store: Store, data: Any) -> list[str]:
    """Replace the whole config with ``data`` in one transaction, or change nothing.

    Returns every error found (empty list = imported).
    """
    with store.write() as txn:
        return import_txn(txn, data)


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` atomically: temp file in the same dir, fsync, rename; 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".storaged-config-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_config(store: Store, path: str) -> None:
    """Export the config to ``path`` (atomic replace, mode 0600)."""
    write_json_atomic(path, export_config(store))


def load_config_file(path: str) -> Any:
    """Read a config file; a JSON syntax error becomes a ValidationError."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValidationError(f"{path}: invalid JSON: {e}") from None


def restore_config(store: Store, path: str) -> list[str]:
    """Import a config file; returns all errors (nothing changed if any)."""
    return import_config(store, load_config_file(path))
