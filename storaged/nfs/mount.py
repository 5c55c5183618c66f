"""MOUNT protocol version 3 (RFC 1813 Appendix I): MNT, UMNT, UMNTALL, EXPORT, DUMP.

MNT accepts an export's path or a directory below it (resolved component by
component with the caller's squashed identity, never following symlinks)
and answers MNT3ERR_ACCES to clients not on the export's list or using an
unprivileged port on a ``secure`` export.  The mount list DUMP reports is
kept in memory (it is advisory, RFC 1813 §5.2.2).
"""

from __future__ import annotations

import logging
from typing import Any

from storaged.nas.exports import ExportTable
from storaged.nas.fs import FsError
from storaged.nfs.nfs3 import nfsstat
from storaged.nfs.rpc import AUTH_NONE, AUTH_SYS, Call, Procedure, Program
from storaged.nfs.xdr import INT32, UINT32, VOID, Array, List, Opaque, String, Struct, Union

log = logging.getLogger("storaged.nfs")

MOUNT_PROGRAM = 100005
MOUNT_V3 = 3
MNTPATHLEN = 1024
MNTNAMLEN = 255

MNT3_OK = 0
MNT3ERR_PERM = 1
MNT3ERR_NOENT = 2
MNT3ERR_IO = 5
MNT3ERR_ACCES = 13
MNT3ERR_NOTDIR = 20
MNT3ERR_INVAL = 22
MNT3ERR_NAMETOOLONG = 63
MNT3ERR_NOTSUPP = 10004
MNT3ERR_SERVERFAULT = 10006

_FROM_NFS = {1: MNT3ERR_PERM, 2: MNT3ERR_NOENT, 13: MNT3ERR_ACCES, 20: MNT3ERR_NOTDIR,
             22: MNT3ERR_INVAL, 63: MNT3ERR_NAMETOOLONG}

DIRPATH = String(MNTPATHLEN, "dirpath")
NAME = String(MNTNAMLEN, "name")
FHANDLE3 = Opaque(64, "fhandle3", copy=True)
MOUNTRES3 = Union("mountres3", UINT32, {
    MNT3_OK: Struct("mountres3_ok", ("fhandle", FHANDLE3), ("auth_flavors", Array(INT32))),
}, default=VOID)
MOUNTBODY = Struct("mountbody", ("ml_hostname", NAME), ("ml_directory", DIRPATH))
MOUNTLIST = List(MOUNTBODY, "mountlist")
GROUPS = List(NAME, "groups")
EXPORTNODE = Struct("exportnode", ("ex_dir", DIRPATH), ("ex_groups", GROUPS))
EXPORTS = List(EXPORTNODE, "exports")

PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("MNT", DIRPATH, MOUNTRES3),
    2: ("DUMP", VOID, MOUNTLIST),
    3: ("UMNT", DIRPATH, VOID),
    4: ("UMNTALL", VOID, VOID),
    5: ("EXPORT", VOID, EXPORTS),
}


class Mount:
    """The MOUNT v3 program over an ``ExportTable``."""

    def __init__(self, exports: ExportTable) -> None:
        self.exports = exports
        self.mounts: set[tuple[bytes, bytes]] = set()

    def program(self) -> Program:
        prog = Program(MOUNT_PROGRAM, MOUNT_V3)
        for num, (name, args, res) in PROCEDURES.items():
            prog.procs[num] = Procedure(name, args, res, getattr(self, name.lower()))
        return prog

    def null(self, call: Call, args: Any) -> None:
        return None

    def mnt(self, call: Call, path: bytes) -> Any:
        try:
            text = path.decode()
        except UnicodeDecodeError:
            return (MNT3ERR_NOENT, None)
        found = self.exports.for_path(text)
        if found is None:
            return (MNT3ERR_NOENT, None)
        export, components = found
        host, port = call.peer
        if not export.allows(host) or not export.port_ok(port):
            log.info("MNT %s refused for %s:%d", text, host, port)
            return (MNT3ERR_ACCES, None)
        creds = export.creds(call.cred.uid, call.cred.gid, call.cred.gids)
        inode = export.fs.root
        try:
            for comp in components:
                inode, attr = export.fs.lookup(inode, comp.encode(), creds)
                if attr.type != 2:
                    return (MNT3ERR_NOTDIR, None)
        except FsError as e:
            return (_FROM_NFS.get(nfsstat(e.errno), MNT3ERR_IO), None)
        self.mounts.add((call.cred.machine or host.encode(), path))
        return (MNT3_OK, {"fhandle": export.handle(inode),
                          "auth_flavors": [AUTH_SYS, AUTH_NONE]})

    def dump(self, call: Call, args: Any) -> Any:
        return [{"ml_hostname": h[:MNTNAMLEN], "ml_directory": d}
                for h, d in sorted(self.mounts)]

    def umnt(self, call: Call, path: bytes) -> None:
        host = call.cred.machine or call.peer[0].encode()
        self.mounts.discard((host, path))
        return None

    def umntall(self, call: Call, args: Any) -> None:
        host = call.cred.machine or call.peer[0].encode()
        self.mounts = {m for m in self.mounts if m[0] != host}
        return None

    def export(self, call: Call, args: Any) -> Any:
        out = []
        for path, e in sorted(self.exports.by_path.items()):
            out.append({"ex_dir": path.encode(),
                        "ex_groups": [c.encode() for c in e.record.clients]})
        return out
