"""``storaged nfs``: NFS exports and the NFS listener (applied live when the daemon runs)."""

from __future__ import annotations

import json
from typing import Any

import click


def _run(ctx: click.Context, op: str, args: dict[str, Any] | None = None) -> Any:
    from storaged.cli.root import run_op

    return run_op(ctx, op, args)


@click.group()
def nfs() -> None:
    """NFSv3 exports (NAS)."""


@nfs.group()
def export() -> None:
    """Directories exported over NFS."""


@export.command("add")
@click.argument("path")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, metavar="ADDR|CIDR|*",
              help="Client allowed to mount (repeatable; default: everyone).")
@click.option("--ro", "read_only", is_flag=True, help="Read-only export.")
@click.option("--squash", type=click.Choice(["root", "all", "none"]), default="root",
              show_default=True, help="root_squash, all_squash or no_root_squash.")
@click.option("--anonuid", type=click.IntRange(0, 0xFFFFFFFF), default=65534,
              show_default=True, help="uid squashed users get.")
@click.option("--anongid", type=click.IntRange(0, 0xFFFFFFFF), default=65534,
              show_default=True, help="gid squashed users get.")
@click.option("--secure/--insecure", default=False, show_default=True,
              help="Require client source ports below 1024.")
@click.option("--attr-timeout", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              metavar="SECONDS", help="How long listings, and READ/WRITE replies, may reuse "
              "file attributes read earlier (0: never); storaged's own changes void them "
              "at once.")
@click.pass_context
def export_add(ctx: click.Context, path: str, directory: str, clients: tuple[str, ...],
               read_only: bool, squash: str, anonuid: int, anongid: int, secure: bool,
               attr_timeout: float) -> None:
    """Export host DIRECTORY as PATH (an existing export of PATH is updated)."""
    import os

    e = _run(ctx, "nfs_export_add", {
        "path": path, "directory": os.path.abspath(directory), "clients": list(clients) or None,
        "read_only": read_only, "squash": squash, "anonuid": anonuid, "anongid": anongid,
        "secure": secure, "attr_timeout": attr_timeout})
    click.echo(f"Exported {e['directory']} as {e['path']} to {', '.join(e['clients'])} "
               f"({e['options']}).")


@export.command("remove")
@click.argument("path")
@click.pass_context
def export_remove(ctx: click.Context, path: str) -> None:
    """Stop exporting PATH (the directory is kept)."""
    r = _run(ctx, "nfs_export_remove", {"path": path})
    click.echo(f"Removed export {r['removed']}.")


@export.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def export_ls(ctx: click.Context, as_json: bool) -> None:
    """List exports."""
    r = _run(ctx, "nfs_export_list")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    listen = r["settings"]["listen"] or "off"
    click.echo(f"NFS listener: {listen} (portmap {r['settings']['portmap']})")
    for e in r["exports"]:
        click.echo(f"{e['path']} -> {e['directory']}  {' '.join(e['clients'])}  "
                   f"({e['options']})")


@nfs.command("listen")
@click.argument("address", metavar="HOST:PORT|off")
@click.option("--portmap", type=click.Choice(["auto", "builtin", "system", "off"]),
              help="Portmapper policy (auto: serve port 111 if free, else register).")
@click.option("--grace", type=click.IntRange(0, 3600), metavar="SECONDS",
              help="NLM grace period after a restart (default 90; applies at next start).")
@click.pass_context
def listen(ctx: click.Context, address: str, portmap: str | None, grace: int | None) -> None:
    """Serve NFS on ADDRESS (port defaults to 2049); 'off' stops the NFS service."""
    s = _run(ctx, "nfs_settings_set", {"listen": "" if address == "off" else address,
                                       "portmap": portmap, "grace": grace})
    click.echo(f"NFS listener: {s['listen'] or 'off'} (portmap {s['portmap']}, "
               f"NLM grace {s['grace']} s).")


@nfs.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """NFS listener, NLM grace period, NSM state and the client hosts holding locks."""
    from storaged.cli.root import socket_path
    from storaged.control.client import call, daemon_running
    from storaged.state import Store
    from storaged.state.nsm import NsmMonitor, NsmState

    directory = ctx.find_root().obj["dir"]
    sock = socket_path(directory)
    if daemon_running(sock):
        r = call(sock, "status", {})["nfs"]
    else:
        with Store(directory) as store, store.read() as txn:
            st = txn.get(NsmState, NsmState.KEY) or NsmState()
            hosts = txn.list(NsmMonitor)
        r = {"listen": None, "nlm": {"nsm_state": st.state, "in_grace": False,
                                     "monitored": [h.host for h in hosts]}}
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    nlm = r.get("nlm", {})
    click.echo(f"NFS listener: {r.get('listen') or 'not running'}")
    click.echo(f"NSM state: {nlm.get('nsm_state')}  grace period: "
               f"{'running' if nlm.get('in_grace') else 'no'}")
    if "lock_hosts" in nlm:
        click.echo(f"hosts holding locks: {', '.join(nlm['lock_hosts']) or 'none'}")
    else:
        click.echo(f"hosts to notify at next start: {', '.join(nlm['monitored']) or 'none'}")
