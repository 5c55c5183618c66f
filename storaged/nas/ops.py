"""Config operations for NFS exports, registered with ``storaged.control.ops``.

They run like every other operation: offline on the store from the CLI, or
live through the daemon's control socket (the daemon then reconciles its NFS
service with the store).  Importing this module registers them.
"""

from __future__ import annotations

import os
from typing import Any

from storaged.control.ops import ConfigError, _op
from storaged.nas.exports import Export, NfsSettings, normalize_export_path
from storaged.state import Txn


def _settings(txn: Txn) -> NfsSettings:
    return txn.get(NfsSettings, NfsSettings.KEY) or NfsSettings()


@_op()
def nfs_export_add(txn: Txn, path: str, directory: str, clients: list[str] | None = None,
                   read_only: bool = False, squash: str = "root", anonuid: int = 65534,
                   anongid: int = 65534, secure: bool = False,
                   attr_timeout: float = 1.0) -> dict[str, Any]:
    """Export ``directory`` as ``path``; an existing export of ``path`` is updated in place.

    Updating keeps the export's id and handle key, so clients' file handles
    stay valid.
    """
    try:
        path = normalize_export_path(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not os.path.isabs(directory):
        raise ConfigError(f"directory must be an absolute path, got {directory!r}")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} is not a directory")
    for other in txn.list(Export):
        if other.path != path and (other.path.startswith(path.rstrip("/") + "/")
                                   or path.startswith(other.path.rstrip("/") + "/")):
            raise ConfigError(f"export {path} would nest with export {other.path}")
    old = txn.get(Export, path)
    export = Export(path=path, directory=os.path.normpath(directory),
                    clients=list(clients) if clients else ["*"], read_only=read_only,
                    squash=squash, anonuid=anonuid, anongid=anongid, secure=secure,
                    attr_timeout=attr_timeout)
    if old is not None:
        export.export_id, export.handle_key = old.export_id, old.handle_key
    taken = {e.export_id for e in txn.list(Export) if e.path != path}
    while export.export_id in taken:
        from storaged.nas.exports import new_export_id
        export.export_id = new_export_id()
    txn.put(export)
    return export.describe()


@_op()
def nfs_export_remove(txn: Txn, path: str) -> dict[str, Any]:
    """Stop exporting ``path`` (its handles become stale; the directory is kept)."""
    try:
        path = normalize_export_path(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not txn.delete(Export, path):
        raise ConfigError(f"export {path} does not exist")
    return {"removed": path}


@_op(mutating=False)
def nfs_export_list(txn: Txn) -> dict[str, Any]:
    """Every export (without handle keys) and the NFS listener settings."""
    return {"exports": [e.describe() for e in txn.list(Export)],
            "settings": _settings(txn).to_dict()}


@_op()
def nfs_settings_set(txn: Txn, listen: str | None = None, portmap: str | None = None,
                     grace: int | None = None) -> dict[str, Any]:
    """Change where NFS listens (``""`` turns it off), the portmapper policy or NLM grace."""
    s = _settings(txn)
    if listen is not None:
        s.listen = listen
    if portmap is not None:
        s.portmap = portmap
    if grace is not None:
        s.grace = grace
    txn.put(s)
    return s.to_dict()
