"""OCF 1.1 resource agent for a clusterfs mount (provider ``storaged``, agent
``clusterfs``): what ocf:heartbeat:Filesystem does for GFS2/OCFS2, for
storaged's FUSE cluster filesystem, meant to run as a clone (one mount per node).

start runs ``storaged fs mount`` and waits until the mount is up and its status
socket answers; stop runs a clean ``storaged fs umount`` (journal flushed, slot
released) and, if the mount process has not gone within the stop timeout and
``force_unmount`` is on, kills it and detaches the mount (Filesystem's
force_unmount); monitor checks the kernel's mount table, the mount process's
status socket, and that the mount has not withdrawn (a fenced or failed device
withdraws the mount for good: OCF_ERR_GENERIC, so pacemaker recovers it by a
stop and a fresh mount).  Installed by ``storaged ocf install``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_PERM, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 4, 5, 6, 7
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")

METADATA = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="clusterfs" version="1.0">
<version>1.1</version>
<longdesc lang="en">
Mounts a storaged cluster filesystem (storaged fs mount) on this node and
unmounts it cleanly (journal flushed, journal slot released). Run it as a
clone, ordered after the storaged daemon or the iSCSI sessions that give the
node its device. monitor fails (OCF_ERR_GENERIC) when the mount has withdrawn
(its device answered RESERVATION CONFLICT, its session was dropped by a
fence, or an I/O error): a withdrawn mount never writes again until it is
remounted. With force_unmount, a mount process that does not exit within
the stop timeout is killed and its mount detached.
</longdesc>
<shortdesc lang="en">storaged cluster filesystem mount</shortdesc>
<parameters>
<parameter name="device" required="1">
<longdesc lang="en">The filesystem's device: a file or block device path, or an
iscsi://host[:port]/IQN/LUN URL (storaged's own initiator).</longdesc>
<shortdesc lang="en">Device</shortdesc>
<content type="string" />
</parameter>
<parameter name="directory" unique="1" required="1">
<longdesc lang="en">Absolute path of the mount point (created if missing).</longdesc>
<shortdesc lang="en">Mount point</shortdesc>
<content type="string" />
</parameter>
<parameter name="options" required="0">
<longdesc lang="en">Comma-separated mount options, as storaged fs mount -o takes
them (ro, noatime, relatime, hold_ms=N, localflocks, nocache). Use the
local, cluster_dir and lockspace parameters for those settings.</longdesc>
<shortdesc lang="en">Mount options</shortdesc>
<content type="string" default="" />
</parameter>
<parameter name="cluster_dir" required="0">
<longdesc lang="en">State directory of this node's storaged cluster configuration
(storaged cluster init/join): the mount runs that cluster node and takes
its locks from its DLM. Required unless local is set.</longdesc>
<shortdesc lang="en">Cluster state directory</shortdesc>
<content type="string" default="" />
</parameter>
<parameter name="lockspace" required="0">
<longdesc lang="en">DLM lockspace of the cluster configuration the mount uses
(one of its lockspaces; empty: default).</longdesc>
<shortdesc lang="en">Lockspace</shortdesc>
<content type="string" default="" />
</parameter>
<parameter name="local" required="0">
<longdesc lang="en">Mount with node-local locks (-o local): for a single node
only, never for a filesystem other nodes mount; no cluster_dir needed.</longdesc>
<shortdesc lang="en">Single-node mount</shortdesc>
<content type="boolean" default="false" />
</parameter>
<parameter name="run_dir" required="0">
<longdesc lang="en">Directory of the mount processes' status sockets
(STORAGED_FS_RUNDIR; empty: /run/storaged/fs).</longdesc>
<shortdesc lang="en">Status socket directory</shortdesc>
<content type="string" default="" />
</parameter>
<parameter name="force_unmount" required="0">
<longdesc lang="en">If the mount process does not exit within the stop timeout
after a clean unmount was asked for, kill it (SIGTERM, then SIGKILL) and
detach the mount, so that stop succeeds and the node need not be fenced.</longdesc>
<shortdesc lang="en">Kill a mount that does not stop</shortdesc>
<content type="boolean" default="true" />
</parameter>
</parameters>
<actions>
<action name="start" timeout="60s" />
<action name="stop" timeout="60s" />
<action name="monitor" timeout="40s" interval="20s" depth="0" />
<action name="meta-data" timeout="5s" />
<action name="validate-all" timeout="20s" />
</actions>
</resource-agent>
"""


def _log(msg: str) -> None:
    print(f"storaged OCF clusterfs: {msg}", file=sys.stderr)


def _params() -> dict[str, str]:
    env = os.environ.get
    return {"device": env("OCF_RESKEY_device", "").strip(),
            "directory": env("OCF_RESKEY_directory", "").strip(),
            "options": env("OCF_RESKEY_options", "").strip(),
            "cluster_dir": env("OCF_RESKEY_cluster_dir", "").strip(),
            "lockspace": env("OCF_RESKEY_lockspace", "").strip(),
            "local": env("OCF_RESKEY_local", "false").strip().lower(),
            "run_dir": env("OCF_RESKEY_run_dir", "").strip(),
            "force_unmount": env("OCF_RESKEY_force_unmount", "true").strip().lower()}


def _timeout(default: float) -> float:
    """This action's timeout (pacemaker passes it in ms), less a margin for the agent."""
    raw = os.environ.get("OCF_RESKEY_CRM_meta_timeout", "")
    secs = int(raw) / 1000 if raw.isdigit() else default
    return max(5.0, secs - 5)


def _env(p: dict[str, str]) -> dict[str, str]:
    from storaged.clusterfs.cli import RUN_DIR_ENV

    env = dict(os.environ)
    if p["run_dir"]:
        env[RUN_DIR_ENV] = p["run_dir"]
    return env


def validate(p: dict[str, str]) -> int:
    """OCF_SUCCESS or the OCF code for what is wrong: OCF_ERR_CONFIGURED for
    parameters that are wrong anywhere, OCF_ERR_INSTALLED for what this node
    lacks (the device, fusermount3, the cluster directory)."""
    try:
        from storaged.block.open import is_url
        from storaged.clusterfs.cli import MOUNT_OPTIONS
    except ImportError:
        _log("the storaged package is not importable by this Python")
        return OCF_ERR_INSTALLED
    for name in ("local", "force_unmount"):
        if p[name] not in TRUE + FALSE:
            _log(f"{name} must be a boolean (true/false), got {p[name]!r}")
            return OCF_ERR_CONFIGURED
    if not p["device"]:
        _log("device is required")
        return OCF_ERR_CONFIGURED
    d = p["directory"]
    if not d:
        _log("directory is required")
        return OCF_ERR_CONFIGURED
    if not os.path.isabs(d):
        _log(f"directory must be an absolute path, got {d!r}")
        return OCF_ERR_CONFIGURED
    for item in filter(None, p["options"].split(",")):
        key = item.partition("=")[0]
        if key in ("local", "lockspace"):
            _log(f"options: give {key} as the {key} parameter, not as a mount option")
            return OCF_ERR_CONFIGURED
        if key not in MOUNT_OPTIONS:
            _log(f"options: unknown mount option {key!r} "
                 f"(known: {', '.join(sorted(MOUNT_OPTIONS - {'local', 'lockspace'}))})")
            return OCF_ERR_CONFIGURED
    if p["run_dir"] and not os.path.isabs(p["run_dir"]):
        _log(f"run_dir must be an absolute path, got {p['run_dir']!r}")
        return OCF_ERR_CONFIGURED
    local = p["local"] in TRUE
    if local and (p["cluster_dir"] or p["lockspace"]):
        _log("local=true mounts with node-local locks: do not also give cluster_dir or "
             "lockspace")
        return OCF_ERR_CONFIGURED
    if not local:
        rc = _validate_cluster(p)
        if rc != OCF_SUCCESS:
            return rc
    if not is_url(p["device"]) and not os.path.exists(p["device"]):
        _log(f"device {p['device']} does not exist on this node")
        return OCF_ERR_INSTALLED
    if not _in_mount_table(d) and os.path.exists(d) and not os.path.isdir(d):
        _log(f"directory {d} exists and is not a directory")
        return OCF_ERR_CONFIGURED
    if shutil.which("fusermount3") is None:
        _log("fusermount3 not found: install the Debian package fuse3")
        return OCF_ERR_INSTALLED
    return OCF_SUCCESS


def _validate_cluster(p: dict[str, str]) -> int:
    c = p["cluster_dir"]
    if not c:
        _log("cluster_dir is required unless local=true (a directory set up with "
             "'storaged cluster init/join')")
        return OCF_ERR_CONFIGURED
    if not os.path.isabs(c):
        _log(f"cluster_dir must be an absolute path, got {c!r}")
        return OCF_ERR_CONFIGURED
    if not os.path.isdir(c):
        _log(f"cluster_dir {c} does not exist on this node")
        return OCF_ERR_INSTALLED
    from storaged.cluster.config import ClusterConfig
    from storaged.state import Store

    try:
        with Store(c) as store, store.read() as txn:
            cfg = txn.get(ClusterConfig, ClusterConfig.KEY)
    except Exception as e:  # noqa: BLE001 - an unreadable store is this node's problem
        _log(f"cannot read the state store in {c}: {e}")
        return OCF_ERR_INSTALLED
    if cfg is None:
        _log(f"no cluster configured in {c}: run 'storaged cluster init' or "
             "'storaged cluster join' first")
        return OCF_ERR_INSTALLED
    ls = p["lockspace"] or "default"
    if ls not in cfg.lockspaces:
        _log(f"lockspace {ls!r} is not in cluster {cfg.name!r} ({', '.join(cfg.lockspaces)})")
        return OCF_ERR_CONFIGURED
    return OCF_SUCCESS


def _resolve(directory: str) -> str:
    """``directory`` with its parent resolved, without a stat of the directory itself
    (on a hung mount that stat waits for the FUSE daemon forever)."""
    path = os.path.abspath(directory)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _in_mount_table(directory: str) -> bool:
    """Whether a FUSE filesystem is mounted on ``directory`` (by the kernel's table:
    ``os.path.ismount`` misses a withdrawn or dead mount, whose root stat fails)."""
    real = _resolve(directory)
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        target = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if target == real and fields[2].startswith("fuse"):
            return True
    return False


def _status(p: dict[str, str]) -> dict | None:
    """The mount process's status (its socket's JSON), or None if it does not answer."""
    from storaged.clusterfs.cli import status_socket
    from storaged.control.client import probe_json

    return probe_json(status_socket(p["directory"], p["run_dir"] or None))


def _pidfile(p: dict[str, str]) -> str:
    from storaged.clusterfs.cli import status_socket

    return status_socket(p["directory"], p["run_dir"] or None)[:-5] + ".ocf.pid"


def _mount_pid(p: dict[str, str], info: dict | None) -> int | None:
    """The mount process: from its status, or (when it does not answer: hung or
    stopped) from the pid start recorded, if that process still mounts this directory."""
    if info is not None and isinstance(info.get("pid"), int):
        return info["pid"]
    try:
        with open(_pidfile(p)) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    real = _resolve(p["directory"]).encode()
    ours = b"mount" in argv and any(_resolve(a.decode(errors="replace")).encode() == real
                                    for a in argv if a.startswith(b"/"))
    return pid if ours else None


def monitor(p: dict[str, str]) -> int:
    mounted = _in_mount_table(p["directory"])
    info = _status(p)
    if info is None:
        if mounted:
            _log(f"{p['directory']} is mounted but its mount process does not answer")
            return OCF_ERR_GENERIC
        return OCF_NOT_RUNNING
    if not mounted:
        _log(f"the mount process {info.get('pid')} runs but {p['directory']} is not mounted")
        return OCF_ERR_GENERIC
    if info.get("withdrawn"):
        _log(f"{p['directory']} has withdrawn: {info['withdrawn']} (remount to recover)")
        return OCF_ERR_GENERIC
    return OCF_SUCCESS


def start(p: dict[str, str]) -> int:
    rc = monitor(p)
    if rc != OCF_NOT_RUNNING:
        return rc     # running already, or failed: pacemaker stops it first
    os.makedirs(p["directory"], exist_ok=True)
    timeout = _timeout(60)
    cmd = [sys.executable, "-m", "storaged", "fs", "mount", p["device"], p["directory"],
           "--timeout", f"{max(1.0, timeout - 6):g}"]
    if p["options"]:
        cmd += ["-o", p["options"]]
    if p["local"] in TRUE:
        cmd += ["-o", "local"]
    else:
        cmd += ["--cluster", p["cluster_dir"]]
        if p["lockspace"]:
            cmd += ["-o", f"lockspace={p['lockspace']}"]
    if p["run_dir"]:
        os.makedirs(p["run_dir"], exist_ok=True)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, env=_env(p))
    except subprocess.TimeoutExpired:
        _log(f"storaged fs mount did not finish within {timeout:g}s")
        return OCF_ERR_GENERIC
    if r.returncode != 0:
        _log(f"storaged fs mount failed: {(r.stderr or r.stdout).strip()}")
        return OCF_ERR_GENERIC
    m = re.search(r"\(pid (\d+)\)", r.stdout)
    if m:
        with open(_pidfile(p), "w") as f:
            f.write(m.group(1) + "\n")
    deadline = time.monotonic() + 5
    while (rc := monitor(p)) != OCF_SUCCESS and time.monotonic() < deadline:
        time.sleep(0.1)
    return rc


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kill(pid: int, wait: float) -> bool:
    """SIGTERM, then SIGKILL, the mount process; whether it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _alive(pid):
            return True
    return not _alive(pid)


def stop(p: dict[str, str]) -> int:
    info = _status(p)
    if info is None and not _in_mount_table(p["directory"]):
        return OCF_SUCCESS
    timeout = _timeout(60)
    force = p["force_unmount"] in TRUE
    # a clean unmount gets most of the time; a forced one the rest
    clean = timeout * 0.7 if force else timeout
    pid = _mount_pid(p, info)
    if info is not None:
        try:
            r = subprocess.run([sys.executable, "-m", "storaged", "fs", "umount",
                                p["directory"], "--timeout", f"{max(1.0, clean - 2):g}"],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=clean, env=_env(p))
            if r.returncode != 0:
                _log(f"storaged fs umount: {(r.stderr or r.stdout).strip()}")
        except subprocess.TimeoutExpired:
            _log(f"storaged fs umount did not finish within {clean:g}s")
    if isinstance(pid, int) and _alive(pid):
        if not force:
            _log(f"the mount process {pid} did not exit and force_unmount is off")
            return OCF_ERR_GENERIC
        _log(f"killing the mount process {pid} of {p['directory']} (force_unmount)")
        if not _kill(pid, max(2.0, (timeout - clean) / 3)):
            _log(f"the mount process {pid} survived SIGKILL")
            return OCF_ERR_GENERIC
    if _in_mount_table(p["directory"]):
        if not force:
            _log(f"{p['directory']} is still mounted and force_unmount is off")
            return OCF_ERR_GENERIC
        # the process is gone: detach what is left (ENOTCONN) from the namespace
        subprocess.run(["fusermount3", "-u", "-z", p["directory"]], capture_output=True,
                       timeout=10)
    if _in_mount_table(p["directory"]):
        _log(f"{p['directory']} is still mounted")
        return OCF_ERR_GENERIC
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_pidfile(p))
    return OCF_SUCCESS


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    action = argv[0] if argv else ""
    if action in ("meta-data", "metadata"):
        print(METADATA, end="")
        sys.exit(OCF_SUCCESS)
    if action not in ("start", "stop", "monitor", "validate-all", "status"):
        _log(f"unimplemented action {action!r}")
        sys.exit(OCF_ERR_UNIMPLEMENTED)
    p = _params()
    rc = validate(p)
    if action == "validate-all":
        sys.exit(rc)
    if rc != OCF_SUCCESS:
        # stop/monitor where it cannot be configured (or its device is gone): it is
        # stopped here if nothing is mounted on the directory.
        if action in ("stop", "monitor", "status") and (
                not p["directory"] or not os.path.isabs(p["directory"])
                or not _in_mount_table(p["directory"])):
            sys.exit(OCF_SUCCESS if action == "stop" else OCF_NOT_RUNNING)
        if action == "start":
            sys.exit(rc)
    sys.exit({"start": start, "stop": stop, "monitor": monitor, "status": monitor}[action](p))


if __name__ == "__main__":
    main()
