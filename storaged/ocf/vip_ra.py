"""OCF 1.1 resource agent for a floating portal address managed by pacemaker
(provider ``storaged``, agent ``vip``): IPaddr2's job, plus the iSCSI portals.

For clusters where pacemaker, not storaged's own cluster, decides where an
address runs.  The address is a ``storaged vip add`` record of the state
directory (its interface, prefix and gratuitous ARP settings come from
there); the agent adds it with pyroute2 and broadcasts the gratuitous ARPs
(:mod:`storaged.vip.net`), and tells the running daemon (``vip_sync``) to
open the portals on it; stop removes it and the daemon closes the portals
and ends the sessions on it.  A state directory with a storaged cluster
configured is refused: its cluster already manages the addresses, and two
managers of one address is how it ends up on two nodes.
"""

from __future__ import annotations

import os
import sys
import time

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_PERM, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 4, 5, 6, 7

METADATA = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="vip" version="1.0">
<version>1.1</version>
<longdesc lang="en">
Adds a floating portal address (a 'storaged vip add' record of the state
directory) to its interface, sends gratuitous ARPs, and has the storaged
daemon serve the iSCSI portals on it; stop removes the address and the
daemon ends the sessions on it. For pacemaker-managed clusters: a state
directory whose storaged cluster manages addresses itself is refused.
</longdesc>
<shortdesc lang="en">storaged floating portal address</shortdesc>
<parameters>
<parameter name="state_dir" required="1">
<longdesc lang="en">State directory of the storaged daemon holding the record.</longdesc>
<shortdesc lang="en">State directory</shortdesc>
<content type="string" />
</parameter>
<parameter name="address" unique="1" required="1">
<longdesc lang="en">The floating IPv4 address, as given to storaged vip add
(the prefix may be left out).</longdesc>
<shortdesc lang="en">Address</shortdesc>
<content type="string" />
</parameter>
</parameters>
<actions>
<action name="start" timeout="20s" />
<action name="stop" timeout="20s" />
<action name="monitor" timeout="20s" interval="10s" depth="0" />
<action name="meta-data" timeout="5s" />
<action name="validate-all" timeout="20s" />
</actions>
</resource-agent>
"""


def _log(msg: str) -> None:
    print(f"storaged OCF vip: {msg}", file=sys.stderr)


def _params() -> dict[str, str]:
    return {"state_dir": os.environ.get("OCF_RESKEY_state_dir", ""),
            "address": os.environ.get("OCF_RESKEY_address", "").split("/", 1)[0].strip()}


def _record(p: dict[str, str]):  # noqa: ANN202 - FloatingAddress, or an OCF code
    """The address's record, or the OCF code saying what is wrong."""
    try:
        from storaged.cluster.config import ClusterConfig
        from storaged.state import Store
        from storaged.vip.records import FloatingAddress
    except ImportError:
        _log("the storaged package is not importable by this Python")
        return OCF_ERR_INSTALLED
    d = p["state_dir"]
    if not d or not os.path.isabs(d):
        _log(f"state_dir must be an absolute path, got {d!r}")
        return OCF_ERR_CONFIGURED
    if not p["address"]:
        _log("address is required")
        return OCF_ERR_CONFIGURED
    if not os.path.isdir(d):
        _log(f"state_dir {d} does not exist")
        return OCF_ERR_CONFIGURED
    try:
        with Store(d) as store, store.read() as txn:
            vip = txn.get(FloatingAddress, p["address"])
            cluster = txn.get(ClusterConfig, ClusterConfig.KEY)
    except Exception as e:  # noqa: BLE001 - an unreadable store is a config error
        _log(f"cannot read the state store in {d}: {e}")
        return OCF_ERR_CONFIGURED
    if vip is None:
        _log(f"no floating address {p['address']} in {d} (storaged vip add ADDRESS/PREFIX "
             "--dev IFACE)")
        return OCF_ERR_CONFIGURED
    if cluster is not None:
        _log(f"{d} has a storaged cluster ({cluster.name}): it manages the floating addresses "
             "itself; do not also run ocf:storaged:vip")
        return OCF_ERR_CONFIGURED
    return vip


def _sync(p: dict[str, str]) -> int:
    """Ask the daemon (if it runs) to follow the interface now."""
    from storaged.control.client import call, daemon_running

    sock = os.path.join(p["state_dir"], "control.sock")
    if not daemon_running(sock):
        return OCF_SUCCESS    # it follows the interface when it starts
    try:
        call(sock, "vip_sync", {}, timeout=10)
    except Exception as e:  # noqa: BLE001 - reported as a generic failure
        _log(f"the daemon could not open or close the portals: {e}")
        return OCF_ERR_GENERIC
    return OCF_SUCCESS


def monitor(p: dict[str, str], vip) -> int:  # noqa: ANN001
    from storaged.vip import net

    return OCF_SUCCESS if net.has_address(vip.dev, vip.ip) else OCF_NOT_RUNNING


def start(p: dict[str, str], vip) -> int:  # noqa: ANN001
    from storaged.vip import net

    try:
        net.add_address(vip.dev, vip.ip, vip.prefixlen)
        rc = _sync(p)
        for i in range(vip.garp_count):
            if i:
                time.sleep(vip.garp_interval_ms / 1000)
            net.send_garp(vip.dev, vip.ip)
    except net.NetError as e:
        _log(str(e))
        return OCF_ERR_GENERIC
    return rc


def stop(p: dict[str, str], vip) -> int:  # noqa: ANN001
    from storaged.vip import net

    try:
        net.remove_address(vip.dev, vip.ip, vip.prefixlen)
    except net.NetError as e:
        _log(str(e))
        return OCF_ERR_GENERIC
    return _sync(p)


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
    vip = _record(p)
    if isinstance(vip, int):
        # stop/monitor of a resource that cannot be configured here: it is not running
        if action == "stop":
            sys.exit(OCF_SUCCESS)
        sys.exit(OCF_NOT_RUNNING if action in ("monitor", "status") else vip)
    if action == "validate-all":
        sys.exit(OCF_SUCCESS)
    sys.exit({"start": start, "stop": stop, "monitor": monitor, "status": monitor}[action](p, vip))


if __name__ == "__main__":
    main()
