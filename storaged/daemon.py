"""The storaged daemon: loads the stored config, serves it, applies changes live.

``serve`` runs in the foreground (systemd Type=notify: READY=1 once every
portal listens).  ``demo`` first makes sure the demo LUN and target exist,
then serves them.  Config changes arrive through the control socket; after
each one the Runtime reconciles open devices, targets and portals with the
store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from storaged import metrics
from storaged.block.file import FileBlockDevice
from storaged.iscsi.chap import Credentials
from storaged.iscsi.server import IscsiServer
from storaged.iscsi.target import Registry, TargetContext
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import ScsiCommand, ScsiResult
from storaged.state import Backstore, Chap, Store, Target, split_portal

log = logging.getLogger("storaged")

DEMO_IQN = "iqn.2026-11.org.storaged:demo"
DEMO_BACKSTORE = "demo"
DEMO_SIZE = 1 << 30


def _creds(chap: Chap | None) -> Credentials | None:
    if chap is None:
        return None
    return Credentials(chap.user, chap.password, chap.mutual_user, chap.mutual_password)


@dataclass
class _Device:
    record: Backstore
    device: FileBlockDevice
    lu: LogicalUnit


class Runtime:
    """Live objects built from the stored config, kept in step with it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = Registry()
        self.devices: dict[str, _Device] = {}
        self.meters: dict[tuple[str, int], metrics.LunMeter] = {}
        with store.read() as txn:
            settings = txn.settings()
        self.server = IscsiServer(self.registry, self.run_command,
                                  nop_interval=settings.nop_interval,
                                  nop_timeout=settings.nop_timeout)

    # The hot path: one SCSI command, with its metrics.
    def run_command(self, scsi: ScsiTarget, cmd: ScsiCommand, target: str) -> ScsiResult:
        started = time.perf_counter()
        result = scsi.execute(cmd)
        elapsed = time.perf_counter() - started
        meter = self.meters.get((target, cmd.lun))
        if meter is None:
            meter = self.meters[(target, cmd.lun)] = metrics.LunMeter(target, cmd.lun)
        nread = len(result.data) if result.data is not None else 0
        nwritten = len(cmd.data_out) if cmd.data_out is not None else 0
        meter.record(cmd.cdb[0], elapsed, nread, nwritten, result.status)
        return result

    def session_counts(self) -> dict[str, int]:
        """Logged-in sessions per target (for the metrics collector)."""
        counts: dict[str, int] = dict.fromkeys(self.registry.targets, 0)
        for (_i, _s, target) in self.registry.sessions:
            counts[target] = counts.get(target, 0) + 1
        return counts

    def _open_device(self, b: Backstore) -> _Device | None:
        try:
            dev = FileBlockDevice(b.path, block_size=b.block_size, read_only=b.read_only)
        except OSError as e:
            log.error("backstore %s: cannot open %s: %s", b.name, b.path, e.strerror)
            return None
        lu = LogicalUnit(dev, name=b.name, serial=b.serial, wwn=b.wwn,
                         read_only=b.read_only, online=b.online, wce=b.wce)
        return _Device(b, dev, lu)

    async def reconcile(self) -> None:
        """Bring devices, targets and listeners in line with the store."""
        with self.store.read() as txn:
            backstores = {b.name: b for b in txn.list(Backstore)}
            targets = txn.list(Target)
        for name, b in backstores.items():
            cur = self.devices.get(name)
            if cur is not None and (cur.record.path, cur.record.block_size) == \
                    (b.path, b.block_size) and (b.read_only or not cur.device.read_only):
                # Same backing: change flags in place so unit attention state survives.
                cur.lu.read_only = b.read_only
                cur.lu.online = b.online
                cur.lu.wce = b.wce
                if cur.device.refresh_size() != cur.lu.num_blocks * cur.lu.block_size:
                    cur.lu.resize()
                cur.record = b
                continue
            if cur is not None:
                cur.device.close()
            new = self._open_device(b)
            if new is not None:
                self.devices[name] = new
            else:
                self.devices.pop(name, None)
        for name in list(self.devices):
            if name not in backstores:
                self.devices.pop(name).device.close()
        wanted: set[tuple[str, int]] = set()
        seen: set[str] = set()
        for t in targets:
            seen.add(t.iqn)
            ctx = self.registry.targets.get(t.iqn)
            if ctx is None:
                ctx = TargetContext(name=t.iqn, scsi=ScsiTarget(t.iqn))
                self.registry.targets[t.iqn] = ctx
            ctx.tpgt = t.tpgt
            ctx.portals = [split_portal(p) for p in t.portals]
            ctx.open_access = t.open_access
            ctx.acls = {ini: _creds(acl.chap) for ini, acl in t.acls.items()}
            ctx.chap = _creds(t.chap)
            ctx.params = dict(t.params)
            ctx.queue_depth = t.queue_depth
            luns = {lun: self.devices[bs].lu for lun, bs in t.luns.items()
                    if bs in self.devices}
            if luns != ctx.scsi.luns:
                ctx.scsi.set_luns(luns)
            wanted.update(ctx.portals)
            # Sessions of initiators no longer allowed end now.
            for conn in self.registry.connections(t.iqn):
                if not ctx.allowed(conn.initiator):
                    conn.drop("initiator removed from the ACL")
        for name in list(self.registry.targets):
            if name not in seen:
                self.registry.targets.pop(name)
                for conn in self.registry.connections(name):
                    conn.drop("target deleted")
        await self.server.set_portals(wanted)

    def status(self) -> dict:
        """Live view for `storaged ls` / status: sessions per target."""
        sessions = []
        for (initiator, isid, target), conn in self.registry.sessions.items():
            sessions.append({"target": target, "initiator": initiator,
                             "isid": f"0x{isid:012x}", "peer": f"{conn.peer[0]}:{conn.peer[1]}",
                             "header_digest": conn.hd, "data_digest": conn.dd})
        return {"sessions": sessions,
                "portals": [f"{h}:{p}" for h, p in sorted(self.server.listeners)]}


def _notify(message: str) -> None:
    """sd_notify(3) without libsystemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError as e:
            log.warning("sd_notify failed: %s", e)


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("STORAGED_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


async def _run(directory: str, metrics_addr: str | None, banner: str | None) -> None:
    from storaged.control.server import start_control_server, stop_control_server

    store = Store(directory)
    runtime = Runtime(store)
    if metrics_addr:
        host, port = split_portal(metrics_addr)
        metrics.REGISTRY.register(metrics.StoragedCollector(
            lambda: list(runtime.meters.values()), runtime.session_counts))
        metrics.serve_metrics(host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)
    await runtime.reconcile()
    sock_path = os.path.join(directory, "control.sock")
    control = await start_control_server(sock_path, store, runtime.reconcile,
                                         extra_ops={"status": lambda *_a, **_k: runtime.status()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _notify("READY=1\nSTATUS=serving")
    if banner:
        print(banner, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        _notify("STOPPING=1")
        await stop_control_server(control, sock_path)
        await runtime.server.shutdown()
        for d in runtime.devices.values():
            d.device.close()
        store.close()


def _run_loop(coro) -> None:  # noqa: ANN001
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def serve(directory: str, metrics: str | None = None) -> None:
    """Run the daemon in the foreground until SIGINT/SIGTERM."""
    _setup_logging()
    _run_loop(_run(directory, metrics, None))


def ensure_demo(directory: str, iscsi: str) -> None:
    """Create the demo backstore (1 GiB sparse) and open target on first run."""
    from storaged.control import ops

    store = Store(directory)
    try:
        with store.write() as txn:
            if txn.get(Backstore, DEMO_BACKSTORE) is None:
                ops.backstore_create(txn, DEMO_BACKSTORE,
                                     os.path.join(os.path.abspath(directory), "demo.img"),
                                     size=str(DEMO_SIZE))
            t = txn.get(Target, DEMO_IQN)
            if t is None:
                ops.target_create(txn, DEMO_IQN, portals=[iscsi])
                ops.lun_add(txn, DEMO_IQN, DEMO_BACKSTORE, lun=0)
                ops.target_open(txn, DEMO_IQN, True)
            elif t.portals != [iscsi]:
                for p in list(t.portals):
                    ops.portal_remove(txn, DEMO_IQN, p)
                ops.portal_add(txn, DEMO_IQN, iscsi)
    finally:
        store.close()


def demo(directory: str, iscsi: str = "127.0.0.1:3260", metrics: str | None = None) -> None:
    """The README's main command: serve the demo LUN in the foreground."""
    _setup_logging()
    ensure_demo(directory, iscsi)
    host, port = split_portal(iscsi)
    url = f"iscsi://{host}:{port}/{DEMO_IQN}/0"
    banner = "\n".join([
        f"storaged demo: target {DEMO_IQN}, LUN 0 (1 GiB thin) on {host}:{port}",
        f"  state directory: {os.path.abspath(directory)}",
        "  connect with:",
        f"    iscsi-ls -s iscsi://{host}:{port}",
        f"    iscsi-inq {url}",
        f"    qemu-img info {url}",
        f"    qemu-img convert -p -O raw disk.img {url}",
        "  Ctrl-C stops it.",
    ])
    _run_loop(_run(directory, metrics, banner))
