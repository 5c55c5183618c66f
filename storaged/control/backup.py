"""Whole-config JSON backup and restore (like targetcli saveconfig/restoreconfig).

Every record kind that is configuration names its section of the file
(``Record.CONFIG_SECTION``) and :mod:`storaged.registry` lists the kinds, so
``config save``, ``config restore`` and ``storaged ls`` cover the same set:
settings, backstores, targets (with LUNs, ACLs and CHAP), ALUA groups, RAID
arrays, NFS exports and settings, the cluster configuration and this host's
node id.  Runtime state (PR registrations, NSM monitors) is not config: a
restore leaves it alone.

The file is a backup: it includes CHAP secrets and is written mode 0600,
atomically (:func:`storaged.state.config.write_json_atomic`).  Restore
validates *everything* first (every record, every cross reference) and
collects all errors; only if there are none does it replace the config, in
one transaction.

A section missing from a file: ``settings``, ``backstores``, ``targets`` and
``alua_groups`` (in every file since version 1) mean the default or none;
the later sections leave the store's records as they are, so an older file
restores without wiping the RAID arrays or NFS exports it never knew.  A
singleton section that is ``null`` means "not configured" and deletes it.
"""

from __future__ import annotations

from typing import Any

from storaged.registry import CONFIG_KINDS
from storaged.state import Backstore, Record, Settings, Store, Target, Txn, ValidationError
from storaged.state.config import load_config_file, write_json_atomic

CONFIG_FORMAT = "storaged-config"
CONFIG_VERSION = 1
#: sections every version-1 file had: absent means empty (or default settings)
_ALWAYS = frozenset({"settings", "backstores", "targets", "alua_groups"})


def _singleton(txn: Txn, cls: type[Record]) -> Record | None:
    if cls is Settings:
        return txn.settings()
    return txn.get(cls, cls.KEY)  # type: ignore[attr-defined]


def export_txn(txn: Txn) -> dict[str, Any]:
    """The whole config (with secrets) as a JSON-ready dict, from one snapshot."""
    out: dict[str, Any] = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
    for cls in CONFIG_KINDS:
        if cls.CONFIG_SINGLETON:
            rec = _singleton(txn, cls)
            out[cls.CONFIG_SECTION] = rec.to_dict() if rec is not None else None
        else:
            out[cls.CONFIG_SECTION] = [r.to_dict() for r in txn.list(cls)]
    return out


def export_config(store: Store) -> dict[str, Any]:
    """The whole config (with secrets) as a JSON-ready dict."""
    with store.read() as txn:
        return export_txn(txn)


def _parse_section(cls: type[Record], items: Any
                   ) -> tuple[list[Record] | None, list[str], list[Any]]:
    """Records of one section, every error, and the items that failed validation."""
    section = cls.CONFIG_SECTION
    if cls.CONFIG_SINGLETON:
        if items is None:
            return [], [], []
        try:
            return [cls.from_dict(items)], [], []
        except ValidationError as e:
            return None, [f"{section}: {m}" for m in e.errors], [items]
    if not isinstance(items, list):
        return None, [f"{section} must be a list"], []
    out: list[Record] = []
    errors: list[str] = []
    bad: list[Any] = []
    for i, item in enumerate(items):
        try:
            out.append(cls.from_dict(item))
        except ValidationError as e:
            label = cls.config_label(item, i)
            errors += [f"{label}: {m}" for m in e.errors]
            bad.append(item)
    return out, errors + cls.check_section(out), bad


def _missing_backstores(label: str, luns: Any, known: set[str]) -> list[str]:
    """Errors for LUNs in ``luns`` (a mapping, maybe unvalidated) naming unknown backstores."""
    if not isinstance(luns, dict):
        return []
    return [f"{label}: lun {lun} refers to missing backstore {name!r}"
            for lun, name in luns.items() if isinstance(name, str) and name not in known]


def parse_config(data: Any) -> tuple[dict[str, list[Record]], list[str]]:
    """Validate a config dict: the records of each section it holds, and every error.

    Sections absent from ``data`` that a restore leaves alone are absent from
    the returned mapping.
    """
    if not isinstance(data, dict):
        return {}, ["config must be a JSON object"]
    known_keys = {"format", "version", *(c.CONFIG_SECTION for c in CONFIG_KINDS)}
    errors = [f"unknown top-level key {k!r}" for k in data if k not in known_keys]
    if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        errors.append(f"not a storaged config (format {data.get('format')!r})")
    if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        errors.append(f"unsupported config version {data.get('version')!r} "
                      f"(this storaged reads version {CONFIG_VERSION})")
    sections: dict[str, list[Record]] = {}
    invalid: dict[str, list[Any]] = {}
    for cls in CONFIG_KINDS:
        name = cls.CONFIG_SECTION
        if name not in data:
            if name in _ALWAYS:
                sections[name] = []
            continue
        records, errs, bad = _parse_section(cls, data[name])
        errors += errs
        invalid[name] = bad
        if records is not None:
            sections[name] = records
    # LUNs must name backstores of the file; ones that failed validation are not
    # reported again as missing.
    names = {b.key for b in sections.get("backstores", [])}
    names |= {b["name"] for b in invalid.get("backstores", [])
              if isinstance(b, dict) and isinstance(b.get("name"), str)}
    for t in sections.get("targets", []):
        errors += _missing_backstores(Target.config_ref(t.iqn), t.luns, names)
    for item in invalid.get("targets", []):
        if isinstance(item, dict):
            errors += _missing_backstores(Target.config_label(item, 0), item.get("luns"), names)
    return sections, errors


def _raid_references(txn: Txn, sections: dict[str, list[Record]]) -> list[str]:
    """Backstores of kind ``raid`` must name an array the restored config has."""
    raid = next(c for c in CONFIG_KINDS if c.CONFIG_SECTION == "raid_arrays")
    arrays = ({r.key for r in sections["raid_arrays"]} if "raid_arrays" in sections
              else set(txn.keys(raid)))
    return [f"backstore {b.key!r}: raid array {b.path!r} is not in the config"
            for b in sections.get("backstores", [])
            if isinstance(b, Backstore) and b.kind == "raid" and b.path not in arrays]


def import_txn(txn: Txn, data: Any) -> list[str]:
    """Validate ``data``; if it is clean, replace the config inside ``txn``.

    Returns the list of errors; when it is non-empty nothing was written.
    """
    sections, errors = parse_config(data)
    if not errors:
        errors = _raid_references(txn, sections)
    if errors:
        return errors
    for cls in CONFIG_KINDS:
        records = sections.get(cls.CONFIG_SECTION)
        if records is None:
            continue
        txn.clear(cls)
        for record in records:
            txn.put(record)
    return []


def import_config(store: Store, data: Any) -> list[str]:
    """Replace the whole config with ``data`` in one transaction, or change nothing.

    Returns every error found (empty list = imported).
    """
    with store.write() as txn:
        return import_txn(txn, data)


def summary(data: dict[str, Any]) -> str:
    """What a config holds, for messages: "2 backstores, 1 target, 1 raid array, cluster"."""
    parts = []
    for cls in CONFIG_KINDS:
        items = data.get(cls.CONFIG_SECTION)
        if cls.CONFIG_SINGLETON:
            if items is not None and cls is not Settings:
                parts.append(cls.CONFIG_LABEL)
            continue
        if isinstance(items, list) and items:
            n = len(items)
            parts.append(f"{n} {cls.CONFIG_LABEL}{'' if n == 1 else 's'}")
    return ", ".join(parts) or "an empty configuration (settings only)"


def save_config(store: Store, path: str) -> None:
    """Export the config to ``path`` (atomic replace, mode 0600)."""
    write_json_atomic(path, export_config(store))


def restore_config(store: Store, path: str) -> list[str]:
    """Import a config file; returns all errors (nothing changed if any)."""
    return import_config(store, load_config_file(path))
