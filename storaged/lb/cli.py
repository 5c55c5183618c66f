"""``storaged lb``: ipvsadm's command line for iSCSI login balancing.

The options are ipvsadm's (``-A -t VIP:3260 -s wlc -p 300``, ``-a -t VIP
-r NODE:3260 -w 2 -x 100 -y 80``, ``-L -n``, ``-S``, ``-R``, ``-C``) so an
LVS admin knows them; each command runs one control operation of
:mod:`storaged.lb.ops`, live through the daemon or offline on the store.
``-S`` prints the rules in the form ``-R`` reads back, as ``ipvsadm-save``.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from storaged.cli.root import fail, run_op, socket_path
from storaged.lb.sched import DEFAULT_PERSISTENCE

_COMMANDS = {
    "add_service": "-A", "edit_service": "-E", "delete_service": "-D",
    "add_real": "-a", "edit_real": "-e", "delete_real": "-d",
    "list": "-L", "save": "-S", "restore": "-R", "clear": "-C",
}


def _service_line(s: dict[str, Any]) -> str:
    out = f"-A -t {s['vip']} -s {s['scheduler']}"
    if s["flags"]:
        out += f" -b {','.join(s['flags'])}"
    if s["persistent"]:
        out += f" -p {s['persistent']}"
        if s["netmask"] != "255.255.255.255":
            out += f" -M {s['netmask']}"
        if s["pe"]:
            out += f" --pe {s['pe']}"
    if s.get("redirect", "temporary") != "temporary":
        out += f" --redirect {s['redirect']}"
    return out


def _real_line(s: dict[str, Any], r: dict[str, Any]) -> str:
    out = f"-a -t {s['vip']} -r {r['portal']} -w {r['weight']}"
    if r["upper"]:
        out += f" -x {r['upper']}"
    if r["lower"]:
        out += f" -y {r['lower']}"
    return out


def _live_raw(ctx: click.Context) -> dict[str, Any] | None:
    """The daemon's ``lb_live`` answer (None: no daemon running)."""
    from storaged.control.client import call, daemon_running
    from storaged.control.ops import ConfigError

    sock = socket_path(ctx.find_root().obj["dir"])
    if not daemon_running(sock):
        return None
    try:
        return call(sock, "lb_live", {})
    except ConfigError as e:
        fail(str(e))


def _live(ctx: click.Context) -> dict[str, dict[str, dict[str, Any]]] | None:
    """The daemon's live counts per service and real server (None: no daemon)."""
    live = _live_raw(ctx)
    if live is None:
        return None
    return {g["vip"]: g["reals"] for g in live["services"]}


def _connections(ctx: click.Context, vip: str | None, as_json: bool) -> None:
    """``-L -c``: pending redirects and persistence templates, as ipvsadm lists
    its connection entries (expire mm:ss, state, source, virtual, destination)."""
    live = _live_raw(ctx)
    entries = [] if live is None else [e for e in live["connections"]
                                       if vip is None or e["vip"] == vip]
    if as_json:
        click.echo(json.dumps({"live": live is not None, "connections": entries}, indent=2))
        return
    click.echo("storaged login balancer entries")
    click.echo("pro expire state      source                   virtual              "
               "destination")
    for e in entries:
        m, sec = divmod(int(e["expires"]), 60)
        click.echo(f"TCP {m:02d}:{sec:02d}  {e['state']:<10} {e['source']:<24} "
                   f"{e['vip']:<20} {e['real']}"
                   + (f"  {e['initiator']}" if e["initiator"] else ""))
    if live is None:
        click.echo("(daemon not running: no entries)")


def _merge(services: list[dict[str, Any]],
           live: dict[str, dict[str, dict[str, Any]]] | None) -> None:
    """Put each real server's live counters (zeros without a daemon) into it."""
    for s in services:
        for r in s["reals"]:
            got = (live or {}).get(s["vip"], {}).get(r["portal"], {})
            r["up"] = got.get("up", True)
            for key in ("active", "inactive", "redirects", "logins"):
                r[key] = got.get(key, 0)


def _list(services: list[dict[str, Any]], mode: str, live: bool) -> None:
    """ipvsadm -L -n's layout; the forwarding column says "Redir" (login redirect).

    ActiveConn counts logged-in sessions on this node's portals, InActConn
    redirects not yet logged in (see storaged.lb.director); a real server
    whose health check fails is marked "down" (its weight counts as 0)."""
    click.echo("storaged login balancer (ipvsadm semantics)")
    click.echo("Prot LocalAddress:Port Scheduler Flags")
    if mode == "stats":
        click.echo("  -> RemoteAddress:Port               Logins   Redirects")
    else:
        click.echo("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn")
    for s in services:
        line = f"TCP  {s['vip']} {s['scheduler']}"
        if s["flags"]:
            line += f" ({','.join(s['flags'])})"
        if s["persistent"]:
            line += f" persistent {s['persistent']}"
            if s["netmask"] != "255.255.255.255":
                line += f" mask {s['netmask']}"
            if s["pe"]:
                line += f" pe {s['pe']}"
        if s.get("redirect", "temporary") != "temporary":
            line += f" redirect {s['redirect']}"
        click.echo(line)
        for r in reversed(s["reals"]):  # the kernel's list order: newest first
            down = "" if r["up"] else "  down"
            if mode == "stats":
                click.echo(f"  -> {r['portal']:<32} {r['logins']:<8} {r['redirects']}{down}")
            else:
                click.echo(f"  -> {r['portal']:<28} Redir   {r['weight']:<6} "
                           f"{r['active']:<10} {r['inactive']}{down}")
    if not live:
        click.echo("(daemon not running: no live counts)")


def _parse_restore(text: str) -> list[dict[str, Any]]:
    """Lines of ``-S`` output -> service dicts for lb_restore."""
    services: dict[str, dict[str, Any]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            args = _rule.make_context("restore", shlex.split(line), resilient_parsing=False)
        except click.ClickException as e:
            fail(f"line {n}: {e.format_message()}")
        p = args.params
        vip = p["tcp_service"]
        if not vip:
            fail(f"line {n}: -t VIP:PORT is required")
        if p["add_service"]:
            services[vip] = {"vip": vip, "scheduler": p["scheduler"] or "wlc",
                             "flags": _flags(p["sched_flags"]),
                             "persistent": p["persistent"] or 0,
                             "netmask": p["netmask"] or "255.255.255.255",
                             "pe": p["pe"] or "", "reals": [],
                             "redirect": p["redirect"] or "temporary"}
        elif p["add_real"]:
            if vip not in services:
                fail(f"line {n}: real server for {vip} before its -A line")
            services[vip]["reals"].append({"portal": p["real_server"], "weight":
                                           1 if p["weight"] is None else p["weight"],
                                           "upper": p["upper"] or 0, "lower": p["lower"] or 0})
        else:
            fail(f"line {n}: only -A and -a lines can be restored")
    return list(services.values())


def _normalize_vip(vip: str) -> str:
    from storaged.state.errors import ValidationError
    from storaged.state.validate import normalize_portal

    try:
        return normalize_portal(vip)
    except ValidationError as e:
        fail(str(e))


def _flags(value: str | None) -> list[str]:
    return [f for f in (value or "").split(",") if f]


def _options(fn: Any) -> Any:
    opts = [
        click.option("-A", "--add-service", is_flag=True, help="Add a virtual service."),
        click.option("-E", "--edit-service", is_flag=True, help="Edit a virtual service."),
        click.option("-D", "--delete-service", is_flag=True, help="Delete a virtual service."),
        click.option("-C", "--clear", is_flag=True, help="Clear the whole table."),
        click.option("-R", "--restore", is_flag=True, help="Restore rules from stdin."),
        click.option("-S", "--save", is_flag=True, help="Save rules to stdout."),
        click.option("-a", "--add-server", "add_real", is_flag=True, help="Add a real server."),
        click.option("-e", "--edit-server", "edit_real", is_flag=True,
                     help="Edit a real server."),
        click.option("-d", "--delete-server", "delete_real", is_flag=True,
                     help="Delete a real server."),
        click.option("-L", "-l", "--list", "list_", is_flag=True, help="List the table."),
        click.option("-t", "--tcp-service", metavar="VIP:PORT",
                     help="The virtual service (group portal)."),
        click.option("-s", "--scheduler", metavar="SCHEDULER",
                     help="rr|wrr|lc|wlc|sed|nq|sh|dh|lblc|lblcr (default wlc)."),
        click.option("-b", "--sched-flags", metavar="FLAGS", help="sh-fallback,sh-port"),
        click.option("-p", "--persistent", type=int, is_flag=False,
                     flag_value=DEFAULT_PERSISTENCE, metavar="[TIMEOUT]",
                     help="Persistent service (default timeout 300 s)."),
        click.option("-M", "--netmask", metavar="NETMASK",
                     help="Persistence granularity mask (initiator addresses)."),
        click.option("--pe", metavar="ENGINE", help="Persistence engine: iqn (initiator name)."),
        click.option("-r", "--real-server", metavar="NODE:PORT", help="A node's portal."),
        click.option("-w", "--weight", type=int, help="Weight (0 = quiesced)."),
        click.option("-x", "--u-threshold", "upper", type=int,
                     help="Upper connection threshold."),
        click.option("-y", "--l-threshold", "lower", type=int,
                     help="Lower connection threshold."),
        click.option("-n", "--numeric", is_flag=True, help="Numeric output (always)."),
        click.option("-c", "--connection", is_flag=True,
                     help="-L: list pending redirects and persistence templates."),
        click.option("--stats", is_flag=True, help="List with statistics."),
        click.option("--rate", is_flag=True, help="List with rates."),
        click.option("--redirect", type=click.Choice(["temporary", "permanent"]),
                     help="Login status of the redirects: temporary 0x0101 (default) "
                          "or permanent 0x0102."),
        click.option("--json", "as_json", is_flag=True, help="-L: machine-readable output."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.command("rule", add_help_option=False)
@_options
def _rule(**_: Any) -> None:
    """Parser for one saved line (used by -R)."""


@click.command("lb", context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.pass_context
def lb(ctx: click.Context, **p: Any) -> None:
    """Login balancing with ipvsadm's options: a virtual service (-t VIP:PORT)
    redirects normal-session logins to real servers (-r NODE:PORT)."""
    chosen = [k for k in ("add_service", "edit_service", "delete_service", "clear", "restore",
                          "save", "add_real", "edit_real", "delete_real", "list_") if p[k]]
    if len(chosen) > 1:
        raise click.UsageError("only one command (-A -E -D -C -R -S -a -e -d -L) at a time")
    cmd = chosen[0] if chosen else "list_"
    vip = p["tcp_service"]
    if cmd in ("add_service", "edit_service", "delete_service", "add_real", "edit_real",
               "delete_real") and not vip:
        raise click.UsageError("-t VIP:PORT is required")
    if cmd in ("add_real", "edit_real", "delete_real") and not p["real_server"]:
        raise click.UsageError("-r NODE:PORT is required")
    if cmd == "add_service":
        run_op(ctx, "lb_add_service", {
            "vip": vip, "scheduler": p["scheduler"] or "wlc",
            "persistent": p["persistent"] or 0,
            "netmask": p["netmask"] or "255.255.255.255", "pe": p["pe"] or "",
            "flags": _flags(p["sched_flags"]), "redirect": p["redirect"] or "temporary"})
    elif cmd == "edit_service":
        args: dict[str, Any] = {"vip": vip}
        for key, name in (("scheduler", "scheduler"), ("persistent", "persistent"),
                          ("netmask", "netmask"), ("pe", "pe"), ("redirect", "redirect")):
            if p[key] is not None:
                args[name] = p[key]
        if p["sched_flags"] is not None:
            args["flags"] = _flags(p["sched_flags"])
        run_op(ctx, "lb_edit_service", args)
    elif cmd == "delete_service":
        run_op(ctx, "lb_delete_service", {"vip": vip})
    elif cmd in ("add_real", "edit_real"):
        args = {"vip": vip, "real": p["real_server"]}
        for key in ("weight", "upper", "lower"):
            if p[key] is not None:
                args[key] = p[key]
        run_op(ctx, f"lb_{cmd}", args)
    elif cmd == "delete_real":
        run_op(ctx, "lb_delete_real", {"vip": vip, "real": p["real_server"]})
    elif cmd == "clear":
        run_op(ctx, "lb_clear")
    elif cmd == "restore":
        run_op(ctx, "lb_restore", {"services": _parse_restore(sys.stdin.read())})
    elif cmd == "save":
        for s in run_op(ctx, "lb_list")["services"]:
            click.echo(_service_line(s))
            for r in s["reals"]:
                click.echo(_real_line(s, r))
    else:
        if p["connection"]:
            _connections(ctx, _normalize_vip(vip) if vip else None, p["as_json"])
            return
        res = run_op(ctx, "lb_list", {"vip": vip} if vip else {})
        live = _live(ctx)
        _merge(res["services"], live)
        if p["as_json"]:
            click.echo(json.dumps({"live": live is not None, **res}, indent=2))
            return
        _list(res["services"], "stats" if p["stats"] or p["rate"] else "plain", live is not None)
