"""The network management endpoint's settings and users (record kinds
``mgmt_endpoint`` and ``mgmt_user``).

A :class:`MgmtUser` keeps a SCRAM-SHA-256 verifier (salt, iterations,
StoredKey, ServerKey; see :mod:`storaged.control.mgmt_auth`), never a
password.  :class:`MgmtEndpoint` says where the endpoint listens ("" = off,
the default) and the TLS certificate and key, if any.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar

from storaged.state.records import Record, _collect
from storaged.state.validate import check_int, normalize_portal

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-f]{32,128}$")


@dataclass
class MgmtEndpoint(Record):
    """Where the management endpoint listens (``host:port``, "" = off)."""

    RECORD_KIND: ClassVar[str] = "mgmt_endpoint"
    KEY: ClassVar[str] = "local"

    address: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.address and not re.search(r":\d+$", str(self.address)):
            errors.append(f"management address {self.address!r} needs a port (ip:port)")
        elif self.address:
            addr = _collect(errors, normalize_portal, self.address)
            if addr:
                self.address = addr
        if bool(self.tls_cert) != bool(self.tls_key):
            errors.append("give both a TLS certificate and its key, or neither")
        for p in (self.tls_cert, self.tls_key):
            if p and not os.path.isabs(p):
                errors.append(f"TLS file path must be absolute, got {p!r}")
        return errors


@dataclass
class MgmtUser(Record):
    """One user allowed on the management endpoint (a fence agent's login)."""

    RECORD_KIND: ClassVar[str] = "mgmt_user"

    name: str
    salt: str
    iterations: int
    stored_key: str
    server_key: str

    @property
    def key(self) -> str:
        return self.name

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not isinstance(self.name, str) or not _USER_RE.match(self.name):
            errors.append(f"invalid user name {self.name!r}: letters, digits, '._@-' "
                          "(at most 64)")
        _collect(errors, check_int, self.iterations, "iterations", 4096, 10_000_000)
        for f in ("salt", "stored_key", "server_key"):
            v = getattr(self, f)
            if not isinstance(v, str) or not _HEX_RE.match(v):
                errors.append(f"{f} must be lowercase hex")
        return errors
