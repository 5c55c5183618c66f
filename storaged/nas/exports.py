"""NFS exports: the stored record, client matching, identity squashing, file handles.

An ``Export`` publishes a host directory under a path clients mount
(``/export``), to a list of clients (addresses, CIDR networks or ``*``),
read-write or read-only, with exports(5)-style squashing: ``root`` (uid/gid
0 become anonuid/anongid), ``all`` (everyone becomes anonymous) or ``none``.
``secure`` requires a client source port below 1024.

File handles (at most 64 bytes, RFC 1813 §2.5)::

    version(1) | export_id(4) | inode handle (backend's) | mac(8)

``export_id`` is random per export and stored with it, so handles survive
restarts and a handle names its export; ``mac`` is a keyed BLAKE2b of the
rest under the export's stored secret, so a client can neither forge a
handle for a file outside the exported tree nor move a handle to another
export.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from storaged.nas.fs import Creds
from storaged.state.records import Record, _collect
from storaged.state.validate import check_bool, check_int, normalize_portal

SQUASH_MODES = ("root", "all", "none")
HANDLE_VERSION = 1
MAC_LEN = 8
FH_MAX = 64
_HEAD = struct.Struct(">BI")
NOBODY = 65534


def new_export_id() -> int:
    """A random non-zero 32-bit export id."""
    return secrets.randbelow(0xFFFFFFFE) + 1


def new_handle_key() -> str:
    """A random 128-bit handle MAC key, hex."""
    return secrets.token_hex(16)


def normalize_client(spec: str) -> str:
    """``*``, an address or a CIDR network, canonical form; ValueError if none of these."""
    spec = spec.strip()
    if spec == "*":
        return spec
    if "/" in spec:
        return str(ipaddress.ip_network(spec, strict=False))
    return str(ipaddress.ip_address(spec))


def normalize_export_path(path: str) -> str:
    """An absolute, normalized NFS path without trailing slash."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"export path must be absolute, got {path!r}")
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


@dataclass
class Export(Record):
    """One NFS export (key: the path clients mount)."""

    RECORD_KIND: ClassVar[str] = "nfs_export"
    CONFIG_SECTION: ClassVar[str | None] = "nfs_exports"
    CONFIG_LABEL: ClassVar[str] = "nfs export"

    @classmethod
    def check_section(cls, records: list[Any]) -> list[str]:
        """Paths unique and not nested in each other; export ids unique (file handles)."""
        errors = super().check_section(records)
        for n, e in enumerate(records):
            for other in records[:n]:
                if e.path != other.path and (e.path.startswith(other.path.rstrip("/") + "/")
                                             or other.path.startswith(e.path.rstrip("/") + "/")):
                    errors.append(f"nfs export {e.path} would nest with export {other.path}")
                if e.export_id == other.export_id:
                    errors.append(f"nfs export {e.path}: export_id {e.export_id} is also "
                                  f"export {other.path}'s")
        return errors

    path: str
    directory: str
    clients: list[str] = field(default_factory=lambda: ["*"])
    read_only: bool = False
    squash: str = "root"
    anonuid: int = NOBODY
    anongid: int = NOBODY
    secure: bool = False
    export_id: int = field(default_factory=new_export_id)
    handle_key: str = field(default_factory=new_handle_key)
    #: seconds READDIRPLUS may reuse an entry's attributes read by an earlier listing,
    #: and a READ/WRITE its handle's last ones (storaged.nfs.quick) (0: re-read them
    #: every time); changes made through storaged void them at once
    attr_timeout: float = 1.0

    @property
    def key(self) -> str:
        return self.path

    def problems(self) -> list[str]:
        errors: list[str] = []
        try:
            self.path = normalize_export_path(self.path)
        except ValueError as e:
            errors.append(str(e))
        if not isinstance(self.directory, str) or not os.path.isabs(self.directory) \
                or "\0" in self.directory:
            errors.append(f"directory must be an absolute path, got {self.directory!r}")
        else:
            self.directory = os.path.normpath(self.directory)
        if not isinstance(self.clients, list) or not self.clients:
            errors.append("clients must be a non-empty list of addresses, networks or '*'")
        else:
            out: list[str] = []
            for c in self.clients:
                try:
                    norm = normalize_client(c) if isinstance(c, str) else None
                except ValueError:
                    norm = None
                if norm is None:
                    errors.append(f"client {c!r} is not an address, a CIDR network or '*'")
                elif norm not in out:
                    out.append(norm)
            if not errors:
                self.clients = out
        if self.squash not in SQUASH_MODES:
            errors.append(f"squash must be one of {', '.join(SQUASH_MODES)}, got {self.squash!r}")
        for name in ("read_only", "secure"):
            _collect(errors, check_bool, getattr(self, name), name)
        _collect(errors, check_int, self.anonuid, "anonuid", 0, 0xFFFFFFFF)
        _collect(errors, check_int, self.anongid, "anongid", 0, 0xFFFFFFFF)
        _collect(errors, check_int, self.export_id, "export_id", 1, 0xFFFFFFFF)
        if isinstance(self.attr_timeout, bool) or not isinstance(self.attr_timeout, int | float) \
                or not 0 <= self.attr_timeout <= 3600:
            errors.append(f"attr_timeout must be 0-3600 seconds, got {self.attr_timeout!r}")
        if not isinstance(self.handle_key, str) or len(self.handle_key) != 32:
            errors.append("handle_key must be 32 hex digits")
        else:
            try:
                bytes.fromhex(self.handle_key)
            except ValueError:
                errors.append("handle_key must be 32 hex digits")
        return errors

    def options(self) -> str:
        """exports(5)-style option summary: ``rw,root_squash,insecure,anonuid=...``."""
        opts = ["ro" if self.read_only else "rw", f"{self.squash}_squash"
                if self.squash != "none" else "no_root_squash",
                "secure" if self.secure else "insecure"]
        if self.squash != "none":
            opts.append(f"anonuid={self.anonuid},anongid={self.anongid}")
        opts.append(f"attr_timeout={self.attr_timeout:g}")
        return ",".join(opts)

    def describe(self) -> dict[str, Any]:
        """JSON-ready view without the handle key."""
        d = self.to_dict()
        d.pop("handle_key")
        d["options"] = self.options()
        return d


@dataclass
class NfsSettings(Record):
    """Where the NFS service listens (empty ``listen`` = NFS off) and portmapper policy.

    ``portmap``: ``auto`` (serve port 111 if free, else register with the
    system rpcbind), ``builtin`` (serve 111 or fail), ``system`` (register
    only), ``off``.  ``grace``: seconds of NLM grace after a restart.
    """

    RECORD_KIND: ClassVar[str] = "nfs_settings"
    CONFIG_SECTION: ClassVar[str | None] = "nfs_settings"
    CONFIG_SINGLETON: ClassVar[bool] = True
    CONFIG_LABEL: ClassVar[str] = "nfs settings"
    KEY: ClassVar[str] = "global"

    listen: str = ""
    portmap: str = "auto"
    grace: int = 90  # like Linux lockd's default grace period

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.listen:
            text = self.listen.strip() if isinstance(self.listen, str) else self.listen
            if isinstance(text, str) and (":" not in text or text.endswith("]")):
                text += ":2049"  # NFS's port, not the iSCSI default
            try:
                self.listen = normalize_portal(text)
            except Exception as e:  # ValidationError
                errors.append(f"listen: {e}")
        if self.portmap not in ("auto", "builtin", "system", "off"):
            errors.append(f"portmap must be auto, builtin, system or off, got {self.portmap!r}")
        _collect(errors, check_int, self.grace, "grace", 0, 3600)
        return errors


class HandleError(Exception):
    """A file handle is malformed/forged (``stale`` False) or names an unknown export."""

    def __init__(self, stale: bool) -> None:
        super().__init__("stale file handle" if stale else "bad file handle")
        self.stale = stale


class LiveExport:
    """An export as the server uses it: record, filesystem, parsed client list."""

    def __init__(self, record: Export, fs: Any) -> None:
        self.record = record
        self.fs = fs
        self.path = record.path
        self.export_id = record.export_id
        #: attr_timeout in monotonic nanoseconds (nfs3 listings, the quick READ/WRITE)
        self.attr_timeout_ns = int(record.attr_timeout * 1e9)
        self._key = bytes.fromhex(record.handle_key)
        self._id_bytes = struct.pack(">I", record.export_id)
        self.nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.anyone = False
        for c in record.clients:
            if c == "*":
                self.anyone = True
            else:
                self.nets.append(ipaddress.ip_network(c))
        self._allowed: dict[str, bool] = {}
        self.anon = Creds(record.anonuid, record.anongid)

    # -- access
    def allows(self, host: str) -> bool:
        """True if a client at address ``host`` is on the export's list."""
        hit = self._allowed.get(host)
        if hit is None:
            hit = self.anyone
            if not hit:
                try:
                    addr = ipaddress.ip_address(host.split("%")[0])
                except ValueError:
                    addr = None
                if addr is not None and getattr(addr, "ipv4_mapped", None):
                    addr = addr.ipv4_mapped
                hit = addr is not None and any(addr in n for n in self.nets
                                               if n.version == addr.version)
            if len(self._allowed) > 4096:
                self._allowed.clear()
            self._allowed[host] = hit
        return hit

    def port_ok(self, port: int) -> bool:
        """The ``secure`` option: clients must use a privileged source port."""
        return not self.record.secure or port < 1024

    def creds(self, uid: int | None, gid: int | None, gids: tuple[int, ...]) -> Creds:
        """Map a caller's AUTH_SYS identity (None for AUTH_NONE) through the squash option."""
        squash = self.record.squash
        if uid is None or gid is None or squash == "all":
            return self.anon
        if squash == "root":
            if uid == 0:
                uid = self.record.anonuid
            if gid == 0:
                gid = self.record.anongid
            if 0 in gids:
                gids = tuple(self.record.anongid if g == 0 else g for g in gids)
        return Creds(uid, gid, gids)

    # -- handles
    def _mac(self, inode: bytes) -> bytes:
        return hashlib.blake2b(self._id_bytes + inode, key=self._key,
                               digest_size=MAC_LEN).digest()

    def handle(self, inode: bytes) -> bytes:
        """The NFS file handle of backend inode handle ``inode``."""
        fh = _HEAD.pack(HANDLE_VERSION, self.export_id) + inode
        return fh + self._mac(inode)

    def handle_layout(self) -> tuple[bytes, bytes]:
        """``(prefix, MAC key)``: ``handle(inode)`` is ``prefix + inode + mac`` where mac is
        the 8-byte keyed BLAKE2b of ``prefix[1:] + inode`` (for storaged.nfs.dirlist, which
        builds handles in its own loop)."""
        return _HEAD.pack(HANDLE_VERSION, self.export_id), self._key

    def inode(self, fh: bytes) -> bytes:
        """The backend inode handle inside ``fh`` (already routed here); HandleError if forged."""
        inode = bytes(fh[5:-MAC_LEN])
        if not hmac.compare_digest(self._mac(inode), bytes(fh[-MAC_LEN:])):
            raise HandleError(stale=False)
        return inode


def handle_export_id(fh: bytes) -> int:
    """The export id a handle claims; HandleError(stale=False) if it is not one of ours."""
    if len(fh) < 5 + 4 + MAC_LEN or len(fh) > FH_MAX or fh[0] != HANDLE_VERSION:
        raise HandleError(stale=False)
    return _HEAD.unpack_from(fh, 0)[1]


class ExportTable:
    """Live exports by id and by path; what the MOUNT and NFS programs consult."""

    def __init__(self) -> None:
        self.by_id: dict[int, LiveExport] = {}
        self.by_path: dict[str, LiveExport] = {}
        #: bumped by every ``set``: what was routed before may now route differently
        self.version = 0

    def set(self, exports: list[LiveExport]) -> None:
        self.by_id = {e.export_id: e for e in exports}
        self.by_path = {e.path: e for e in exports}
        self.version += 1

    def resolve(self, fh: bytes) -> tuple[LiveExport, bytes]:
        """``(export, inode handle)`` for an NFS handle; HandleError if bad or stale."""
        eid = handle_export_id(fh)
        export = self.by_id.get(eid)
        if export is None:
            raise HandleError(stale=True)
        return export, export.inode(fh)

    def for_path(self, path: str) -> tuple[LiveExport, list[str]] | None:
        """The export containing ``path`` and the components below its root.

        A client may name an export by its pseudo path or by the host directory
        it serves (as knfsd's exports(5) and ganesha's Path allow): the longest
        matching prefix of either wins, a pseudo path on a tie.
        """
        try:
            norm = normalize_export_path(path)
        except ValueError:
            return None
        best: tuple[int, bool, LiveExport] | None = None
        for e in self.by_path.values():
            for prefix, pseudo in ((e.path, True), (e.record.directory, False)):
                if (norm == prefix or norm.startswith(prefix.rstrip("/") + "/")) and \
                        (best is None or (len(prefix), pseudo) > best[:2]):
                    best = (len(prefix), pseudo, e)
        if best is None:
            return None
        rest = norm[best[0]:].strip("/")
        return best[2], [c for c in rest.split("/") if c]
