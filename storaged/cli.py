"""The ``storaged`` command line: targetcli-like admin verbs plus serve/demo.

Every admin verb goes to the running daemon over its control socket
(``<dir>/control.sock``) so the change is applied live; when no daemon is
running it opens the LMDB store directly.  Both paths run the same
``storaged.control.ops`` operation, so validation and messages are identical.
Errors print ``storaged: error: ...`` and exit 1 with nothing changed; bad
arguments are usage errors (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from storaged import __version__
from storaged.cli_lazy import LazyGroup

# The control/state modules are imported inside the commands that use them and the
# subcommand groups lazily (LazyGroup): ``storaged lock run`` starts without loading them.

DEFAULT_DIR = "/var/lib/storaged"
DEMO_DIR = "./storaged-demo"
SOCKET_NAME = "control.sock"


def socket_path(directory: str) -> str:
    """The control socket of the state directory ``directory``."""
    return os.path.join(directory, SOCKET_NAME)


def _fail(message: str) -> NoReturn:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def run_op(ctx: click.Context, op: str, args: dict[str, Any] | None = None) -> Any:
    """Run ``op`` live through the daemon if it is running, else on the store directly."""
    from storaged.control.client import call, daemon_running
    from storaged.control.ops import ConfigError, apply
    from storaged.state import StateError, Store

    directory = ctx.find_root().obj["dir"]
    sock = socket_path(directory)
    try:
        if daemon_running(sock):
            return call(sock, op, args or {})
        with Store(directory) as store:
            return apply(store, op, args or {})
    except (ConfigError, StateError) as e:
        _fail(str(e))


def backstore_label(b: dict[str, Any]) -> str:
    """One-line backstore description (storaged.control.render, imported on use)."""
    from storaged.control.render import backstore_label as label

    return label(b)


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "directory", envvar="STORAGED_DIR", default=DEFAULT_DIR,
              show_default=True, metavar="DIR",
              help="State directory (LMDB store and control socket). Env: STORAGED_DIR.")
@click.version_option(__version__, prog_name="storaged")
@click.pass_context
def cli(ctx: click.Context, directory: str) -> None:
    """storaged: iSCSI storage server administration."""
    ctx.obj = {"dir": directory}


# ------------------------------------------------------------- backstore

@cli.group()
def backstore() -> None:
    """Files and block devices that back LUNs."""


@backstore.command("create")
@click.argument("name")
@click.argument("path")
@click.option("--size", help="Size for a new file: bytes or 512M, 10G, 1GiB (binary units).")
@click.option("--block-size", type=click.Choice(["512", "4096"]), default="512",
              show_default=True, help="Logical block size.")
@click.option("--read-only", is_flag=True, help="Export read-only.")
@click.option("--no-write-cache", is_flag=True,
              help="Write-through: every write is durable before it is acknowledged.")
@click.option("--direct", is_flag=True,
              help="O_DIRECT: bypass the host page cache (the filesystem must support it).")
@click.pass_context
def backstore_create(ctx: click.Context, name: str, path: str, size: str | None,
                     block_size: str, read_only: bool, no_write_cache: bool,
                     direct: bool) -> None:
    """Register PATH (file or block device) as backstore NAME; creates a missing file."""
    b = run_op(ctx, "backstore_create", {
        "name": name, "path": os.path.abspath(path), "size": size,
        "block_size": int(block_size), "read_only": read_only, "wce": not no_write_cache,
        "direct": direct})
    from storaged.control.ops import format_size

    size_text = format_size(b["size"]) if b["size"] else "whole device"
    click.echo(f"Created backstore {b['name']} ({b['kind']} {b['path']}, {size_text}).")


@backstore.command("delete")
@click.argument("name")
@click.pass_context
def backstore_delete(ctx: click.Context, name: str) -> None:
    """Forget backstore NAME (its file is kept)."""
    run_op(ctx, "backstore_delete", {"name": name})
    click.echo(f"Deleted backstore {name}.")


@backstore.command("set")
@click.argument("name")
@click.option("--read-only/--read-write", default=None, help="Write-protect the LUNs.")
@click.option("--online/--offline", default=None,
              help="Offline LUNs answer NOT READY to media access.")
@click.option("--write-cache/--no-write-cache", "wce", default=None,
              help="Acknowledge writes from the page cache (WCE=1) or only once durable.")
@click.option("--direct", type=click.Choice(["on", "off"]), default=None,
              help="O_DIRECT on or off: bypass the host page cache.")
@click.pass_context
def backstore_set(ctx: click.Context, name: str, read_only: bool | None, online: bool | None,
                  wce: bool | None, direct: str | None) -> None:
    """Change flags of backstore NAME (live when the daemon runs)."""
    b = run_op(ctx, "backstore_set", {"name": name, "read_only": read_only, "online": online,
                                      "wce": wce,
                                      "direct": None if direct is None else direct == "on"})
    click.echo(backstore_label(b))


@backstore.command("resize")
@click.argument("name")
@click.argument("size")
@click.pass_context
def backstore_resize(ctx: click.Context, name: str, size: str) -> None:
    """Grow file backstore NAME to SIZE (e.g. 20G); initiators see the new capacity."""
    b = run_op(ctx, "backstore_resize", {"name": name, "size": size})
    click.echo(backstore_label(b))


@backstore.command("ls")
@click.pass_context
def backstore_ls(ctx: click.Context) -> None:
    """List backstores."""
    for b in run_op(ctx, "describe")["backstores"]:
        click.echo(backstore_label(b))


# ---------------------------------------------------------------- target

@cli.group()
def target() -> None:
    """iSCSI targets."""


@target.command("create")
@click.argument("iqn")
@click.option("--portal", "portals", multiple=True, metavar="IP:PORT",
              help="Listening portal (repeatable); default from settings (0.0.0.0:3260).")
@click.pass_context
def target_create(ctx: click.Context, iqn: str, portals: tuple[str, ...]) -> None:
    """Create target IQN."""
    t = run_op(ctx, "target_create", {"iqn": iqn, "portals": list(portals) or None})
    click.echo(f"Created target {t['iqn']} on {', '.join(t['portals']) or 'no portals'}.")


@target.command("delete")
@click.argument("iqn")
@click.pass_context
def target_delete(ctx: click.Context, iqn: str) -> None:
    """Delete target IQN with its LUN map, ACLs and CHAP (backstores are kept)."""
    r = run_op(ctx, "target_delete", {"iqn": iqn})
    click.echo(f"Deleted target {r['deleted']}.")


@target.command("open")
@click.argument("iqn")
@click.pass_context
def target_open(ctx: click.Context, iqn: str) -> None:
    """Let any initiator log in (like targetcli generate_node_acls=1)."""
    t = run_op(ctx, "target_open", {"iqn": iqn, "open": True})
    click.echo(f"Target {t['iqn']}: open access.")


@target.command("close")
@click.argument("iqn")
@click.pass_context
def target_close(ctx: click.Context, iqn: str) -> None:
    """Only initiators with an ACL entry may log in."""
    t = run_op(ctx, "target_open", {"iqn": iqn, "open": False})
    click.echo(f"Target {t['iqn']}: ACL-only access.")


@target.command("set")
@click.argument("iqn")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.pass_context
def target_set(ctx: click.Context, iqn: str, pairs: tuple[str, ...]) -> None:
    """Set iSCSI parameters (e.g. MaxBurstLength=1048576), queue_depth or tpgt; KEY= resets."""
    params = _pairs(pairs)
    t = run_op(ctx, "params_set", {"iqn": iqn, "params": params})
    shown = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "defaults"
    click.echo(f"Target {t['iqn']}: params {shown}; queue_depth={t['queue_depth']}.")


# ------------------------------------------------------------------- lun

@cli.group()
def lun() -> None:
    """LUN mapping of backstores into targets."""


@lun.command("add")
@click.argument("iqn")
@click.argument("backstore_name", metavar="BACKSTORE")
@click.option("--lun", "lun_id", type=click.IntRange(0, 16383), help="LUN id (default: next free).")
@click.pass_context
def lun_add(ctx: click.Context, iqn: str, backstore_name: str, lun_id: int | None) -> None:
    """Export BACKSTORE as a LUN of target IQN."""
    r = run_op(ctx, "lun_add", {"iqn": iqn, "backstore": backstore_name, "lun": lun_id})
    click.echo(f"Target {r['iqn']}: lun{r['lun']} -> {r['backstore']}.")


@lun.command("remove")
@click.argument("iqn")
@click.argument("lun_id", metavar="N", type=click.IntRange(0, 16383))
@click.pass_context
def lun_remove(ctx: click.Context, iqn: str, lun_id: int) -> None:
    """Unmap LUN N from target IQN."""
    r = run_op(ctx, "lun_remove", {"iqn": iqn, "lun": lun_id})
    click.echo(f"Target {r['iqn']}: removed lun{r['lun']} ({r['backstore']}).")


# ---------------------------------------------------------------- portal

@cli.group()
def portal() -> None:
    """Addresses a target listens on."""


@portal.command("add")
@click.argument("iqn")
@click.argument("address", metavar="IP:PORT")
@click.pass_context
def portal_add(ctx: click.Context, iqn: str, address: str) -> None:
    """Add a portal (IPv4 ip:port or [IPv6]:port; port defaults to 3260)."""
    t = run_op(ctx, "portal_add", {"iqn": iqn, "portal": address})
    click.echo(f"Target {t['iqn']}: portals {', '.join(t['portals'])}.")


@portal.command("remove")
@click.argument("iqn")
@click.argument("address", metavar="IP:PORT")
@click.pass_context
def portal_remove(ctx: click.Context, iqn: str, address: str) -> None:
    """Remove a portal."""
    t = run_op(ctx, "portal_remove", {"iqn": iqn, "portal": address})
    click.echo(f"Target {t['iqn']}: portals {', '.join(t['portals']) or 'none'}.")


# ------------------------------------------------------------------- acl

@cli.group()
def acl() -> None:
    """Initiators allowed to log in."""


@acl.command("add")
@click.argument("iqn")
@click.argument("initiator")
@click.pass_context
def acl_add(ctx: click.Context, iqn: str, initiator: str) -> None:
    """Allow INITIATOR to log in to target IQN."""
    t = run_op(ctx, "acl_add", {"iqn": iqn, "initiator": initiator})
    click.echo(f"Target {t['iqn']}: added ACL for {initiator.lower()}.")


@acl.command("remove")
@click.argument("iqn")
@click.argument("initiator")
@click.pass_context
def acl_remove(ctx: click.Context, iqn: str, initiator: str) -> None:
    """Remove INITIATOR's ACL entry (and its CHAP credentials)."""
    t = run_op(ctx, "acl_remove", {"iqn": iqn, "initiator": initiator})
    click.echo(f"Target {t['iqn']}: removed ACL for {initiator.lower()}.")


# ------------------------------------------------------------------ chap

def _secret(value: str | None, path: str | None, prompt: str, option: str) -> str:
    if value is not None and path is not None:
        raise click.UsageError(f"give either --{option} or --{option}-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            _fail(f"cannot read {path}: {e.strerror}")
    if value is not None:
        return value
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


@cli.group()
def chap() -> None:
    """CHAP authentication (target-wide or per initiator ACL)."""


@chap.command("set")
@click.argument("iqn")
@click.option("--user", required=True, help="CHAP user name the initiator sends.")
@click.option("--password", help="Secret (12-255 bytes). Prefer --password-file or the prompt.")
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="Read the secret from the first line of this file.")
@click.option("--mutual-user", help="Name the target answers with (two-way CHAP).")
@click.option("--mutual-password", help="Target's secret for two-way CHAP.")
@click.option("--mutual-password-file", type=click.Path(dir_okay=False),
              help="Read the mutual secret from the first line of this file.")
@click.option("--initiator", help="Set this ACL entry's CHAP instead of the target-wide one.")
@click.pass_context
def chap_set(ctx: click.Context, iqn: str, user: str, password: str | None,
             password_file: str | None, mutual_user: str | None, mutual_password: str | None,
             mutual_password_file: str | None, initiator: str | None) -> None:
    """Set CHAP credentials for target IQN (secrets are never shown)."""
    if mutual_user is None and (mutual_password or mutual_password_file):
        raise click.UsageError("--mutual-password needs --mutual-user")
    secret = _secret(password, password_file, "CHAP password", "password")
    mutual = None
    if mutual_user is not None:
        mutual = _secret(mutual_password, mutual_password_file, "Mutual CHAP password",
                         "mutual-password")
    t = run_op(ctx, "chap_set", {"iqn": iqn, "user": user, "password": secret,
                                 "mutual_user": mutual_user, "mutual_password": mutual,
                                 "initiator": initiator})
    where = f"initiator {initiator.lower()}" if initiator else "target-wide"
    click.echo(f"Target {t['iqn']}: CHAP set ({where}, user={user}"
               f"{', mutual' if mutual_user else ''}).")


@chap.command("clear")
@click.argument("iqn")
@click.option("--initiator", help="Clear this ACL entry's CHAP instead of the target-wide one.")
@click.pass_context
def chap_clear(ctx: click.Context, iqn: str, initiator: str | None) -> None:
    """Remove CHAP credentials."""
    t = run_op(ctx, "chap_clear", {"iqn": iqn, "initiator": initiator})
    where = f"initiator {initiator.lower()}" if initiator else "target-wide"
    click.echo(f"Target {t['iqn']}: CHAP cleared ({where}).")


# -------------------------------------------------------------- settings

@cli.group()
def settings() -> None:
    """Global defaults (nop_interval, nop_timeout, default_portal)."""


@settings.command("set")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.pass_context
def settings_set(ctx: click.Context, pairs: tuple[str, ...]) -> None:
    """Change global settings."""
    s = run_op(ctx, "settings_set", {"values": _pairs(pairs)})
    click.echo("Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ".")


# -------------------------------------------------------------------- pr

@cli.group()
def pr() -> None:
    """SCSI persistent reservations (registrations and reservation per LUN)."""


def _pr_lines(b: dict[str, Any], live: bool) -> list[str]:
    luns = ", ".join(f"lun{u['lun']} of {u['iqn']}" for u in b["luns"]) or "not exported"
    lines = [f"{b['backstore']}  [{luns}]  generation {b['generation']}  "
             f"APTPL {'on' if b['aptpl'] else 'off'}"]
    res = b["reservation"]
    if res is None:
        lines.append("  reservation: none")
    else:
        who = "every registrant (all-registrants type)" if res["holder"] is None else \
            f"key {res['key']} via {res['holder']['initiator']} -> {res['holder']['target_port']}"
        lines.append(f"  reservation: {res['type_name']} (type {res['type']}), held by {who}")
    if b.get("spc2_reservation"):
        s2 = b["spc2_reservation"]
        lines.append(f"  SPC-2 RESERVE held by {s2['initiator']} -> {s2['target_port']}")
    regs = b["registrations"]
    lines.append(f"  registrations ({len(regs)}):")
    for r in regs:
        mark = "  [holder]" if r["holder"] else ""
        lines.append(f"    {r['key']}  {r['initiator']} -> {r['target_port']}{mark}")
    if not live:
        lines.append("  (daemon not running: saved APTPL state)")
    return lines


@pr.command("ls")
@click.argument("backstore_name", metavar="[BACKSTORE]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def pr_ls(ctx: click.Context, backstore_name: str | None, as_json: bool) -> None:
    """Show registrations and reservations: live from the daemon, else the
    state saved for APTPL."""
    r = run_op(ctx, "pr_ls", {"backstore": backstore_name})
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for b in r["backstores"]:
        click.echo("\n".join(_pr_lines(b, r["live"])))


@pr.command("clear")
@click.argument("backstore_name", metavar="BACKSTORE")
@click.pass_context
def pr_clear(ctx: click.Context, backstore_name: str) -> None:
    """Remove every registration and reservation of BACKSTORE (live, and the
    saved APTPL state).  Registered initiators see RESERVATIONS PREEMPTED."""
    r = run_op(ctx, "pr_clear", {"backstore": backstore_name})
    before = r["cleared"]
    n = len(before["registrations"])
    held = " and its reservation" if before["reservation"] or before.get("spc2_reservation") \
        else ""
    click.echo(f"Backstore {r['backstore']}: cleared {n} registration{'s' if n != 1 else ''}"
               f"{held}.")


# -------------------------------------------------------------------- ls

@cli.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool) -> None:
    """Show the whole configuration tree (secrets are never shown)."""
    from storaged.control.render import config_tree, render_plain

    desc = run_op(ctx, "describe")
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    tree = config_tree(desc, f"storaged ({ctx.find_root().obj['dir']})")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.text import Text
        from rich.tree import Tree

        def build(node: Any, into: Tree) -> None:
            for child in node.children:
                build(child, into.add(Text(child.label)))

        rtree = Tree(Text(tree.label, style="bold"))
        build(tree, rtree)
        Console().print(rtree)
    else:
        click.echo(render_plain(tree))


# ---------------------------------------------------------------- config

@cli.group()
def config() -> None:
    """Save and restore the whole configuration as JSON."""


@config.command("save")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def config_save(ctx: click.Context, file: str) -> None:
    """Write the whole configuration (including CHAP secrets) to FILE, mode 0600.

    It holds every section: settings, backstores, targets, ALUA groups, RAID
    arrays, NFS exports and settings, the cluster configuration and this
    host's node id."""
    from storaged.control.backup import summary
    from storaged.state.config import write_json_atomic

    data = run_op(ctx, "export_config")
    try:
        write_json_atomic(file, data)
    except OSError as e:
        _fail(f"cannot write {file}: {e.strerror or e}")
    click.echo(f"Saved {summary(data)} to {file}.")


@config.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def config_restore(ctx: click.Context, file: str) -> None:
    """Replace the configuration with FILE; on any error nothing is changed."""
    from storaged.state import ValidationError
    from storaged.state.config import load_config_file

    try:
        data = load_config_file(file)
    except ValidationError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot read {file}: {e.strerror or e}")
    r = run_op(ctx, "import_config", {"data": data})
    click.echo(f"Restored {r['summary']} from {file}.")


# ---------------------------------------------------------- serve / demo

@cli.command("serve")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.pass_context
def serve(ctx: click.Context, metrics: str | None) -> None:
    """Run the daemon in the foreground with the stored configuration."""
    from storaged import daemon

    daemon.serve(ctx.find_root().obj["dir"], metrics=metrics)


@cli.command("demo")
@click.option("--dir", "demo_dir", metavar="DIR",
              help=f"State directory for the demo (default {DEMO_DIR}).")
@click.option("--iscsi", metavar="HOST:PORT", help="iSCSI portal for the demo target.")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.option("--nfs", metavar="HOST:PORT",
              help="NFS address for the demo export DIR/export (default 127.0.0.1:2049; "
                   "'off' disables).")
@click.option("--plain", is_flag=True,
              help="On first run, back the LUN with one sparse file instead of a RAID-5 "
                   "of four sparse members.")
@click.pass_context
def demo(ctx: click.Context, demo_dir: str | None, iscsi: str | None,
         metrics: str | None, nfs: str | None, plain: bool) -> None:
    """Run a self-contained demo target (creates its own state directory)."""
    from storaged import daemon

    root = ctx.find_root()
    directory = demo_dir
    if directory is None:
        source = root.get_parameter_source("directory")
        explicit = source not in (None, click.core.ParameterSource.DEFAULT)
        directory = root.params["directory"] if explicit else DEMO_DIR
    extra: dict = {} if nfs is None else {"nfs": None if nfs == "off" else nfs}
    if plain:
        extra["plain"] = True
    daemon.demo(directory, iscsi=iscsi or "127.0.0.1:3260", metrics=metrics, **extra)


cli.add_lazy("nfs", "storaged.nfs.cli:nfs")
cli.add_lazy("raid", "storaged.raid.cli:raid")
cli.add_lazy("cluster", "storaged.cluster.cli:cluster")
cli.add_lazy("lock", "storaged.cluster.lockcli:lock")
cli.add_lazy("alua", "storaged.cli_alua:alua")


def main() -> None:
    """Console-script entry point (``storaged``)."""
    cli(prog_name="storaged")


if __name__ == "__main__":
    main()
