"""``storaged alua``: target port groups for ALUA (SPC-4 §5.16).

Group 1 always exists and holds every local target port not listed in
another group.  A typical HA pair: on each node group 1 holds the local
ports, and a ``--remote`` group lists the peer's ports (``<iqn>,<tpgt>``)
with the state the peer serves them in.
"""

from __future__ import annotations

import json
from typing import Any

import click

from storaged.cli.root import run_op

STATE_HELP = ("active/optimized (ao), active/non-optimized (ano), standby, unavailable, "
              "offline, transitioning")


@click.group()
def alua() -> None:
    """ALUA target port groups (asymmetric access states for multipath)."""


@alua.group()
def group() -> None:
    """Create, change and remove target port groups."""


def _line(g: dict[str, Any]) -> str:
    flags = [f for f, on in (("preferred", g["preferred"]), ("remote", g["remote"]),
                             ("implicit-only", not g["explicit"])) if on]
    ports = ", ".join(g["ports"]) or ("(every local port not in another group)"
                                      if g["id"] == 1 else "(none)")
    extra = f"  transition {g['transition_time']}s" if g.get("transition_time") else ""
    status = f"  [{g['status']}]" if g.get("status", "none") != "none" else ""
    rel = g.get("relative_port_ids")
    rel_text = f"  relative ports {rel}" if rel is not None else ""
    return (f"group {g['id']}: {g['state']}{' ' + ' '.join(flags) if flags else ''}"
            f"{extra}{status}\n  ports: {ports}{rel_text}")


@alua.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def alua_ls(ctx: click.Context, as_json: bool) -> None:
    """Show the groups: live states from the daemon, else the stored config."""
    r = run_op(ctx, "alua_ls")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for g in r["groups"]:
        click.echo(_line(g))
    if not r["live"]:
        click.echo("(daemon not running: configured states)")


group.add_command(alua_ls, "ls")


@group.command("create")
@click.argument("group_id", metavar="ID", type=click.IntRange(2, 65535))
@click.option("--state", default="active/optimized", show_default=True, help=STATE_HELP)
@click.option("--preferred", is_flag=True, help="Set the PREF bit (preferred path group).")
@click.option("--port", "ports", multiple=True, metavar="IQN,TPGT",
              help="Target port in this group (repeatable).")
@click.option("--remote", is_flag=True,
              help="The HA peer's ports: reported, never served here.")
@click.option("--explicit/--no-explicit", default=True, show_default=True,
              help="Allow initiators to change the state with SET TARGET PORT GROUPS.")
@click.option("--transition-time", type=click.IntRange(0, 255), default=0,
              help="Implicit transition time in seconds reported to initiators.")
@click.pass_context
def group_create(ctx: click.Context, group_id: int, state: str, preferred: bool,
                 ports: tuple[str, ...], remote: bool, explicit: bool,
                 transition_time: int) -> None:
    """Create target port group ID."""
    g = run_op(ctx, "alua_group_create", {
        "id": group_id, "state": state, "preferred": preferred, "ports": list(ports),
        "remote": remote, "explicit": explicit, "transition_time": transition_time})
    click.echo(f"Created target port group {g['id']} ({g['state']}).")


@group.command("set")
@click.argument("group_id", metavar="ID", type=click.IntRange(1, 65535))
@click.option("--state", default=None, help=STATE_HELP)
@click.option("--preferred/--not-preferred", default=None)
@click.option("--add-port", "add_ports", multiple=True, metavar="IQN,TPGT")
@click.option("--remove-port", "remove_ports", multiple=True, metavar="IQN,TPGT")
@click.option("--explicit/--no-explicit", default=None)
@click.option("--transition-time", type=click.IntRange(0, 255), default=None)
@click.pass_context
def group_set(ctx: click.Context, group_id: int, state: str | None, preferred: bool | None,
              add_ports: tuple[str, ...], remove_ports: tuple[str, ...],
              explicit: bool | None, transition_time: int | None) -> None:
    """Change group ID (a state change is an implicit ALUA transition: every
    initiator gets ASYMMETRIC ACCESS STATE CHANGED)."""
    g = run_op(ctx, "alua_group_set", {
        "id": group_id, "state": state, "preferred": preferred,
        "add_ports": list(add_ports) or None, "remove_ports": list(remove_ports) or None,
        "explicit": explicit, "transition_time": transition_time})
    click.echo(f"Target port group {g['id']}: {g['state']}.")


@group.command("remove")
@click.argument("group_id", metavar="ID", type=click.IntRange(1, 65535))
@click.pass_context
def group_remove(ctx: click.Context, group_id: int) -> None:
    """Remove group ID (its ports return to group 1; removing group 1 resets it)."""
    run_op(ctx, "alua_group_remove", {"id": group_id})
    click.echo(f"Removed target port group {group_id}.")
