"""Config files on disk: atomic private writes and JSON reads with clear errors.

What goes into a backup, and how a restore checks and applies it, is
:mod:`storaged.control.backup` (it needs every layer's record kinds).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from storaged.state.errors import ValidationError


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


def load_config_file(path: str) -> Any:
    """Read a config file; a JSON syntax error becomes a ValidationError."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValidationError(f"{path}: invalid JSON: {e}") from None
