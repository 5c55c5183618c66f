"""The daemon's NFS service: keeps the NFS server in step with the stored config.

``NfsRuntime.reconcile`` reads ``NfsSettings`` and every ``Export`` from the
store, opens a filesystem for new or changed exports (keeping the open one
when only options changed), publishes them in the export table and
(re)starts the listener when the listen address changed.  The daemon calls
it after every config change, so ``storaged nfs export add|remove`` apply
live.
"""

from __future__ import annotations

import logging
from typing import Any

import storaged.nas.ops  # noqa: F401 - registers the nfs_* config operations
from storaged.nas.exports import Export, LiveExport, NfsSettings
from storaged.nas.hostfs import HostFs
from storaged.nfs.lockd import LockService
from storaged.nfs.server import NfsServer
from storaged.state import Store, split_portal
from storaged.state.nsm import NsmStore

log = logging.getLogger("storaged.nfs")


class NfsRuntime:
    """Live NFS objects built from the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.server = NfsServer()
        self.filesystems: dict[str, tuple[str, HostFs]] = {}  # path -> (directory, fs)
        self.listen = ""
        self.portmap = ""
        self.nlm = LockService(self.server, NsmStore(store))  # NLM v4 + NSM on the listener

    async def reconcile(self) -> None:
        with self.store.read() as txn:
            settings = txn.get(NfsSettings, NfsSettings.KEY) or NfsSettings()
            records = txn.list(Export)
        live: list[LiveExport] = []
        for rec in records:
            cur = self.filesystems.get(rec.path)
            if cur is not None and cur[0] == rec.directory and \
                    cur[1].fsid == rec.export_id:
                fs = cur[1]
            else:
                if cur is not None:
                    cur[1].close()
                    del self.filesystems[rec.path]
                try:
                    fs = HostFs(rec.directory, fsid=rec.export_id)
                except OSError as e:
                    log.error("export %s: cannot serve %s: %s", rec.path, rec.directory,
                              e.strerror or e)
                    continue
                self.filesystems[rec.path] = (rec.directory, fs)
            live.append(LiveExport(rec, fs))
        wanted = {r.path for r in records}
        for path in list(self.filesystems):
            if path not in wanted:
                self.filesystems.pop(path)[1].close()
        self.server.exports.set(live)
        if (settings.listen, settings.portmap) != (self.listen, self.portmap):
            if self.server.address is not None:
                await self.nlm.close_udp()
                await self.server.stop()
            self.listen, self.portmap = settings.listen, settings.portmap
            if settings.listen:
                host, port = split_portal(settings.listen)
                try:
                    await self.server.start(host, port, settings.portmap)
                except OSError as e:
                    log.error("NFS: cannot listen on %s: %s", settings.listen, e)
                    self.listen = ""
                else:
                    self.nlm.start(settings.grace)  # once per process: NSM state, grace
                    builtin = self.server.portmap_mode == "builtin"
                    await self.nlm.listen_udp(host, self.server.address[1],  # type: ignore
                                              111 if builtin else None)

    def status(self) -> dict[str, Any]:
        addr = self.server.address
        return {"listen": f"{addr[0]}:{addr[1]}" if addr else None,
                "portmap": self.server.portmap_mode,
                "exports": sorted(self.server.exports.by_path),
                "connections": len(self.server.protocols),
                "nlm": {"nsm_state": self.nlm.nsm.state, "in_grace": self.nlm.nlm.in_grace,
                        "lock_hosts": sorted(self.nlm.nlm.locks.hosts())}}

    async def shutdown(self) -> None:
        await self.nlm.stop()
        await self.server.stop()
        for _d, fs in self.filesystems.values():
            fs.close()
        self.filesystems.clear()


