"""OCF 1.1 resource agent for the storaged daemon (provider ``storaged``, agent
``storaged``): pacemaker starts, stops and monitors one daemon per state
directory, so the target moves with the resource.

Installed as ``/usr/lib/ocf/resource.d/storaged/storaged`` by
``storaged ocf install``.  Parameters come as ``OCF_RESKEY_<name>``
environment variables; exit codes are OCF's (0 success, 1 generic error,
2 bad arguments, 3 unimplemented, 5 not installed, 6 not configured,
7 not running).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_PERM, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 4, 5, 6, 7
PIDFILE = "storaged-ocf.pid"

METADATA = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="storaged" version="1.0">
<version>1.1</version>
<longdesc lang="en">
Runs the storaged daemon (iSCSI target, NFS export, RAID, management
endpoint) for one state directory. The daemon serves what the state
directory's LMDB store configures; put the directory on storage that moves
with the resource (or replicate its configuration) for failover.
</longdesc>
<shortdesc lang="en">storaged storage daemon</shortdesc>
<parameters>
<parameter name="state_dir" unique="1" required="1">
<longdesc lang="en">State directory of the daemon (LMDB store and control socket).</longdesc>
<shortdesc lang="en">State directory</shortdesc>
<content type="string" />
</parameter>
<parameter name="metrics" required="0">
<longdesc lang="en">Serve Prometheus metrics on this ip:port (empty: off).</longdesc>
<shortdesc lang="en">Metrics address</shortdesc>
<content type="string" default="" />
</parameter>
<parameter name="start_wait" required="0">
<longdesc lang="en">Seconds to wait for the control socket to answer after start.</longdesc>
<shortdesc lang="en">Start wait</shortdesc>
<content type="integer" default="30" />
</parameter>
</parameters>
<actions>
<action name="start" timeout="40s" />
<action name="stop" timeout="30s" />
<action name="monitor" timeout="20s" interval="10s" depth="0" />
<action name="meta-data" timeout="5s" />
<action name="validate-all" timeout="20s" />
</actions>
</resource-agent>
"""


def _log(msg: str) -> None:
    print(f"storaged OCF: {msg}", file=sys.stderr)


def _params() -> dict[str, str]:
    return {"state_dir": os.environ.get("OCF_RESKEY_state_dir", ""),
            "metrics": os.environ.get("OCF_RESKEY_metrics", ""),
            "start_wait": os.environ.get("OCF_RESKEY_start_wait", "30")}


def validate(p: dict[str, str]) -> int:
    """OCF_SUCCESS or the OCF code for what is wrong."""
    try:
        import storaged  # noqa: F401
    except ImportError:
        _log("the storaged package is not importable by this Python")
        return OCF_ERR_INSTALLED
    d = p["state_dir"]
    if not d:
        _log("state_dir is required")
        return OCF_ERR_CONFIGURED
    if not os.path.isabs(d):
        _log(f"state_dir must be an absolute path, got {d!r}")
        return OCF_ERR_CONFIGURED
    if os.path.exists(d) and not os.path.isdir(d):
        _log(f"state_dir {d} is not a directory")
        return OCF_ERR_CONFIGURED
    if not p["start_wait"].isdigit() or not 1 <= int(p["start_wait"]) <= 3600:
        _log(f"start_wait must be 1..3600 seconds, got {p['start_wait']!r}")
        return OCF_ERR_CONFIGURED
    if p["metrics"]:
        from storaged.state.validate import normalize_portal
        try:
            normalize_portal(p["metrics"])
        except Exception as e:  # noqa: BLE001 - any bad address is a config error
            _log(f"metrics: {e}")
            return OCF_ERR_CONFIGURED
    return OCF_SUCCESS


def _pid(d: str) -> int | None:
    try:
        with open(os.path.join(d, PIDFILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"storaged" not in f.read():
                return None      # the pid was reused by something else
    except OSError:
        return None
    return pid


def monitor(p: dict[str, str]) -> int:
    from storaged.control.client import call

    d = p["state_dir"]
    if _pid(d) is None:
        return OCF_NOT_RUNNING
    try:
        call(os.path.join(d, "control.sock"), "ping", timeout=5)
    except Exception as e:  # noqa: BLE001 - a daemon that does not answer is failed
        _log(f"daemon runs but its control socket does not answer: {e}")
        return OCF_ERR_GENERIC
    return OCF_SUCCESS


def start(p: dict[str, str]) -> int:
    d = p["state_dir"]
    if monitor(p) == OCF_SUCCESS:
        return OCF_SUCCESS
    os.makedirs(d, mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "storaged", "--dir", d, "serve"]
    if p["metrics"]:
        cmd += ["--metrics", p["metrics"]]
    with open(os.path.join(d, "storaged-ocf.log"), "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    with open(os.path.join(d, PIDFILE), "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + int(p["start_wait"])
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _log(f"storaged exited with {proc.returncode} (see {d}/storaged-ocf.log)")
            return OCF_ERR_GENERIC
        if monitor(p) == OCF_SUCCESS:
            return OCF_SUCCESS
        time.sleep(0.1)
    _log("storaged did not answer on its control socket in time")
    return OCF_ERR_GENERIC


def stop(p: dict[str, str]) -> int:
    d = p["state_dir"]
    pid = _pid(d)
    if pid is None:
        return OCF_SUCCESS
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _pid(d) is not None:
        time.sleep(0.1)
    if _pid(d) is not None:
        _log("storaged did not stop on SIGTERM; killing it")
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    try:
        os.unlink(os.path.join(d, PIDFILE))
    except FileNotFoundError:
        pass
    return OCF_SUCCESS


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    action = argv[0] if argv else ""
    if action in ("meta-data", "metadata"):
        print(METADATA, end="")
        sys.exit(OCF_SUCCESS)
    p = _params()
    if action not in ("start", "stop", "monitor", "validate-all", "status"):
        _log(f"unimplemented action {action!r}")
        sys.exit(OCF_ERR_UNIMPLEMENTED)
    rc = validate(p)
    if action == "validate-all" or rc != OCF_SUCCESS:
        # stop and monitor of an unconfigured resource: it is not running
        if rc != OCF_SUCCESS and action in ("stop", "monitor", "status") and \
                rc == OCF_ERR_CONFIGURED and not p["state_dir"]:
            sys.exit(OCF_SUCCESS if action == "stop" else OCF_NOT_RUNNING)
        sys.exit(rc)
    sys.exit({"start": start, "stop": stop, "monitor": monitor, "status": monitor}[action](p))


if __name__ == "__main__":
    main()
