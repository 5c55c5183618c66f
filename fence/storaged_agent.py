"""``fence_storaged``: fabric fencing of a cluster node on storaged storage nodes.

For the node named by ``plug`` (a cluster node name, mapped on each storage
node to its initiator IQNs and PR keys with ``storaged fence map``):

* ``off`` cuts it off every storage node in ``ip`` (comma-separated, each
  ``host`` or ``host:port``): PR registrations preempted with its tasks
  aborted, sessions dropped, logins refused.  All storage nodes must
  succeed, else the fence failed (exit 1) and pacemaker retries;
* ``on`` (unfencing, automatic on rejoin) gives access back;
* ``status``: exit 0 when it has access, 2 when fenced (fenced on every
  storage node; fenced on only some is not safe, so it reports ON);
* ``list``/``list-status``, ``monitor`` (every storage node answers and the
  credentials work), ``metadata``, ``manpage``, ``validate-all``.

Exit codes and messages follow fence-agents' fencing.py: 0 success, 1 any
failure (the message says which: "Connection timed out", "Unable to
connect/login to fencing device", "Failed: Unable to obtain correct plug
status or plug is not available"...), 2 for ``status`` of a fenced node.

How the agent reaches the storage is a ``--method``: ``endpoint`` (the
storage node's authenticated management endpoint) or ``pr`` (fence_scsi's
persistent reservation fencing on the ``devices``, iscsi:// URLs, through
storaged's own initiator: :mod:`fence.pr_method`).  A method is a class
with ``off``/``on``/``status``/``list``/``ping`` (see :class:`Method`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
import time
from typing import Protocol

from fence.metadata import Action, manpage, metadata
from fence.options import Opt, UsageError, check_types, parse

NAME = "fence_storaged"
SHORTDESC = "Fence agent for storaged storage nodes (SAN-level access revocation)"
LONGDESC = (
    "fence_storaged is an I/O fencing agent that cuts a cluster node off the shared storage "
    "served by one or more storaged storage nodes. The node to fence (plug) is a cluster node "
    "name that each storage node maps to the node's iSCSI initiator names and SCSI-3 "
    "persistent reservation keys ('storaged fence map'). Fencing (off) removes the node's "
    "reservation keys as PREEMPT AND ABORT does (its in-flight commands are aborted), drops "
    "its iSCSI sessions and refuses its logins on every storage node listed in ip; all of "
    "them must succeed. Unfencing (on) gives access back. The agent talks to the storage "
    "nodes' authenticated management endpoint ('storaged mgmt listen').")
DEFAULT_PORT = "3261"

EC_OK, EC_GENERIC_ERROR, EC_STATUS_OFF = 0, 1, 2
MSG_LOGIN = "Unable to connect/login to fencing device"
MSG_LOST = "Connection lost"
MSG_TIMEOUT = "Connection timed out"
MSG_WAITING_ON = "Failed: Timed out waiting to power ON"
MSG_WAITING_OFF = "Failed: Timed out waiting to power OFF"
MSG_STATUS = "Failed: Unable to obtain correct plug status or plug is not available"
MSG_PASSWORD = "Failed: You have to set login password"

log = logging.getLogger("fence")

OPTS: list[Opt] = [
    Opt("action", "action", "o", "action", default="off", required=True,
        desc="Fencing action"),
    Opt("ip", "ip", "a", "ip", required=True, obsoletes="ipaddr",
        desc="IP address or hostname of the storage node(s): a comma-separated list, each "
             "host or host:port (all must succeed for off)"),
    Opt("ipport", "ipport", "u", "port", type="integer", default=DEFAULT_PORT,
        desc="TCP port of the storage nodes' management endpoint"),
    Opt("method", "method", "m", "method", type="select", default="endpoint",
        choices=("endpoint", "pr"),
        desc="How to fence: endpoint = through the storage nodes' management endpoint; "
             "pr = SCSI-3 persistent reservations on the devices, as fence_scsi does, "
             "through storaged's own initiator"),
    Opt("devices", "devices", "d", "devices",
        desc="method=pr: comma-separated iscsi:// URLs of the shared LUNs"),
    Opt("key", "key", "k", "key",
        desc="method=pr: key to use for the current operation (hex); for on, the key "
             "registering the local node; for off, the key to remove (default: derived "
             "from cluster_name and the plug, as fence_scsi derives it)"),
    Opt("key_value", "key-value", arg="<id|hash>", type="select", default="id",
        choices=("id", "hash"),
        desc="method=pr: derive keys from the node id (id) or from a hash of the node "
             "name (hash), as fence_scsi's key_value"),
    Opt("cluster_name", "cluster-name", arg="name",
        desc="method=pr: cluster name the keys are derived from (corosync "
             "totem.cluster_name for fence_scsi)"),
    Opt("node_ids", "node-ids", arg="name=id,...",
        desc="method=pr: node ids of node names (the corosync nodelist for fence_scsi); "
             "a numeric plug is its own id"),
    Opt("local_node", "local-node", arg="name",
        desc="method=pr: the node this agent runs on (its key preempts others); default: "
             "the key saved by unfencing in key_file"),
    Opt("key_file", "key-file", arg="path", default="/var/run/cluster/fence_storaged.key",
        desc="method=pr: where unfencing saves this host's key"),
    Opt("password", "password", "p", "password", obsoletes="passwd",
        desc="Login password or passphrase"),
    Opt("password_script", "password-script", "S", "script", obsoletes="passwd_script",
        desc="Script to run to retrieve password"),
    Opt("plug", "plug", "n", "nodename", required=True, obsoletes="port",
        desc="Name of the cluster node to fence, as mapped on the storage nodes"),
    Opt("ssl", "ssl", "z", desc="Use SSL connection with verifying certificate",
        type="boolean"),
    Opt("ssl_insecure", "ssl-insecure", type="boolean",
        desc="Use SSL connection without verifying certificate"),
    Opt("ssl_secure", "ssl-secure", type="boolean",
        desc="Use SSL connection with verifying certificate"),
    Opt("username", "username", "l", "name", required=True, obsoletes="login",
        desc="Login name"),
    Opt("quiet", "quiet", "q", type="boolean",
        desc="Disable logging to stderr. Does not affect --verbose or --debug-file or "
             "logging to syslog."),
    Opt("verbose", "verbose", "v", type="boolean", desc="Verbose mode. Multiple -v flags "
        "can be stacked on the command line (e.g., -vvv) to increase verbosity."),
    Opt("verbose_level", "verbose-level", type="integer",
        desc="Level of debugging detail in output. Defaults to the number of --verbose "
             "flags specified on the command line, or to 1 if verbose=1 in a stonith "
             "device configuration (i.e., on stdin)."),
    Opt("debug_file", "debug-file", "D", "debugfile", obsoletes="debug",
        desc="Write debug information to given file"),
    Opt("version", "version", "V", type="boolean", desc="Display version information and exit"),
    Opt("help", "help", "h", type="boolean", desc="Display help and exit"),
    Opt("plug_separator", "plug-separator", arg="char", default=",",
        desc="Separator for plug parameter when specifying more than 1 plug"),
    Opt("separator", "separator", "C", "char", default=",",
        desc="Separator for CSV created by 'list' operation"),
    Opt("delay", "delay", arg="seconds", type="second", default="0",
        desc="Wait X seconds before fencing is started"),
    Opt("disable_timeout", "disable-timeout", arg="true/false",
        desc="Disable timeout (true/false) (default: true when run from Pacemaker 2.0+)"),
    Opt("login_timeout", "login-timeout", arg="seconds", type="second", default="5",
        desc="Wait X seconds for cmd prompt after login"),
    Opt("power_timeout", "power-timeout", arg="seconds", type="second", default="20",
        desc="Test X seconds for status change after ON/OFF"),
    Opt("power_wait", "power-wait", arg="seconds", type="second", default="0",
        desc="Wait X seconds after issuing ON/OFF"),
    Opt("shell_timeout", "shell-timeout", arg="seconds", type="second", default="3",
        desc="Wait X seconds for cmd prompt after issuing command"),
    Opt("stonith_status_sleep", "stonith-status-sleep", arg="seconds", type="second",
        default="1", desc="Sleep X seconds between status calls during a STONITH action"),
    Opt("retry_on", "retry-on", arg="attempts", type="integer", default="1",
        desc="Count of attempts to retry power on"),
]
# the getopt text of flags in fencing.py has no [arg]; "verbose_level" shows none either
ACTIONS = [Action("on", "20s", on_target=True, automatic=True), Action("off", "20s"),
           Action("status", "20s"), Action("list", "20s"), Action("list-status", "20s"),
           Action("monitor", "20s"), Action("metadata", "5s"), Action("manpage", "5s"),
           Action("validate-all", "5s")]
ACTION_NAMES = {a.name for a in ACTIONS}


class AgentFailure(Exception):
    """Fencing failed; the message is one of fence-agents' (``MSG_*``) or says why."""


class Method(Protocol):
    """How fence_storaged reaches one storage node (one instance per node)."""

    def ping(self) -> None: ...
    def off(self, node: str) -> None: ...
    def on(self, node: str) -> None: ...
    def status(self, node: str) -> bool: ...          # True = node is fenced here
    def list(self) -> dict[str, bool]: ...            # node name -> fenced
    def close(self) -> None: ...


class EndpointMethod:
    """The storage node's management endpoint (storaged.control.mgmt_server)."""

    def __init__(self, host: str, port: int, opts: dict[str, str], password: str) -> None:
        from fence.client import AuthFailed, Endpoint, EndpointError, OpFailed

        self._errors = (EndpointError, OpFailed)
        self._op_failed = OpFailed
        use_ssl = any(opts.get(k) == "1" for k in ("ssl", "ssl_secure", "ssl_insecure"))
        insecure = opts.get("ssl_insecure") == "1"
        self.timeout = float(opts["power_timeout"])
        try:
            self.ep = Endpoint(host, port, opts["username"], password, use_ssl=use_ssl,
                               ssl_insecure=insecure,
                               timeout=float(opts["login_timeout"]) +
                               float(opts["shell_timeout"]))
        except AuthFailed as e:
            log.error("%s", e)
            raise AgentFailure(MSG_LOGIN) from None
        except EndpointError as e:
            log.error("%s", e)
            raise AgentFailure(MSG_TIMEOUT if "timed out" in str(e) else MSG_LOGIN) from None
        self.ep.sock.settimeout(self.timeout)

    def _call(self, op: str, args: dict | None = None) -> dict:
        from fence.client import EndpointError, OpFailed

        try:
            return self.ep.call(op, args)
        except OpFailed as e:
            log.error("%s", e)
            raise AgentFailure(MSG_STATUS if "unknown node" in str(e) else str(e)) from None
        except EndpointError as e:
            log.error("%s", e)
            raise AgentFailure(MSG_TIMEOUT if "timed out" in str(e) else MSG_LOST) from None

    def ping(self) -> None:
        self._call("ping")

    def off(self, node: str) -> None:
        self._call("fence_off", {"node": node})

    def on(self, node: str) -> None:
        self._call("fence_on", {"node": node})

    def status(self, node: str) -> bool:
        return bool(self._call("fence_status", {"node": node})["fenced"])

    def list(self) -> dict[str, bool]:
        return {n["node"]: n["fenced"] for n in self._call("fence_ls")["nodes"]}

    def close(self) -> None:
        self.ep.close()


METHODS = {"endpoint": EndpointMethod}


def storage_nodes(opts: dict[str, str]) -> list[tuple[str, int]]:
    """``ip`` as (host, port) pairs: ``a,b:4000,[::1]:5000`` (default port ``ipport``)."""
    out = []
    for item in (s.strip() for s in opts["ip"].split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else opts["ipport"]
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host, port = item, opts["ipport"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"Failed: invalid port in ip {item!r}")
        out.append((host, int(port)))
    if not out:
        raise UsageError("Failed: You have to enter fence address")
    return out


def password(opts: dict[str, str]) -> str:
    """The password, from ``password`` or the first line of ``password_script``'s output."""
    if opts.get("password_script"):
        try:
            r = subprocess.run(opts["password_script"], shell=True, capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AgentFailure(f"Failed: password script failed: {e}") from None
        if r.returncode != 0:
            raise AgentFailure(f"Failed: password script exited with {r.returncode}")
        return r.stdout.splitlines()[0] if r.stdout else ""
    if "password" in opts:
        return opts["password"]
    raise AgentFailure(MSG_PASSWORD)


def validate(opts: dict[str, str]) -> list[str]:
    """Every problem with the options for their action (validate-all's check)."""
    errors = check_types(OPTS, opts)
    action = opts["action"]
    if action not in ACTION_NAMES:
        errors.append(f"Failed: Unrecognised action '{action}'")
    if opts.get("method") == "pr":
        from fence.pr_method import problems
        errors += problems(opts)
    else:
        if "ip" not in opts or not opts["ip"].strip():
            errors.append("Failed: You have to enter fence address")
        if "username" not in opts:
            errors.append("Failed: You have to set login name")
        if "password" not in opts and "password_script" not in opts:
            errors.append(MSG_PASSWORD)
    if action in ("on", "off", "status") and not opts.get("plug"):
        errors.append("Failed: You have to enter plug number or machine identification")
    if "ip" in opts and opts.get("method") != "pr" and not errors:
        try:
            storage_nodes(opts)
        except UsageError as e:
            errors.append(str(e))
    return errors


def _setup_logging(opts: dict[str, str]) -> None:
    root = logging.getLogger()
    verbose = opts.get("verbose") == "1" or opts.get("verbose_level", "0") not in ("", "0")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)-15s %(levelname)s: %(message)s")
    if opts.get("quiet") != "1":
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)
        root.addHandler(h)
    if os.path.exists("/dev/log"):
        try:
            s = logging.handlers.SysLogHandler(address="/dev/log")
            s.setFormatter(logging.Formatter(f"{NAME}: %(levelname)s: %(message)s"))
            s.setLevel(logging.WARNING)
            root.addHandler(s)
        except OSError:
            pass
    if opts.get("debug_file"):
        try:
            f = logging.FileHandler(opts["debug_file"])
            f.setFormatter(fmt)
            f.setLevel(logging.DEBUG)
            root.addHandler(f)
        except OSError:
            log.error("Unable to create file %s", opts["debug_file"])


def _connect(opts: dict[str, str]) -> list[Method]:
    if opts["method"] == "pr":
        from fence.pr_method import PrMethod
        return [PrMethod(opts, AgentFailure)]
    pw = password(opts)
    cls = METHODS[opts["method"]]
    out: list[Method] = []
    try:
        for host, port in storage_nodes(opts):
            log.debug("connecting to storage node %s:%d", host, port)
            out.append(cls(host, port, opts, pw))
    except BaseException:
        for m in out:
            m.close()
        raise
    return out


def run(opts: dict[str, str]) -> int:
    """Carry out ``opts['action']`` (already validated); the exit code."""
    action = opts["action"]
    methods = _connect(opts)
    try:
        plugs = [p for p in opts.get("plug", "").split(opts["plug_separator"]) if p]
        if action == "monitor":
            for m in methods:
                m.ping()
            return EC_OK
        if action in ("list", "list-status"):
            nodes: dict[str, bool] = {}
            for m in methods:
                for node, fenced in m.list().items():
                    nodes[node] = nodes.get(node, True) and fenced
            sep = opts["separator"]
            for node, fenced in sorted(nodes.items()):
                print(f"{node}{sep}{node}" + (f"{sep}{'OFF' if fenced else 'ON'}"
                                              if action == "list-status" else ""))
            return EC_OK

        def fenced_everywhere() -> bool:
            return all(m.status(p) for m in methods for p in plugs)

        def fenced_nowhere() -> bool:
            return not any(m.status(p) for m in methods for p in plugs)

        if action == "status":
            off = fenced_everywhere()
            print(f"Status: {'OFF' if off else 'ON'}")
            return EC_STATUS_OFF if off else EC_OK
        if action == "off" and fenced_everywhere():
            print("Success: Already OFF")
            return EC_OK
        if action == "on" and fenced_nowhere():
            print("Success: Already ON")
            return EC_OK
        if action == "off":
            delay = float(opts["delay"])
            if delay > 0:
                log.info("Delay %s second(s) before logging in to the fence device", delay)
                time.sleep(delay)
        for m in methods:
            for p in plugs:
                m.off(p) if action == "off" else m.on(p)
        time.sleep(float(opts["power_wait"]))
        if action == "off":
            if not fenced_everywhere():
                raise AgentFailure(MSG_WAITING_OFF)
            print("Success: Powered OFF")
        else:
            if not fenced_nowhere():
                raise AgentFailure(MSG_WAITING_ON)
            print("Success: Powered ON")
        return EC_OK
    finally:
        for m in methods:
            m.close()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; exits with the fence-agents exit code."""
    sys.exit(_main(argv))


def _main(argv: list[str] | None) -> int:
    try:
        opts = parse(OPTS, argv)
    except UsageError as e:
        logging.basicConfig(format="%(asctime)-15s %(levelname)s: %(message)s")
        log.error("%s", e)
        log.error("Please use '-h' for usage")
        return EC_GENERIC_ERROR
    action = opts["action"] = opts["action"].lower()
    action = opts["action"] = {"meta-data": "metadata", "enable": "on",
                               "disable": "off"}.get(action, action)
    if opts.get("help") == "1":
        print(f"Usage:\n\t{NAME} [options]\nOptions:")
        for o in OPTS:
            print(f"   {o.getopt_text():<40} {o.desc}")
        return EC_OK
    if opts.get("version") == "1":
        from storaged import __version__
        print(__version__)
        return EC_OK
    if action == "metadata":
        print(metadata(NAME, SHORTDESC, LONGDESC, OPTS, ACTIONS), end="")
        return EC_OK
    if action == "manpage":
        print(manpage(NAME, SHORTDESC, LONGDESC, OPTS, ACTIONS), end="")
        return EC_OK
    _setup_logging(opts)
    errors = validate(opts)
    if action == "validate-all":
        for e in errors:
            log.error("%s", e)
        if errors:
            log.error("validate-all failed")
            return EC_GENERIC_ERROR
        return EC_OK
    if errors:
        for e in errors:
            log.error("%s", e)
        log.error("Please use '-h' for usage")
        return EC_GENERIC_ERROR
    try:
        return run(opts)
    except AgentFailure as e:
        log.error("%s", e)
        return EC_GENERIC_ERROR
    except UsageError as e:
        log.error("%s", e)
        return EC_GENERIC_ERROR


if __name__ == "__main__":
    main()
