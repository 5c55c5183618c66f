"""``storaged raid ...``: create and run md-compatible RAID volumes (mdadm-like verbs).

With a daemon running, every verb goes to it over the control socket
(``raid_<verb>``) and acts on the live array; long work (recovery, check)
continues in the daemon and ``status`` shows its progress.  Without a
daemon the verb runs in-process on the state store: the array is assembled,
changed, and stopped cleanly again; recovery and scrubs then run to the end
in the foreground with a progress line (``--no-wait`` leaves them to resume
at the next start).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from storaged.control.client import call, daemon_running
from storaged.control.ops import ConfigError, format_size
from storaged.raid.service import RaidService
from storaged.state import StateError, Store

# Offline, these finish their background work (recovery, resync) before the
# array is stopped again, so the result is the settled state.
OFFLINE_WAIT = ("create", "assemble", "fail", "add", "replace", "remove", "check")


def _fail(message: str) -> None:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def _progress_line(name: str, sync: dict[str, Any]) -> str:
    eta = sync.get("eta_s")
    eta_text = f"{eta // 60}min{eta % 60:02d}s" if isinstance(eta, int) else "?"
    return (f"\r{name}: {sync['action']} {sync['percent']:5.1f}% "
            f"({format_size(sync['pos'])}/{format_size(sync['total'])}) "
            f"speed={sync['speed_kib']}K/sec finish={eta_text}   ")


def raid_call(ctx: click.Context, verb: str, args: dict[str, Any], wait: bool = False,
              name: str | None = None) -> Any:
    """Run a raid verb live in the daemon, or offline on the store (then stop the arrays)."""
    from storaged.cli.root import socket_path

    directory = ctx.find_root().obj["dir"]
    sock = socket_path(directory)
    try:
        if daemon_running(sock):
            result = call(sock, f"raid_{verb}", args, timeout=120)
            if wait and name:
                while True:
                    st = call(sock, "raid_wait", {"name": name, "timeout": 1.0})
                    if not st.get("sync"):
                        click.echo("", err=True)
                        return st
                    click.echo(_progress_line(name, st["sync"]), nl=False, err=True)
            return result
        with Store(directory) as store:
            svc = RaidService(store)
            try:
                result = svc.call(verb, args)
                if name and name in svc.arrays:
                    arr = svc.arrays[name]
                    if wait or verb in OFFLINE_WAIT:
                        arr.wait_idle(progress=lambda s: click.echo(
                            _progress_line(name, s), nl=False, err=True))
                        click.echo("\r" + " " * 78 + "\r", nl=False, err=True)
                        result = arr.status()
            finally:
                svc.stop_all()
            return result
    except (ConfigError, StateError) as e:
        _fail(str(e))


def mdstat(arrays: list[dict[str, Any]]) -> str:
    """/proc/mdstat-like text."""
    lines = []
    for a in arrays:
        if not a.get("members"):
            lines.append(f"{a['name']} : {a['state']}")
            continue
        devs = " ".join(
            f"{m['path']}[{m['dev_number']}]" + {"faulty": "(F)", "spare": "(S)",
                                                 "replacing": "(R)"}.get(
                m["state"], "") for m in a["members"])
        lines.append(f"{a['name']} : {a['state']} raid{a['level']} {devs}")
        chunk = f"{a['chunk'] // 1024}k chunk, " if a["chunk"] else ""
        layout = f"algorithm {a['layout']} " if a["level"] in (4, 5, 6, 10) else ""
        active = a["slots"].count("U")
        lines.append(f"      {a['size'] // 1024} blocks super 1.2 level {a['level']}, {chunk}"
                     f"{layout}[{a['raid_disks']}/{active}] [{a['slots']}]")
        s = a.get("sync")
        if s:
            width = 20
            done = int(width * s["percent"] / 100)
            bar = "=" * max(done - 1, 0) + ">" + "." * (width - max(done, 1))
            eta = s.get("eta_s")
            eta_text = f"{eta / 60:.1f}min" if isinstance(eta, int) else "?"
            lines.append(f"      [{bar}]  {s['action']} = {s['percent']:.1f}% "
                         f"({s['pos'] // 1024}/{s['total'] // 1024}) "
                         f"finish={eta_text} speed={s['speed_kib']}K/sec")
        bm = a.get("bitmap")
        if bm:
            lines.append(f"      bitmap: {bm['dirty']}/{bm['bits']} bits dirty, "
                         f"{bm['chunk'] // 1024}KB chunk"
                         + (f"; journal {a['journal']}" if a.get("journal") else ""))
        sc = a.get("stripe_cache")
        if sc:
            looked = sc["hits"] + sc["misses"]
            rate = f", {100 * sc['hits'] / looked:.0f}% hits" if looked else ""
            lines.append(f"      stripe cache: {sc['cached']}/{sc['size']} heads, "
                         f"{sc['dirty']} dirty{rate}")
        if a.get("last_check"):
            lc = a["last_check"]
            lines.append(f"      last {lc['action']}: mismatch_cnt={lc['mismatch_cnt']}")
        lines.append("")
    return "\n".join(lines) if lines else "no raid arrays"


@click.group()
def raid() -> None:
    """md-compatible RAID 0/1/4/5/6/10 volumes (mdadm-like verbs)."""


@raid.command("create")
@click.option("--level", "-l", required=True, type=click.Choice(["0", "1", "4", "5", "6", "10"]))
@click.option("--chunk", default=None, help="Chunk size (default 512K; power of two >= 4K).")
@click.option("--layout", default=None,
              help="left-symmetric (default), left-asymmetric, right-symmetric, "
                   "right-asymmetric, parity-first, parity-last; raid10: n2 (default), n3.")
@click.option("--spares", "-x", default=0, type=click.IntRange(0, 64),
              help="How many of the last MEMBERs are hot spares.")
@click.option("--size", default=None, help="Create missing members as sparse files this big.")
@click.option("--name", required=True, help="Array name.")
@click.option("--bitmap", "bitmap", type=click.Choice(["internal", "none"]), default=None,
              help="Write-intent bitmap (default internal, none for raid0).")
@click.option("--bitmap-chunk", default=None,
              help="Bytes per bitmap bit (default as mdadm: 64M, more if needed to fit).")
@click.option("--journal", type=click.Choice(["async", "sync", "off"]), default=None,
              help="raid4/5/6 write-hole journal (default async; sync survives power cuts).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("members", nargs=-1, required=True)
@click.pass_context
def raid_create(ctx: click.Context, level: str, chunk: str | None, layout: str | None,
                spares: int, size: str | None, name: str, bitmap: str | None,
                bitmap_chunk: str | None, journal: str | None, as_json: bool,
                members: tuple[str, ...]) -> None:
    """Create an array from MEMBER files or block devices (writes md v1.2 superblocks)."""
    args: dict[str, Any] = {"name": name, "level": int(level), "members": list(members),
                            "chunk": chunk, "layout": layout, "spares": spares, "size": size}
    if bitmap is not None:
        args["bitmap"] = bitmap == "internal"
    if bitmap_chunk is not None:
        args["bitmap_chunk"] = bitmap_chunk
    if journal is not None:
        args["journal"] = journal
    st = raid_call(ctx, "create", args)
    _show(st, as_json, f"created {name}: raid{level}, {format_size(st['size'])}")


def _show(result: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(text)


@raid.command("assemble")
@click.argument("name")
@click.argument("members", nargs=-1)
@click.option("--force", is_flag=True, help="Start a dirty degraded parity array anyway.")
@click.pass_context
def raid_assemble(ctx: click.Context, name: str, members: tuple[str, ...], force: bool) -> None:
    """Start array NAME (recorded, or found on MEMBERs by superblock and recorded)."""
    st = raid_call(ctx, "assemble", {"name": name, "members": list(members) or None,
                                     "force": force})
    click.echo(f"{name}: {st['state']} [{st['slots']}]")


@raid.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until no sync runs.")
@click.pass_context
def raid_status(ctx: click.Context, name: str | None, as_json: bool, watch: bool) -> None:
    """mdstat-like view of the arrays, with rebuild/check progress and ETA."""
    while True:
        arrays = raid_call(ctx, "status", {"name": name})
        if as_json:
            click.echo(json.dumps(arrays, indent=2))
        else:
            click.echo(mdstat(arrays))
        if not watch or not any(a.get("sync") for a in arrays):
            return
        time.sleep(1)


def _member_verb(verb: str, doc: str, extra_size: bool = False) -> None:
    @click.argument("name")
    @click.argument("member")
    @click.pass_context
    def cmd(ctx: click.Context, name: str, member: str, **kw: Any) -> None:
        args: dict[str, Any] = {"name": name, "member": member}
        wait = False
        if extra_size:
            args["size"] = kw.get("size")
            wait = not kw.get("no_wait", False)
        st = raid_call(ctx, verb, args, wait=wait, name=name)
        click.echo(f"{name}: {st['state']} [{st['slots']}]")
    cmd.__doc__ = doc
    if extra_size:
        cmd = click.option("--size", default=None,
                           help="Create MEMBER as a sparse file this big.")(cmd)
        cmd = click.option("--no-wait", is_flag=True,
                           help="Return at once; recovery goes on in the background.")(cmd)
    raid.command(verb)(cmd)


_member_verb("fail", "Mark MEMBER of array NAME faulty (a spare, if any, takes its place).")
_member_verb("remove", "Remove a faulty or spare MEMBER from array NAME.")
_member_verb("add", "Add MEMBER to array NAME as a spare (re-add after a failure); "
                    "it rebuilds at once if a slot is missing.", extra_size=True)


@raid.command("replace")
@click.argument("name")
@click.argument("member")
@click.argument("new")
@click.option("--size", default=None, help="Create NEW as a sparse file this big.")
@click.option("--no-wait", is_flag=True, help="Return at once; recovery continues.")
@click.pass_context
def raid_replace(ctx: click.Context, name: str, member: str, new: str, size: str | None,
                 no_wait: bool) -> None:
    """Hot-replace: copy MEMBER onto NEW while MEMBER keeps serving, then swap.

    Redundancy never drops (md's want_replacement); MEMBER is left faulty
    for ``raid remove``.
    """
    st = raid_call(ctx, "replace", {"name": name, "member": member, "new": new, "size": size},
                   wait=not no_wait, name=name)
    click.echo(f"{name}: {st['state']} [{st['slots']}]")


def _scrub(verb: str, repair: bool) -> None:
    @click.argument("name")
    @click.option("--no-wait", is_flag=True, help="Return at once; the scrub runs on.")
    @click.pass_context
    def cmd(ctx: click.Context, name: str, no_wait: bool) -> None:
        st = raid_call(ctx, "check", {"name": name, "repair": repair}, wait=not no_wait,
                       name=name)
        lc = st.get("last_check") or {}
        click.echo(f"{name}: {verb} {'started' if no_wait else 'done'}"
                   + ("" if no_wait else f", mismatch_cnt={lc.get('mismatch_cnt', 0)}"))
    cmd.__doc__ = ("Scrub NAME: count mismatched sectors (md's mismatch_cnt)." if not repair
                   else "Scrub NAME and rewrite inconsistent parity or mirror copies.")
    raid.command(verb)(cmd)


_scrub("check", False)
_scrub("repair", True)


@raid.command("speed")
@click.argument("name")
@click.option("--min", "minimum", type=click.IntRange(1), help="KiB/s under foreground I/O.")
@click.option("--max", "maximum", type=click.IntRange(1), help="KiB/s when idle.")
@click.pass_context
def raid_speed(ctx: click.Context, name: str, minimum: int | None, maximum: int | None) -> None:
    """Set md-style rebuild speed limits (speed_limit_min/max) of NAME."""
    st = raid_call(ctx, "speed", {"name": name, "minimum": minimum, "maximum": maximum})
    click.echo(f"{name}: speed_limit_min={st['speed_limit_min']} "
               f"speed_limit_max={st['speed_limit_max']} KiB/s")


@raid.command("cache")
@click.argument("name")
@click.option("--size", type=click.IntRange(0), default=None,
              help="Stripe heads (4 KiB of every member each; md's stripe_cache_size), "
                   "32..32768, or 0 to turn the cache off.")
@click.pass_context
def raid_cache(ctx: click.Context, name: str, size: int | None) -> None:
    """Show or set the stripe cache of RAID-4/5/6 array NAME (md's stripe_cache_size)."""
    st = raid_call(ctx, "cache", {"name": name, "size": size})
    sc = st.get("stripe_cache")
    if sc is None:
        click.echo(f"{name}: stripe cache off")
        return
    click.echo(f"{name}: stripe_cache_size={sc['size']} ({sc['cached']} cached, "
               f"{sc['dirty']} dirty, {sc['hits']} hits, {sc['misses']} misses, "
               f"{sc['evicted']} evicted)")


@raid.command("stop")
@click.argument("name")
@click.pass_context
def raid_stop(ctx: click.Context, name: str) -> None:
    """Stop array NAME (marks it clean; it is assembled again at the next start)."""
    raid_call(ctx, "stop", {"name": name})
    click.echo(f"stopped {name}")


@raid.command("delete")
@click.argument("name")
@click.pass_context
def raid_delete(ctx: click.Context, name: str) -> None:
    """Stop array NAME and forget it (the member superblocks stay)."""
    raid_call(ctx, "delete", {"name": name})
    click.echo(f"deleted {name}")


@raid.command("backstore")
@click.argument("backstore")
@click.argument("name")
@click.option("--block-size", type=click.Choice(["512", "4096"]), default="512")
@click.pass_context
def raid_backstore(ctx: click.Context, backstore: str, name: str, block_size: str) -> None:
    """Export array NAME as backstore BACKSTORE (then: storaged lun add IQN BACKSTORE)."""
    from storaged.cli.root import run_op

    r = run_op(ctx, "raid_backstore_create", {"name": backstore, "array": name,
                                              "block_size": int(block_size)})
    click.echo(f"backstore {r['name']}: raid array {name}, {r['size_text']}")
