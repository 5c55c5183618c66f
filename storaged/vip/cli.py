"""``storaged vip add|ls|del``: floating portal addresses (IPaddr2 semantics).

Each verb runs one control operation of :mod:`storaged.vip.ops`, live
through the daemon or offline on the store.  ``vip ls`` shows the live
state when the daemon runs (this node's view: held here, standby, no
quorum; the owner; when it was taken; the history), else the config.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from storaged.cli.root import run_op


def _preference(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise click.BadParameter(f"expected node ids like 2,1,3, got {text!r}") from None


@click.group()
def vip() -> None:
    """Floating portal addresses held by one quorate cluster node."""


@vip.command("add")
@click.argument("address", metavar="ADDRESS/PREFIX")
@click.option("--dev", required=True, metavar="IFACE", help="Interface to add the address to.")
@click.option("--node-preference", "preference", metavar="ID,ID,...",
              help="Node ids, most preferred first (who takes the address at cluster start).")
@click.option("--preference-delay-ms", type=int, default=500, show_default=True,
              help="How much later each less preferred node asks for the address.")
@click.option("--garp-count", type=int, default=5, show_default=True,
              help="Gratuitous ARPs sent when the address is taken.")
@click.option("--garp-interval-ms", type=int, default=200, show_default=True)
@click.option("--reannounce-s", type=int, default=0, show_default=True,
              help="Send a gratuitous ARP every N seconds while held (0: never).")
@click.option("--lockspace", default="default", show_default=True,
              help="DLM lockspace of the address lock.")
@click.option("--require-synced-clock", is_flag=True,
              help="Never take the address while this node's kernel clock is unsynchronized "
                   "(default: the cluster only warns).")
@click.pass_context
def vip_add(ctx: click.Context, address: str, dev: str, preference: str | None,
            preference_delay_ms: int, garp_count: int, garp_interval_ms: int,
            reannounce_s: int, lockspace: str, require_synced_clock: bool) -> None:
    """Add floating address ADDRESS/PREFIX (run the same on every node that may hold it)."""
    r = run_op(ctx, "vip_add", {"address": address, "dev": dev,
                                "preference": _preference(preference),
                                "preference_delay_ms": preference_delay_ms,
                                "garp_count": garp_count, "garp_interval_ms": garp_interval_ms,
                                "reannounce_s": reannounce_s, "lockspace": lockspace,
                                "require_synced_clock": require_synced_clock})
    click.echo(f"Floating address {r['address']} on {r['dev']} added.")


@vip.command("del")
@click.argument("address", metavar="ADDRESS[/PREFIX]")
@click.pass_context
def vip_del(ctx: click.Context, address: str) -> None:
    """Delete a floating address (its holder removes it from the interface)."""
    r = run_op(ctx, "vip_del", {"address": address})
    click.echo(f"Floating address {r['address']} deleted.")


def _ago(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return f"{max(0.0, time.time() - stamp):.1f}s ago"


def _print(vips: list[dict[str, Any]], live: bool, history: bool) -> None:
    if not vips:
        click.echo("No floating addresses.")
        return
    if not live:
        for v in vips:
            pref = ",".join(map(str, v["preference"])) or "-"
            click.echo(f"{v['address']:<20} dev {v['dev']:<12} preference {pref}")
        click.echo("(daemon not running: configured addresses)")
        return
    click.echo(f"{'ADDRESS':<20} {'DEV':<12} {'STATE':<14} {'OWNER':<6} {'SINCE':<12} GARPS")
    for v in vips:
        owner = "here" if v["state"] == "held" else (str(v["owner"]) if v["owner"] else "?")
        click.echo(f"{v['address']:<20} {v['dev']:<12} {v['state']:<14} {owner:<6} "
                   f"{_ago(v['since']):<12} {v['garps_sent']}")
        if v["error"]:
            click.echo(f"    error: {v['error']}")
        if history:
            for h in v["history"]:
                stamp = time.strftime("%H:%M:%S", time.localtime(h["time"]))
                click.echo(f"    {stamp}.{int(h['time'] * 1000) % 1000:03d}  {h['event']}")


@vip.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--history/--no-history", default=True, show_default=True,
              help="Show each address's recent transitions.")
@click.pass_context
def vip_ls(ctx: click.Context, as_json: bool, history: bool) -> None:
    """Floating addresses: live state from the daemon, else the stored config."""
    r = run_op(ctx, "vip_ls")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    _print(r["vips"], r["live"], history)
