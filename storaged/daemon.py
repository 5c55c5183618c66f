"""The storaged daemon: loads the stored config, serves it, applies changes live.

``serve`` runs in the foreground (systemd Type=notify: READY=1 once every
portal listens).  ``demo`` first makes sure the demo LUN and target exist,
then serves them.  Config changes arrive through the control socket; after
each one the Runtime reconciles open devices, targets and portals with the
store.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storaged import metrics
from storaged.block.file import FileBlockDevice
from storaged.block.open import open_device, redact
from storaged.iscsi.chap import Credentials
from storaged.iscsi.server import IscsiServer
from storaged.iscsi.target import Registry, TargetContext
from storaged.lb.director import Director
from storaged.lb.health import HealthChecker
from storaged.lb.records import VirtualService
from storaged.raid.service import RaidService
from storaged.scsi.alua import Alua
from storaged.scsi.atomic import attach_journal
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import ScsiCommand, ScsiResult
from storaged.state import Backstore, Chap, StatePrStore, Store, Target, split_portal

if TYPE_CHECKING:
    from storaged.scsi.pr_cluster import SharedPr

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
        self.director = self.registry.director = Director()  # storaged lb group portals
        self.health = HealthChecker(self.director)
        self.raid = RaidService(store)  # RAID arrays; Backstore kind 'raid' opens one
        self.devices: dict[str, _Device] = {}
        self.alua = Alua()  # target port groups shared by every LU (storaged.scsi.alua)
        self.meters: dict[tuple[str, int], metrics.LunMeter] = {}
        with store.read() as txn:
            settings = txn.settings()
        self.server = IscsiServer(self.registry, self.run_command, meter=self.meter,
                                  nop_interval=settings.nop_interval,
                                  nop_timeout=settings.nop_timeout)
        from storaged.nfs.service import NfsRuntime
        self.nfs = NfsRuntime(store)
        from storaged.control.mgmt_server import MgmtServer
        self.mgmt = MgmtServer(store, self.reconcile)  # fence ops over TCP, off by default
        self.shared_pr: SharedPr | None = None
        """Shared-LU persistent reservations, once a cluster node runs here."""
        # Floating addresses (storaged.vip): portals on one open only while it is held here.
        self.vip = None  # the VipService, when a cluster node runs in this daemon
        self.floating: set[str] = set()
        self.held_floating: set[str] = set()
        self._wanted: set[tuple[str, int]] = set()

    # The hot path: one SCSI command, with its metrics.
    def run_command(self, scsi: ScsiTarget, cmd: ScsiCommand, target: str) -> ScsiResult:
        started = time.perf_counter()
        result = scsi.execute(cmd)
        elapsed = time.perf_counter() - started
        meter = self.meter(target, cmd.lun)
        nread = len(result.data) if result.data is not None else 0
        nwritten = len(cmd.data_out) if cmd.data_out is not None else 0
        meter.record(cmd.cdb[0], elapsed, nread, nwritten, result.status)
        return result

    def meter(self, target: str, lun: int) -> metrics.LunMeter:
        """The counters of one LUN of one target (made on first use)."""
        meter = self.meters.get((target, lun))
        if meter is None:
            meter = self.meters[(target, lun)] = metrics.LunMeter(target, lun)
        return meter

    def session_counts(self) -> dict[str, int]:
        """Logged-in sessions per target (for the metrics collector)."""
        counts: dict[str, int] = dict.fromkeys(self.registry.targets, 0)
        for (_i, _s, target) in self.registry.sessions:
            counts[target] = counts.get(target, 0) + 1
        return counts

    def _abort_nexus_tasks(self, target: str):  # noqa: ANN202 - returns the hook
        """PREEMPT AND ABORT hook: end the preempted I_T nexus's tasks on a LUN
        (SPC-4 §5.14.11.2.4: aborted before the PREEMPT AND ABORT completes)."""
        def hook(nexus, lun: int) -> None:  # noqa: ANN001
            for conn in self.registry.connections(target):
                n = conn.nexus
                if n is not None and (n.initiator_port, n.target_port) == \
                        (nexus.initiator_port, nexus.target_port):
                    conn.abort_lun_tasks(lun)
        return hook

    def _open_device(self, b: Backstore) -> _Device | None:
        try:
            if b.kind == "raid":
                dev = self.raid.lun_device(b.path, b.size)
            elif b.kind == "iscsi":     # another storage node's LUN, through our initiator
                dev = open_device(b.path, block_size=b.block_size, read_only=b.read_only)
            else:
                dev = FileBlockDevice(b.path, block_size=b.block_size, read_only=b.read_only,
                                      direct=b.direct)
        except OSError as e:
            log.error("backstore %s: cannot open %s: %s", b.name, redact(b.path), e.strerror)
            return None
        # Physical block = logical block (LBPPBE 0): a file takes 512-byte writes
        # without read-modify-write visible to anyone, and libiscsi's
        # GetLBAStatus.UnmapSingle fails any LU with LBPPBE > 0 (it expects the
        # status of LBA i+1 to start at i + blocks-per-physical-block).  The 4 KiB
        # filesystem block still shows as OPTIMAL UNMAP GRANULARITY.
        lu = LogicalUnit(dev, name=b.name, serial=b.serial, wwn=b.wwn,
                         read_only=b.read_only, online=b.online, wce=b.wce,
                         physical_block_size=b.block_size,
                         pr_store=StatePrStore(self.store, b.name, b.wwn))
        self.alua.attach(lu)
        self._share(lu, b)
        try:
            # WRITE ATOMIC(16) needs a write-ahead slot; replays one a crash left.
            attach_journal(lu, os.path.join(self.store.directory, "atomic", f"{b.name}.journal"))
        except OSError as e:
            log.warning("backstore %s: no atomic write journal (%s): WRITE ATOMIC disabled",
                        b.name, e)
        return _Device(b, dev, lu)

    def _share(self, lu: LogicalUnit, b: Backstore) -> None:
        """Shared backstores keep their PR state with the cluster's other nodes."""
        if self.shared_pr is not None:
            if b.shared:
                self.shared_pr.attach(lu)
            else:
                self.shared_pr.detach(lu)
        elif b.shared:
            log.warning("backstore %s is shared but no cluster node runs here: its "
                        "persistent reservations are this node's alone", b.name)

    async def reconcile(self) -> None:
        """Bring devices, targets and listeners in line with the store."""
        from storaged.control.fence_ops import fenced_initiators
        from storaged.vip.records import FloatingAddress

        self.raid.reconcile()
        with self.store.read() as txn:
            backstores = {b.name: b for b in txn.list(Backstore)}
            targets = txn.list(Target)
            services = txn.list(VirtualService)
            fenced_names, fenced_keys = fenced_initiators(txn)
            vips = txn.list(FloatingAddress)
        for name, b in backstores.items():
            cur = self.devices.get(name)
            if cur is not None and (cur.record.path, cur.record.block_size) == \
                    (b.path, b.block_size) and (b.read_only or not cur.device.read_only):
                # Same backing: change flags in place so unit attention state survives.
                cur.lu.read_only = b.read_only
                cur.lu.online = b.online
                cur.lu.wce = b.wce
                if b.kind in ("file", "block") and cur.device.direct != b.direct:
                    try:
                        cur.device.set_direct(b.direct)
                    except OSError as e:
                        log.error("backstore %s: cannot switch O_DIRECT: %s", name, e)
                if cur.device.refresh_size() != cur.lu.num_blocks * cur.lu.block_size:
                    cur.lu.resize()
                if cur.record.shared != b.shared:
                    self._share(cur.lu, b)
                cur.record = b
                continue
            if cur is not None:
                self._unshare(cur)
                cur.device.close()
            new = self._open_device(b)
            if new is not None:
                self.devices[name] = new
            else:
                self.devices.pop(name, None)
        for name in list(self.devices):
            if name not in backstores:
                gone = self.devices.pop(name)
                self._unshare(gone)
                gone.device.close()
        if fenced_names or fenced_keys:
            await self._preempt_fenced(fenced_names, fenced_keys)
        denied = frozenset(fenced_names)
        wanted: set[tuple[str, int]] = set()
        seen: set[str] = set()
        for t in targets:
            seen.add(t.iqn)
            ctx = self.registry.targets.get(t.iqn)
            if ctx is None:
                ctx = TargetContext(name=t.iqn, scsi=ScsiTarget(t.iqn))
                ctx.scsi.on_abort_nexus = self._abort_nexus_tasks(t.iqn)
                self.registry.targets[t.iqn] = ctx
            ctx.tpgt = t.tpgt
            ctx.portals = [split_portal(p) for p in t.portals]
            ctx.open_access = t.open_access
            ctx.acls = {ini: _creds(acl.chap) for ini, acl in t.acls.items()}
            ctx.chap = _creds(t.chap)
            ctx.params = dict(t.params)
            ctx.queue_depth = t.queue_depth
            ctx.denied = denied
            luns = {lun: self.devices[bs].lu for lun, bs in t.luns.items()
                    if bs in self.devices}
            if luns != ctx.scsi.luns:
                ctx.scsi.set_luns(luns)
            wanted.update(ctx.portals)
            # Sessions of initiators no longer allowed end now.
            for conn in self.registry.connections(t.iqn):
                if conn.initiator in denied:
                    conn.drop("initiator fenced")
                elif not ctx.allowed(conn.initiator):
                    conn.drop("initiator removed from the ACL")
        for name in list(self.registry.targets):
            if name not in seen:
                self.registry.targets.pop(name)
                for conn in self.registry.connections(name):
                    conn.drop("target deleted")
        self._reconcile_alua(targets)
        if self.shared_pr is not None:
            # A node that (re)starts catches up with the group before it serves.
            await self.shared_pr.sync_new()
        self.director.configure(services)
        wanted.update(self.director.addresses())
        self._wanted = wanted
        self.floating = {v.ip for v in vips}
        if self.vip is None:  # managed outside storaged (ocf:storaged:vip): follow the kernel
            await self._follow_interfaces(vips)
        await self._set_portals()
        if self.vip is not None:
            await self.vip.configure(vips)
        await self.nfs.reconcile()
        await self.mgmt.reconcile()

    async def _set_portals(self) -> None:
        """Listen on the wanted portals (floating addresses' only while held here)."""
        try:
            await self.server.set_portals(self._portals())
        finally:
            self.director.set_local_portals(self.server.listeners)
            self.health.reconcile()  # after the portals: this node's own ones answer

    def lb_live(self, args: dict) -> dict:
        """Live connection counts of the virtual services (``storaged lb -L``)."""
        return self.director.describe(self.registry.sessions.values(), time.monotonic())

    def _portals(self) -> set[tuple[str, int]]:
        """The portals to listen on: floating addresses' only while held here."""
        return {p for p in self._wanted if p[0] not in self.floating
                or p[0] in self.held_floating}

    async def serve_floating(self, ip: str, on: bool) -> None:
        """The VipService took (``on``) or dropped floating address ``ip``.

        Dropping closes its listeners and ends every connection that came in on
        it, so a node that lost quorum stops serving through the address at once.
        """
        from storaged.iscsi.server import PortalError

        (self.held_floating.add if on else self.held_floating.discard)(ip)
        try:
            await self._set_portals()
        except PortalError as e:
            log.error("floating address %s: %s", ip, e)
        if not on:
            self._drop_sessions_on(ip)

    async def _follow_interfaces(self, vips: list) -> None:  # noqa: ANN001 - records
        """Without a cluster node, a floating address is held while it is on its interface
        (pacemaker's ocf:storaged:vip adds and removes it); sessions on one that went away
        end."""
        from storaged.vip import net

        held = set()
        for v in vips:
            if await asyncio.to_thread(net.has_address, v.dev, v.ip):
                held.add(v.ip)
        for ip in self.held_floating - held:
            self._drop_sessions_on(ip)
        self.held_floating = held

    def _drop_sessions_on(self, ip: str) -> None:
        for proto in list(self.server.protocols):
            conn = proto.conn
            if conn is not None and conn.local[0] == ip and not conn.closed:
                conn.drop(f"floating address {ip} released")

    async def vip_sync(self, args: dict) -> dict:
        """``ocf:storaged:vip`` changed an address: open or close its portals now."""
        from storaged.control.ops import ConfigError
        from storaged.iscsi.server import PortalError
        from storaged.vip.records import FloatingAddress

        if self.vip is not None:
            raise ConfigError("this node's storaged cluster manages the floating addresses "
                              "(do not also run ocf:storaged:vip here)")
        with self.store.read() as txn:
            vips = txn.list(FloatingAddress)
        await self._follow_interfaces(vips)
        try:
            await self._set_portals()
        except PortalError as e:
            raise ConfigError(str(e)) from None
        return {"held": sorted(self.held_floating)}

    def vip_ls(self, args: dict) -> dict:
        """Live floating addresses (``storaged vip ls``)."""
        from storaged.vip.ops import vip_ls

        if self.vip is None:
            with self.store.read() as txn:
                return vip_ls(txn)
        return {"live": True, "node": self.vip.node.node_id, "vips": self.vip.status()}

    async def _preempt_fenced(self, names: set[str], keys: set[int]) -> None:
        """Fenced nodes lose their registrations on every open LU, as after a
        PREEMPT AND ABORT (their tasks aborted, UAs for the others); on a
        shared LU, on every storage node serving it."""
        for name, d in list(self.devices.items()):
            pr = d.lu.pr
            removed = await pr.admin_preempt_everywhere(names, keys) if pr.backend.blocking \
                else pr.admin_preempt(names, keys)
            if removed["registrations"]:
                log.warning("fence: backstore %s: preempted %d registration(s) of fenced "
                            "initiators%s", name, removed["registrations"],
                            ", reservation released" if removed["released"] else "")

    def _reconcile_alua(self, targets: list[Target]) -> None:
        """Target port groups from the store; unchanged groups keep live state."""
        from storaged.control.alua_ops import stored_groups
        from storaged.scsi.alua import STATE_CODES, GroupConfig
        from storaged.state.alua import split_port

        with self.store.read() as txn:
            records = stored_groups(txn)
        self.alua.set_local_ports((t.iqn, t.tpgt) for t in targets)
        self.alua.configure(GroupConfig(
            g.id, STATE_CODES[g.state], g.preferred, [split_port(p) for p in g.ports],
            g.remote, g.explicit, g.transition_time, g.revision) for g in records)

    def alua_ls(self, args: dict) -> dict:
        """Live target port groups and states (``storaged alua ls``)."""
        return {"live": True, "groups": self.alua.describe()}

    def _pr_devices(self, args: dict) -> list[tuple[str, _Device]]:
        from storaged.control.ops import ConfigError

        name = args.get("backstore")
        if name is None:
            return sorted(self.devices.items())
        if name not in self.devices:
            raise ConfigError(f"backstore {name!r} does not exist or is not open")
        return [(name, self.devices[name])]

    def pr_ls(self, args: dict) -> dict:
        """Live persistent reservations of every open backstore (``storaged pr ls``)."""
        out = []
        for name, d in self._pr_devices(args):
            used = [{"iqn": iqn, "lun": lun} for iqn, ctx in sorted(self.registry.targets.items())
                    for lun, lu in sorted(ctx.scsi.luns.items()) if lu is d.lu]
            item = {"backstore": name, "luns": used, **d.lu.pr.describe()}
            if self.shared_pr is not None and d.lu.wwn.lower() in self.shared_pr.lus:
                item["shared"] = {"synced": d.lu.wwn.lower() in self.shared_pr.synced}
            out.append(item)
        return {"live": True, "backstores": out}

    def _unshare(self, d: _Device) -> None:
        if self.shared_pr is not None:
            self.shared_pr.detach(d.lu)

    async def pr_clear(self, args: dict) -> dict:
        """``storaged pr clear``: drop registrations and reservations of a backstore
        (on every node serving it, for a shared one)."""
        from storaged.control.ops import ConfigError

        if not args.get("backstore"):
            raise ConfigError("pr_clear needs a backstore")
        [(name, d)] = self._pr_devices(args)
        if d.lu.pr.backend.blocking:
            try:
                return {"backstore": name, "cleared": await d.lu.pr.admin_clear_everywhere()}
            except RuntimeError as e:
                raise ConfigError(f"backstore {name}: {e}") from None
        return {"backstore": name, "cleared": d.lu.pr.admin_clear()}

    def status(self) -> dict:
        """Live view for `storaged ls` / status: sessions per target."""
        sessions = []
        for (initiator, isid, target), conn in self.registry.sessions.items():
            sessions.append({"target": target, "initiator": initiator,
                             "isid": f"0x{isid:012x}", "peer": f"{conn.peer[0]}:{conn.peer[1]}",
                             "header_digest": conn.hd, "data_digest": conn.dd})
        return {"sessions": sessions,
                "portals": [f"{h}:{p}" for h, p in sorted(self.server.listeners)],
                "nfs": self.nfs.status()}


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


def _tune_malloc() -> None:
    """Serve large I/O buffers from the heap instead of fresh mmaps.

    glibc hands out allocations of 128 KiB and more as new mmaps, so every
    128 KiB READ paid page faults, zeroing and munmap (about a quarter of the
    CPU of a sequential read, measured in docs/benchmarks.md).  Raising the
    mmap and trim thresholds keeps those buffers in reusable heap memory.
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 16 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: keep the allocator's defaults


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("STORAGED_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


async def _run(directory: str, metrics_addr: str | None, banner: str | None) -> None:
    _tune_malloc()
    from storaged.control.server import start_control_server, stop_control_server

    store = Store(directory)
    runtime = Runtime(store)
    if metrics_addr:
        host, port = split_portal(metrics_addr)
        metrics.REGISTRY.register(metrics.StoragedCollector(
            lambda: list(runtime.meters.values()), runtime.session_counts))
        metrics.serve_metrics(host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)
    from storaged.cluster.service import start_cluster_node, stop_cluster_node

    cluster_node = await start_cluster_node(directory, store)  # None: no cluster configured
    if cluster_node is not None:
        from storaged.scsi.pr_cluster import SharedPr
        runtime.shared_pr = SharedPr(cluster_node)
    if metrics_addr and cluster_node is not None:
        metrics.REGISTRY.register(metrics.ClusterCollector(cluster_node.status))
    if cluster_node is not None:
        from storaged.vip.service import VipService
        runtime.vip = VipService(cluster_node, runtime.serve_floating)
    # Portals open here; the control socket follows at once, so a CLI call made as
    # soon as the iSCSI port answers reaches the daemon (nothing slow in between).
    await runtime.reconcile()
    if runtime.vip is not None:
        runtime.vip.start()
    sock_path = os.path.join(directory, "control.sock")
    control = await start_control_server(sock_path, store, runtime.reconcile,
                                         extra_ops={"status": lambda *_a, **_k: runtime.status(),
                                                    "pr_ls": runtime.pr_ls,
                                                    "pr_clear": runtime.pr_clear,
                                                    "alua_ls": runtime.alua_ls,
                                                    "lb_live": runtime.lb_live,
                                                    "vip_ls": runtime.vip_ls,
                                                    "vip_sync": runtime.vip_sync,
                                                    **runtime.raid.control_ops()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Per-command objects die by reference counting; move what startup built
    # out of the collector's way and run it less often (cycles are rare here).
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    _notify("READY=1\nSTATUS=serving")
    if banner:
        print(banner, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        _notify("STOPPING=1")
        await stop_control_server(control, sock_path)
        if runtime.vip is not None:
            await runtime.vip.stop()  # addresses removed, locks released: a survivor takes over
        if runtime.shared_pr is not None:
            runtime.shared_pr.close()
        if cluster_node is not None:
            await stop_cluster_node(directory, cluster_node)
        await runtime.mgmt.close()
        await runtime.health.stop()
        await runtime.server.shutdown()
        await runtime.nfs.shutdown()
        for d in runtime.devices.values():
            d.device.close()
        runtime.raid.stop_all()
        store.close()


def _run_loop(coro) -> None:  # noqa: ANN001
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _run_or_exit(coro) -> None:  # noqa: ANN001
    """Run the daemon; a portal that cannot be opened at start is a clear error, exit 1."""
    from storaged.iscsi.server import PortalError

    try:
        _run_loop(coro)
    except PortalError as e:
        print(f"storaged: error: {e}", file=sys.stderr)
        sys.exit(1)


def serve(directory: str, metrics: str | None = None) -> None:
    """Run the daemon in the foreground until SIGINT/SIGTERM."""
    _setup_logging()
    _run_or_exit(_run(directory, metrics, None))


def _create_demo_raid(store: Store, directory: str) -> None:
    """RAID-5 over four sparse member files, sized for a 1 GiB LUN."""
    from storaged.raid.manage import size_for_capacity
    from storaged.raid.service import RaidService

    members = [os.path.join(os.path.abspath(directory), f"demo-disk{i}.img") for i in range(4)]
    raid = RaidService(store, start_workers=False)
    try:
        raid.create(DEMO_BACKSTORE, 5, members, size=size_for_capacity(DEMO_SIZE, 5, 4))
    finally:
        raid.stop_all()


def ensure_demo(directory: str, iscsi: str, nfs: str | None = None,
                plain: bool = False) -> None:
    """Create the demo LUN and open target on first run: a 1 GiB thin LUN on a
    RAID-5 of four sparse members, or on one sparse file with ``plain``.

    With ``nfs`` (HOST:PORT) also export ``DIR/export`` as ``/export`` there.
    """
    from storaged.control import ops
    from storaged.raid.service import RaidVolume, raid_backstore_create

    store = Store(directory)
    try:
        with store.read() as txn:
            need_raid = (not plain and txn.get(Backstore, DEMO_BACKSTORE) is None
                         and txn.get(RaidVolume, DEMO_BACKSTORE) is None)
        if need_raid:
            _create_demo_raid(store, directory)
        with store.write() as txn:
            if txn.get(Backstore, DEMO_BACKSTORE) is None:
                if plain:
                    ops.backstore_create(txn, DEMO_BACKSTORE,
                                         os.path.join(os.path.abspath(directory), "demo.img"),
                                         size=str(DEMO_SIZE))
                else:
                    raid_backstore_create(txn, DEMO_BACKSTORE, DEMO_BACKSTORE, size=DEMO_SIZE)
            t = txn.get(Target, DEMO_IQN)
            if t is None:
                ops.target_create(txn, DEMO_IQN, portals=[iscsi])
                ops.lun_add(txn, DEMO_IQN, DEMO_BACKSTORE, lun=0)
                ops.target_open(txn, DEMO_IQN, True)
            elif t.portals != [iscsi]:
                for p in list(t.portals):
                    ops.portal_remove(txn, DEMO_IQN, p)
                ops.portal_add(txn, DEMO_IQN, iscsi)
            if nfs:
                from storaged.nas.demo import ensure_nfs_demo
                ensure_nfs_demo(txn, directory, nfs)
    finally:
        store.close()


def _nfs_banner(directory: str, nfs: str) -> list[str]:
    from storaged.nas.demo import banner
    return banner(directory, nfs)


def demo(directory: str, iscsi: str = "127.0.0.1:3260", metrics: str | None = None,
         nfs: str | None = "127.0.0.1:2049", plain: bool = False) -> None:
    """The README's main command: serve the demo LUN (and NFS export) in the foreground."""
    _setup_logging()
    ensure_demo(directory, iscsi, nfs, plain)
    host, port = split_portal(iscsi)
    url = f"iscsi://{host}:{port}/{DEMO_IQN}/0"
    with Store(directory) as store, store.read() as txn:
        b = txn.get(Backstore, DEMO_BACKSTORE)
    backing = (f"RAID array {b.path!r} (storaged raid status --dir {directory})"
               if b is not None and b.kind == "raid" else "a sparse file")
    banner = "\n".join([
        f"storaged demo: target {DEMO_IQN}, LUN 0 (1 GiB thin) on {host}:{port}",
        f"  backed by {backing}",
        f"  state directory: {os.path.abspath(directory)}",
        "  connect with:",
        f"    iscsi-ls -s iscsi://{host}:{port}",
        f"    iscsi-inq {url}",
        f"    qemu-img info {url}",
        f"    qemu-img convert -p -O raw disk.img {url}",
        *(_nfs_banner(directory, nfs) if nfs else []),
        "  Ctrl-C stops it.",
    ])
    _run_or_exit(_run(directory, metrics, banner))
