"""``storaged fs``: make, mount, unmount, check and inspect clusterfs filesystems."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, NoReturn

import click

RUN_DIR_ENV = "STORAGED_FS_RUNDIR"
MOUNT_OPTIONS = frozenset({"ro", "rw", "noatime", "relatime", "local", "lockspace", "hold_ms",
                           "localflocks", "nocache"})


def _fail(message: str) -> NoReturn:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def run_dir() -> str:
    """Where mount processes put their status sockets (``$STORAGED_FS_RUNDIR``)."""
    return os.environ.get(RUN_DIR_ENV) or "/run/storaged/fs"


def status_socket(mountpoint: str, directory: str | None = None) -> str:
    """The status socket of the mount on ``mountpoint``, in ``directory`` (default
    :func:`run_dir`): ``fs status``/``umount`` and the OCF agent find the mount by it.

    Only the parent is resolved: a stat of the mount point itself waits for its
    FUSE daemon, and a hung daemon would hang the caller (umount, monitor)."""
    path = os.path.abspath(mountpoint)
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    key = hashlib.sha1(path.encode()).hexdigest()[:16]
    return os.path.join(directory or run_dir(), f"{key}.sock")


_sock_for = status_socket


def _open_device(path: str, read_only: bool = False) -> Any:
    """A file, block device or iscsi:// LUN (storaged.block.open); CLI error if not."""
    from storaged.block.base import BlockDeviceError
    from storaged.block.open import open_device
    try:
        return open_device(path, block_size=512, read_only=read_only)
    except BlockDeviceError as e:
        _fail(str(e.strerror or e))
    except OSError as e:
        _fail(f"cannot open {path}: {e.strerror}")


def _device_name(path: str) -> str:
    """How status shows a device: the real path, or the URL without its secrets."""
    from storaged.block.open import is_url, redact
    return redact(path) if is_url(path) else os.path.realpath(path)


def _fsname(path: str) -> str:
    """The mount table's source name: the file's name, or ``IQN/LUN`` of a URL
    (no commas: libfuse splits its options on them)."""
    from storaged.block.open import is_url
    if is_url(path):
        path = path.split("?")[0]
        return "/".join(path.rstrip("/").split("/")[-2:]).replace(",", "_")
    return os.path.basename(path)


@click.group()
def fs() -> None:
    """Shared-disk cluster filesystem (GFS2/OCFS2 style, through FUSE)."""


@fs.command("mkfs")
@click.argument("device")
@click.option("--journals", "-j", type=int, required=True,
              help="Journal slots: how many nodes may mount at once.")
@click.option("--block-size", type=int, default=4096, show_default=True)
@click.option("--journal-blocks", type=int, default=512, show_default=True,
              help="Blocks per journal.")
@click.option("--label", default="", help="Filesystem label (up to 32 bytes).")
@click.option("--force", is_flag=True, help="Overwrite a device that holds a filesystem.")
def fs_mkfs(device: str, journals: int, block_size: int, journal_blocks: int, label: str,
            force: bool) -> None:
    """Make a filesystem on DEVICE (a file or block device every node opens)."""
    from storaged.clusterfs.mkfs import MkfsError, mkfs
    dev = _open_device(device)
    try:
        geo = mkfs(dev, journals, block_size=block_size, journal_blocks=journal_blocks,
                   label=label, force=force)
    except MkfsError as e:
        _fail(f"{device}: {e}")
    finally:
        dev.close()
    click.echo(f"{device}: clusterfs, {geo.total_blocks} blocks of {geo.bs} bytes, "
               f"{geo.journals} journals, {geo.rg_count} resource groups, "
               f"uuid {geo.uuid.hex()}")


def _parse_opts(opts: tuple[str, ...]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, eq, val = item.partition("=")
            out[key] = val if eq else True
    unknown = sorted(set(out) - MOUNT_OPTIONS)
    if unknown:
        _fail(f"unknown mount option(s): {', '.join(unknown)} "
              f"(known: {', '.join(sorted(MOUNT_OPTIONS))})")
    if "hold_ms" in out:
        raw = out["hold_ms"]
        try:
            hold = float(raw) if isinstance(raw, str) else -1.0
        except ValueError:
            hold = -1.0
        if not 0 <= hold <= 60000:
            _fail(f"hold_ms={raw if isinstance(raw, str) else ''}: the minimum lock hold time "
                  "must be a number of milliseconds from 0 to 60000")
    return out


@fs.command("mount")
@click.argument("device")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-o", "options", multiple=True,
              help="Comma-separated: ro, noatime, relatime, local, lockspace=NAME, "
                   "hold_ms=N (minimum lock hold time), localflocks, nocache.")
@click.option("--cluster", "cluster_dir", type=click.Path(file_okay=False),
              help="State directory of this host's cluster config (storaged cluster init); "
                   "the mount runs that cluster node.  Required unless -o local.")
@click.option("--foreground", "-f", is_flag=True, help="Serve in the foreground.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for cluster quorum and the mount.")
def fs_mount(device: str, mountpoint: str, options: tuple[str, ...], cluster_dir: str | None,
             foreground: bool, timeout: float) -> None:
    """Mount DEVICE at MOUNTPOINT on this node."""
    opts = _parse_opts(options)
    if not opts.get("local") and not cluster_dir:
        _fail("cluster mode needs --cluster DIR (a directory set up with 'storaged cluster "
              "init/join'); use -o local for a single-node mount")
    if not os.path.isdir(mountpoint):
        _fail(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint):
        _fail(f"{mountpoint}: something is already mounted there")
    from storaged.block.open import exists
    if not exists(device):
        _fail(f"{device}: no such file or device")
    if not foreground:
        _background(sys.argv, mountpoint, timeout)
        return
    _serve(device, mountpoint, opts, cluster_dir, timeout)


def _background(argv: list[str], mountpoint: str, timeout: float) -> None:
    args = [sys.executable, "-m", "storaged"] + argv[1:] + ["--foreground"]
    os.makedirs(run_dir(), exist_ok=True)
    logpath = _sock_for(mountpoint)[:-5] + ".log"
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    deadline = time.monotonic() + timeout + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(logpath, "rb") as f:
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            _fail(f"mount failed: {' / '.join(tail) or 'exit status ' + str(proc.returncode)}")
        if os.path.ismount(mountpoint) and os.path.exists(_sock_for(mountpoint)):
            click.echo(f"mounted on {mountpoint} (pid {proc.pid})")
            return
        time.sleep(0.05)
    proc.kill()
    _fail(f"mount of {mountpoint} did not come up within {timeout:g}s")


def _serve(device: str, mountpoint: str, opts: dict[str, str | bool],
           cluster_dir: str | None, timeout: float) -> None:
    from storaged.block.open import normalize
    from storaged.clusterfs.format import FormatError
    from storaged.clusterfs.fs import ClusterFS
    from storaged.clusterfs.fuse import run_fuse, serve_status
    from storaged.clusterfs.locks import LocalLocks, LockLost

    device, mountpoint = normalize(device), os.path.abspath(mountpoint)  # libfuse chdirs
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks to the log, on demand
    read_only = bool(opts.get("ro"))
    dev = _open_device(device, read_only=read_only)
    lt = node = None
    control = ""
    plocks: Any = None
    if opts.get("local"):
        locks: Any = LocalLocks(caching=not opts.get("nocache"))
        mode = "local"
    else:
        from storaged.cluster.cli import load
        from storaged.clusterfs.cluster import LoopThread, dlm_locks, start_node
        from storaged.clusterfs.glock import DEFAULT_HOLD
        cfg, node_id = load(cluster_dir or ".")
        lockspace = str(opts.get("lockspace") or "default")
        if lockspace not in cfg.lockspaces:
            _fail(f"lockspace {lockspace!r} is not in cluster {cfg.name!r} "
                  f"({', '.join(cfg.lockspaces)})")
        from storaged.cluster.client import socket_path
        control = socket_path(cluster_dir or ".")
        if os.path.exists(control):
            probe = socket.socket(socket.AF_UNIX)
            try:
                if probe.connect_ex(control) == 0:
                    _fail(f"a cluster node already runs for {cluster_dir} ({control})")
            finally:
                probe.close()
            os.unlink(control)  # a stale socket of a killed node or mount
        lt = LoopThread()
        try:
            # The control socket lets `storaged cluster status` and `storaged lock`
            # (with --dir) reach the node this mount runs.
            node = start_node(lt, cfg, node_id, timeout=timeout, control_path=control)
        except Exception as e:  # noqa: BLE001 - reported as a CLI error
            _fail(f"cluster node {node_id} did not join a quorate view: {e}")
        hold = float(str(opts.get("hold_ms", DEFAULT_HOLD * 1000))) / 1000
        locks = dlm_locks(lt, node, lockspace, cached=not opts.get("nocache"), hold=hold)
        if not opts.get("localflocks"):
            from storaged.clusterfs.plocks import PosixLocks
            from storaged.dlm.api import SyncLockspace
            plocks = PosixLocks(SyncLockspace(node.lockspace(lockspace), lt.loop), "")
        mode = f"cluster {cfg.name} node {node_id}"
    try:
        fsobj = ClusterFS(dev, locks, read_only=read_only).mount()
    except FormatError as e:
        _fail(f"{device}: not a clusterfs filesystem ({e})")
    except OSError as e:
        _fail(f"{device}: {e.strerror}{': ' + e.filename if e.filename else ''}")
    except LockLost as e:
        _fail(f"{device}: the cluster's lock manager failed the mount: {e}")
    started = time.time()
    if plocks is not None:
        plocks.tag = fsobj.tag

    def status() -> dict[str, Any]:
        return {"device": _device_name(device), "mountpoint": os.path.realpath(mountpoint),
                "pid": os.getpid(), "mode": mode, "slot": fsobj.slot,
                "read_only": read_only, "withdrawn": fsobj.withdrawn,
                "uptime_s": round(time.time() - started, 1), "stats": dict(fsobj.stats),
                "lock_stats": dict(getattr(locks, "stats", {})),
                "cache": None if fsobj.cache is None else
                dict(fsobj.cache.stats, blocks=len(fsobj.cache)),
                "plocks": None if plocks is None else dict(plocks.stats),
                "localflocks": plocks is None, "control": ctl}

    os.makedirs(run_dir(), exist_ok=True)
    sock = _sock_for(mountpoint)
    ctl = sock[:-5] + ".ctl"
    serve_status(sock, status)
    _serve_control(ctl, fsobj)
    done = threading.Event()
    if node is not None and not read_only:
        threading.Thread(target=_recovery_loop, args=(fsobj, done), daemon=True,
                         name="clusterfs-recovery").start()
    try:
        run_fuse(fsobj, mountpoint, read_only=read_only, fsname=_fsname(device),
                 plocks=plocks)
    except OSError as e:
        _fail(str(e.strerror))
    finally:
        done.set()
        fsobj.umount()  # idempotent: destroy() already did it on a clean unmount
        for path in (sock, ctl):
            if os.path.exists(path):
                os.unlink(path)
        if node is not None and lt is not None:
            from storaged.clusterfs.cluster import stop_node
            try:
                stop_node(lt, node)
            finally:
                lt.stop()
                if control and os.path.exists(control):
                    os.unlink(control)
        dev.close()


def _admin(fsobj: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Run one ``fs grow`` / ``fs add-journal`` request on this mount."""
    from storaged.clusterfs import resize
    try:
        if req.get("op") == "grow":
            out: dict[str, Any] = resize.grow(fsobj).as_dict()
        elif req.get("op") == "add-journal":
            out = {"slots": resize.add_journals(fsobj, int(req.get("count", 1)))}
        else:
            return {"error": f"unknown request {req.get('op')!r}"}
    except resize.ResizeError as e:
        return {"error": str(e)}
    except OSError as e:
        return {"error": f"{e.strerror or e}"}
    out["summary"] = resize.summary(fsobj)
    return out


def _serve_control(path: str, fsobj: Any) -> None:
    """Answer JSON requests (one line in, one line out) on Unix socket ``path``: how
    ``fs grow`` and ``fs add-journal`` reach a mount to run online under its locks.
    The socket is mode 0600 in the run directory: only its owner (root) may ask."""
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(4)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(10)
                    line = conn.makefile("rb").readline()
                    try:
                        req = json.loads(line)
                    except ValueError:
                        req = {}
                    reply = _admin(fsobj, req if isinstance(req, dict) else {})
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass
    threading.Thread(target=loop, name="clusterfs-control", daemon=True).start()


def _recovery_loop(fsobj: Any, done: threading.Event, interval: float = 1.0) -> None:
    """Replay the journal of any node that is gone: its journal lock is free only once
    the membership fenced it and the DLM purged its locks (so this is safe to poll)."""
    while not done.wait(interval):
        try:
            n = fsobj.recover_all()
        except OSError as e:
            click.echo(f"storaged: recovery poll failed: {e}", err=True)
            continue
        if n:
            click.echo(f"storaged: replayed {n} block(s) of a departed node's journal",
                       err=True)


def _query(sock: str) -> dict[str, Any] | None:
    from storaged.control.client import probe_json
    return probe_json(sock)


@fs.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("--timeout", type=float, default=30.0, show_default=True)
def fs_umount(mountpoint: str, timeout: float) -> None:
    """Unmount cleanly: journal flushed and marked clean, slot released."""
    info = _query(_sock_for(mountpoint))
    if info is None:
        _fail(f"{mountpoint}: no clusterfs mount here")
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        _fail(f"fusermount3 -u {mountpoint}: {r.stderr.strip()}")
    pid = info["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            click.echo(f"unmounted {mountpoint}")
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    _fail(f"the mount process {pid} did not exit within {timeout:g}s (sent SIGTERM)")


@fs.command("check")
@click.argument("device")
@click.option("--repair", is_flag=True, help="Replay journals and fix what is found.")
@click.option("--json", "as_json", is_flag=True)
def fs_check(device: str, repair: bool, as_json: bool) -> None:
    """Check DEVICE offline (it must not be mounted anywhere); exit 1 if problems remain."""
    from storaged.clusterfs.mkfs import check
    for info in _all_status():
        if info.get("device") == _device_name(device):
            _fail(f"{device} is mounted on {info['mountpoint']} (pid {info['pid']}): "
                  "unmount it on every node first")
    dev = _open_device(device, read_only=not repair)
    try:
        rep = check(dev, repair=repair)
    finally:
        dev.close()
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=2))
    else:
        for p in rep.problems:
            click.echo(f"problem: {p}")
        for r in rep.repaired:
            click.echo(f"repaired: {r}")
        click.echo(f"{device}: {rep.inodes} inodes, {rep.used_blocks} blocks in use, "
                   f"{len(rep.problems)} problem(s), {len(rep.repaired)} repaired")
    if rep.problems and not repair:
        sys.exit(1)


def _resize(device: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``req`` online through this host's mount of ``device``, or offline."""
    for info in _all_status():
        if info.get("device") == _device_name(device) and not info.get("read_only"):
            from storaged.control.client import probe_json
            ctl = info.get("control")
            reply = probe_json(ctl, json.dumps(req).encode() + b"\n", timeout=timeout) \
                if ctl else None
            if reply is None:
                _fail(f"the mount on {info['mountpoint']} (pid {info['pid']}) did not answer")
            reply["online"] = info["mountpoint"]
            return reply
    from storaged.clusterfs.format import FormatError, read_geometry
    from storaged.clusterfs.fs import ClusterFS
    from storaged.clusterfs.journal import Journal
    from storaged.clusterfs.locks import LocalLocks
    dev = _open_device(device)
    try:
        try:
            geo = read_geometry(dev)
            for s in range(geo.journals):
                if not Journal(dev, geo, s).header()["flags"] & 1:
                    _fail(f"{device}: journal {s} is in use: the filesystem is mounted on "
                          "another node (run this there, online) or was not cleanly "
                          "unmounted (storaged fs check --repair first)")
            fsobj = ClusterFS(dev, LocalLocks()).mount()
        except FormatError as e:
            _fail(f"{device}: not a clusterfs filesystem ({e})")
        try:
            reply = _admin(fsobj, req)
        finally:
            fsobj.umount()
    finally:
        dev.close()
    reply["online"] = None
    return reply


@fs.command("grow")
@click.argument("device")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", type=float, default=60.0, show_default=True)
def fs_grow(device: str, as_json: bool, timeout: float) -> None:
    """Add resource groups for the space DEVICE gained (like gfs2_grow).

    Online through this host's mount of DEVICE (under the cluster's rindex lock;
    the other nodes see the new space at once), or offline when nothing mounts it."""
    reply = _resize(device, {"op": "grow"}, timeout)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    if "error" in reply:
        _fail(f"{device}: {reply['error']}")
    if not as_json:
        s = reply["summary"]
        how = f"online via {reply['online']}" if reply["online"] else "offline"
        click.echo(f"{device}: grew {how} from {reply['old_blocks']} to {reply['new_blocks']} "
                   f"blocks of {s['block_size']} bytes; {reply['old_groups']} -> "
                   f"{reply['new_groups']} resource groups, {reply['added_free']} blocks free "
                   "added")


@fs.command("add-journal")
@click.argument("device")
@click.option("--count", "-n", type=int, default=1, show_default=True,
              help="How many journal slots to add.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", type=float, default=60.0, show_default=True)
def fs_add_journal(device: str, count: int, as_json: bool, timeout: float) -> None:
    """Add journal slots to DEVICE so more nodes can mount it (like gfs2_jadd)."""
    reply = _resize(device, {"op": "add-journal", "count": count}, timeout)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    if "error" in reply:
        _fail(f"{device}: {reply['error']}")
    if not as_json:
        how = f"online via {reply['online']}" if reply["online"] else "offline"
        click.echo(f"{device}: added journal(s) {', '.join(map(str, reply['slots']))} {how}; "
                   f"{reply['summary']['journals']} journals in all")


def _all_status() -> list[dict[str, Any]]:
    out = []
    d = run_dir()
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        if name.endswith(".sock"):
            info = _query(os.path.join(d, name))
            if info is not None:
                out.append(info)
    return out


@fs.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fs_status(as_json: bool) -> None:
    """This host's clusterfs mounts: device, journal slot, mode, PIDs, counters."""
    mounts = _all_status()
    if as_json:
        click.echo(json.dumps(mounts, indent=2))
        return
    if not mounts:
        click.echo("no clusterfs mounts")
    for m in mounts:
        w = f" WITHDRAWN ({m['withdrawn']})" if m["withdrawn"] else ""
        click.echo(f"{m['mountpoint']}: {m['device']} journal {m['slot']} {m['mode']} "
                   f"pid {m['pid']}{w}; ops {m['stats']['ops']} commits "
                   f"{m['stats']['commits']} restarts {m['stats']['restarts']}")
        ls, cache = m.get("lock_stats") or {}, m.get("cache") or {}
        if "basts" in ls:
            click.echo(f"  glocks: {ls['dlm_requests']} DLM requests, {ls['cached']} cached "
                       f"grants, {ls['basts']} basts, {ls['demotes']} demotes, LVB hits "
                       f"{ls['lvb_hits']}; block cache {cache.get('hits', 0)} hits "
                       f"{cache.get('misses', 0)} misses; fcntl/flock "
                       f"{'node-local' if m.get('localflocks') else 'cluster-wide'}")
