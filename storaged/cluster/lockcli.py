"""``storaged lock``: cluster-wide locks for scripts, through the local cluster node.

Kept apart from :mod:`storaged.cluster.cli` with only light imports (no
ZeroMQ, no state store): ``storaged lock run`` wraps commands in scripts and
loops, so its start-up time matters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import NoReturn

import click

from storaged.cluster.client import NodeClient, NodeError


def _fail(message: str) -> NoReturn:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def _client(ctx: click.Context) -> NodeClient:
    try:
        return NodeClient(ctx.find_root().obj["dir"])
    except NodeError as e:
        _fail(str(e))


@click.group()
def lock() -> None:
    """Cluster-wide locks for scripts (through the local cluster node)."""


@lock.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--mode", default="EX", show_default=True,
              type=click.Choice(["NL", "CR", "CW", "PR", "PW", "EX"], case_sensitive=False))
@click.option("--lockspace", default="default", show_default=True)
@click.option("--timeout", type=float, help="Give up (exit 1) if not granted in time.")
@click.option("--noqueue", "-n", is_flag=True, help="Fail at once if the lock is busy.")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def lock_run(ctx: click.Context, mode: str, lockspace: str, timeout: float | None,
             noqueue: bool, name: str, command: tuple[str, ...]) -> None:
    """Hold lock NAME while COMMAND runs (like flock(1)); exits with COMMAND's status."""
    with _client(ctx) as c:
        try:
            c.call("lock", {"lockspace": lockspace, "name": name, "mode": mode.upper(),
                            "flags": ["NOQUEUE"] if noqueue else [], "timeout": timeout},
                   timeout=None)
        except NodeError as e:
            _fail(f"lock {name}: {e}")
        try:
            rc = subprocess.call(list(command))
        except OSError as e:
            _fail(f"cannot run {command[0]}: {e.strerror}")
    sys.exit(rc)


@lock.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lock_ls(ctx: click.Context, as_json: bool) -> None:
    """Resources mastered here (holders and waiters) and this node's locks."""
    with _client(ctx) as c:
        try:
            data = c.call("ls")
        except NodeError as e:
            _fail(str(e))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for ls in data:
        click.echo(f"lockspace {ls['lockspace']} ({ls['state']}, view {ls['view']})")
        for r in ls["mastered"]:
            click.echo(f"  resource {r['name']} (mastered here, lvb "
                       f"{'valid' if r['lvb_valid'] else 'INVALID'})")
            for q in ("granted", "converting", "waiting"):
                for row in r[q]:
                    rq = f" -> {row['requested']}" if row["requested"] != "IV" else ""
                    click.echo(f"    {q:<10} node {row['node']} lock {row['lkid']} "
                               f"{row['granted']}{rq}")
        for lk in ls["locks"]:
            click.echo(f"  lock {lk['lkid']} {lk['name']}: {lk['granted']}"
                       f"{' (' + lk['op'] + ' ' + lk['requested'] + ')' if lk['op'] else ''}"
                       f" master node {lk['master']}")
