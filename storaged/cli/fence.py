"""``storaged fence``: SAN-level fencing of cluster nodes on this storage node.

An admin maps each cluster node (the name pacemaker passes as ``plug``) to
its initiator IQNs and PR keys with ``fence map``; ``fence off NODE`` then
cuts it off every LU (registrations preempted, sessions dropped, logins
refused) and ``fence on NODE`` gives access back.  Live through the daemon,
or on the store when it is not running (applied when it starts).
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import Any

import click

from storaged.cli.root import run_op


def _by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "uid-unknown"
    return f"{user}@cli"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z" if t else "-"


def _line(n: dict[str, Any]) -> str:
    state = "FENCED" if n["fenced"] else "access"
    who = f"  since {_when(n['since'])} by {n['by']}" if n["since"] else ""
    ids = ", ".join([*n["initiators"], *n["keys"]])
    return f"{n['node']}: {state}{who}\n  {ids}"


@click.group()
def fence() -> None:
    """Fence cluster nodes at the SAN: revoke and restore their access."""


@fence.command("map")
@click.argument("node")
@click.option("--initiator", "initiators", multiple=True, metavar="IQN",
              help="An initiator name of the node (repeatable).")
@click.option("--key", "keys", multiple=True, metavar="HEX",
              help="A PR reservation key the node registers (hex, repeatable).")
@click.pass_context
def fence_map(ctx: click.Context, node: str, initiators: tuple[str, ...],
              keys: tuple[str, ...]) -> None:
    """Map cluster node NODE to its initiator IQNs and PR keys (replaces the old map)."""
    r = run_op(ctx, "fence_map", {"node": node, "initiators": list(initiators),
                                  "keys": list(keys), "by": _by()})
    click.echo(f"Mapped node {r['node']}: {', '.join([*r['initiators'], *r['keys']])}.")


@fence.command("unmap")
@click.argument("node")
@click.pass_context
def fence_unmap(ctx: click.Context, node: str) -> None:
    """Forget NODE's mapping (refused while it is fenced)."""
    r = run_op(ctx, "fence_unmap", {"node": node, "by": _by()})
    click.echo(f"Unmapped node {r['node']}.")


@fence.command("off")
@click.argument("node")
@click.pass_context
def fence_off(ctx: click.Context, node: str) -> None:
    """Fence NODE: preempt its registrations, drop its sessions, refuse its logins."""
    r = run_op(ctx, "fence_off", {"node": node, "by": _by()})
    click.echo(f"Node {r['node']} fenced." if r["changed"] else
               f"Node {r['node']} was already fenced.")


@fence.command("on")
@click.argument("node")
@click.pass_context
def fence_on(ctx: click.Context, node: str) -> None:
    """Unfence NODE: it may log in again."""
    r = run_op(ctx, "fence_on", {"node": node, "by": _by()})
    click.echo(f"Node {r['node']} unfenced." if r["changed"] else
               f"Node {r['node']} was not fenced.")


@fence.command("status")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def fence_status(ctx: click.Context, node: str, as_json: bool) -> None:
    """Is NODE fenced?  Exit 0 when it has access, 2 when fenced (as fence agents)."""
    r = run_op(ctx, "fence_status", {"node": node})
    click.echo(json.dumps(r, indent=2) if as_json else _line(r))
    sys.exit(2 if r["fenced"] else 0)


@fence.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def fence_ls(ctx: click.Context, as_json: bool) -> None:
    """Every mapped node and whether it is fenced."""
    r = run_op(ctx, "fence_ls")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for n in r["nodes"]:
        click.echo(_line(n))
    if not r["nodes"]:
        click.echo("(no node mapped: 'storaged fence map NODE --initiator IQN')")


@fence.command("history")
@click.argument("node", required=False)
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def fence_history(ctx: click.Context, node: str | None, limit: int, as_json: bool) -> None:
    """Fence, unfence and mapping events (who, when), oldest first."""
    r = run_op(ctx, "fence_history", {"node": node, "limit": limit})
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for e in r["events"]:
        detail = f"  ({e['detail']})" if e["detail"] else ""
        click.echo(f"{_when(e['at'])}  {e['node']:<16} {e['action']:<6} by {e['by']}{detail}")


@click.group()
def mgmt() -> None:
    """The network management endpoint fence agents use (off by default)."""


@mgmt.command("listen")
@click.argument("address", metavar="IP:PORT|off")
@click.option("--tls-cert", default=None, metavar="PEM", help="Serve TLS with this certificate.")
@click.option("--tls-key", default=None, metavar="PEM", help="The certificate's private key.")
@click.pass_context
def mgmt_listen(ctx: click.Context, address: str, tls_cert: str | None,
                tls_key: str | None) -> None:
    """Listen for fence agents on ADDRESS (ip:port), or stop ('off')."""
    r = run_op(ctx, "mgmt_set", {"address": address, "tls_cert": tls_cert, "tls_key": tls_key})
    click.echo(f"Management endpoint on {r['address']}{' (TLS)' if r['tls'] else ''}."
               if r["address"] else "Management endpoint off.")


@mgmt.command("user-add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--replace", is_flag=True, help="Change an existing user's password.")
@click.pass_context
def mgmt_user_add(ctx: click.Context, name: str, password_stdin: bool, replace: bool) -> None:
    """Add a user the fence agent logs in as (only a salted verifier is stored)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    r = run_op(ctx, "mgmt_user_add", {"name": name, "password": password, "replace": replace})
    click.echo(f"User {r['user']} {'updated' if replace else 'added'}.")


@mgmt.command("user-remove")
@click.argument("name")
@click.pass_context
def mgmt_user_remove(ctx: click.Context, name: str) -> None:
    """Remove an endpoint user."""
    run_op(ctx, "mgmt_user_remove", {"name": name})
    click.echo(f"User {name} removed.")


@mgmt.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def mgmt_ls(ctx: click.Context, as_json: bool) -> None:
    """The endpoint's address and users."""
    r = run_op(ctx, "mgmt_ls")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"address: {r['address'] or 'off'}{'  (TLS)' if r['tls'] else ''}")
    click.echo(f"users: {', '.join(r['users']) or '(none)'}")
