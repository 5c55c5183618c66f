"""iSCSI target verbs: backstores, targets, LUNs, portals, ACLs, CHAP, settings, PR.

They exist twice: at the top level (``storaged target create``, as admins
of targetcli expect) and under ``storaged iscsi`` like the other areas'
groups (``storaged iscsi target create``).  Most verbs are one
:func:`~storaged.cli.root.op_command` each: parameters in, one control
operation, one line out.
"""

from __future__ import annotations

import json
from typing import Any

import click

from storaged.block.open import normalize
from storaged.cli.lazy import LazyGroup
from storaged.cli.root import fail, op_command, pairs, run_op


def backstore_label(b: dict[str, Any]) -> str:
    """One-line backstore description (storaged.control.render, imported on use)."""
    from storaged.control.render import backstore_label as label

    return label(b)


def _size_text(b: dict[str, Any]) -> str:
    from storaged.control.ops import format_size

    return format_size(b["size"]) if b["size"] else "whole device"


# ------------------------------------------------------------- backstore

@click.group()
def backstore() -> None:
    """Files and block devices that back LUNs."""


@op_command(backstore, "create", "backstore_create",
            done=lambda b, _: f"Created backstore {b['name']} ({b['kind']} {b['path']}, "
                              f"{_size_text(b)}).",
            args=lambda p: {"name": p["name"], "path": normalize(p["path"]),
                            "size": p["size"], "block_size": int(p["block_size"]),
                            "read_only": p["read_only"], "wce": not p["no_write_cache"],
                            "direct": p["direct"], "shared": p["shared"]})
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
@click.option("--shared", is_flag=True,
              help="Served by several storage nodes of the cluster (same backing storage): "
                   "persistent reservations are kept cluster-wide (docs/ha.md).")
def backstore_create() -> None:
    """Register PATH (file, block device or iscsi:// URL of another storage node's
    LUN) as backstore NAME; creates a missing file."""


@op_command(backstore, "delete", "backstore_delete",
            done=lambda _, p: f"Deleted backstore {p['name']}.")
@click.argument("name")
def backstore_delete() -> None:
    """Forget backstore NAME (its file is kept)."""


@op_command(backstore, "set", "backstore_set", done=lambda b, _: backstore_label(b),
            args=lambda p: {**p, "direct": None if p["direct"] is None else p["direct"] == "on"})
@click.argument("name")
@click.option("--read-only/--read-write", default=None, help="Write-protect the LUNs.")
@click.option("--online/--offline", default=None,
              help="Offline LUNs answer NOT READY to media access.")
@click.option("--write-cache/--no-write-cache", "wce", default=None,
              help="Acknowledge writes from the page cache (WCE=1) or only once durable.")
@click.option("--direct", type=click.Choice(["on", "off"]), default=None,
              help="O_DIRECT on or off: bypass the host page cache.")
@click.option("--shared/--not-shared", default=None,
              help="Keep persistent reservations with the cluster's other storage nodes "
                   "serving this backstore (docs/ha.md).")
def backstore_set() -> None:
    """Change flags of backstore NAME (live when the daemon runs)."""


@op_command(backstore, "resize", "backstore_resize", done=lambda b, _: backstore_label(b))
@click.argument("name")
@click.argument("size")
def backstore_resize() -> None:
    """Grow file backstore NAME to SIZE (e.g. 20G); initiators see the new capacity."""


@backstore.command("ls")
@click.pass_context
def backstore_ls(ctx: click.Context) -> None:
    """List backstores."""
    for b in run_op(ctx, "describe")["backstores"]:
        click.echo(backstore_label(b))


# ---------------------------------------------------------------- target

@click.group()
def target() -> None:
    """iSCSI targets."""


@op_command(target, "create", "target_create",
            done=lambda t, _: f"Created target {t['iqn']} on "
                              f"{', '.join(t['portals']) or 'no portals'}.",
            args=lambda p: {"iqn": p["iqn"], "portals": list(p["portals"]) or None})
@click.argument("iqn")
@click.option("--portal", "portals", multiple=True, metavar="IP:PORT",
              help="Listening portal (repeatable); default from settings (0.0.0.0:3260).")
def target_create() -> None:
    """Create target IQN."""


@op_command(target, "delete", "target_delete", done=lambda r, _: f"Deleted target {r['deleted']}.")
@click.argument("iqn")
def target_delete() -> None:
    """Delete target IQN with its LUN map, ACLs and CHAP (backstores are kept)."""


@op_command(target, "open", "target_open", done=lambda t, _: f"Target {t['iqn']}: open access.",
            args=lambda p: {**p, "open": True})
@click.argument("iqn")
def target_open() -> None:
    """Let any initiator log in (like targetcli generate_node_acls=1)."""


@op_command(target, "close", "target_open",
            done=lambda t, _: f"Target {t['iqn']}: ACL-only access.",
            args=lambda p: {**p, "open": False})
@click.argument("iqn")
def target_close() -> None:
    """Only initiators with an ACL entry may log in."""


def _params_done(t: dict[str, Any], _: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "defaults"
    return f"Target {t['iqn']}: params {shown}; queue_depth={t['queue_depth']}."


@op_command(target, "set", "params_set", done=_params_done,
            args=lambda p: {"iqn": p["iqn"], "params": pairs(p["pairs"])})
@click.argument("iqn")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
def target_set() -> None:
    """Set iSCSI parameters (e.g. MaxBurstLength=1048576), queue_depth or tpgt; KEY= resets."""


# ------------------------------------------------------------------- lun

@click.group()
def lun() -> None:
    """LUN mapping of backstores into targets."""


@op_command(lun, "add", "lun_add",
            done=lambda r, _: f"Target {r['iqn']}: lun{r['lun']} -> {r['backstore']}.",
            args=lambda p: {"iqn": p["iqn"], "backstore": p["backstore_name"],
                            "lun": p["lun_id"]})
@click.argument("iqn")
@click.argument("backstore_name", metavar="BACKSTORE")
@click.option("--lun", "lun_id", type=click.IntRange(0, 16383), help="LUN id (default: next free).")
def lun_add() -> None:
    """Export BACKSTORE as a LUN of target IQN."""


@op_command(lun, "remove", "lun_remove",
            done=lambda r, _: f"Target {r['iqn']}: removed lun{r['lun']} ({r['backstore']}).",
            args=lambda p: {"iqn": p["iqn"], "lun": p["lun_id"]})
@click.argument("iqn")
@click.argument("lun_id", metavar="N", type=click.IntRange(0, 16383))
def lun_remove() -> None:
    """Unmap LUN N from target IQN."""


# ---------------------------------------------------------------- portal

@click.group()
def portal() -> None:
    """Addresses a target listens on."""


@op_command(portal, "add", "portal_add",
            done=lambda t, _: f"Target {t['iqn']}: portals {', '.join(t['portals'])}.",
            args=lambda p: {"iqn": p["iqn"], "portal": p["address"]})
@click.argument("iqn")
@click.argument("address", metavar="IP:PORT")
def portal_add() -> None:
    """Add a portal (IPv4 ip:port or [IPv6]:port; port defaults to 3260)."""


@op_command(portal, "remove", "portal_remove",
            done=lambda t, _: f"Target {t['iqn']}: portals {', '.join(t['portals']) or 'none'}.",
            args=lambda p: {"iqn": p["iqn"], "portal": p["address"]})
@click.argument("iqn")
@click.argument("address", metavar="IP:PORT")
def portal_remove() -> None:
    """Remove a portal."""


# ------------------------------------------------------------------- acl

@click.group()
def acl() -> None:
    """Initiators allowed to log in."""


@op_command(acl, "add", "acl_add",
            done=lambda t, p: f"Target {t['iqn']}: added ACL for {p['initiator'].lower()}.")
@click.argument("iqn")
@click.argument("initiator")
def acl_add() -> None:
    """Allow INITIATOR to log in to target IQN."""


@op_command(acl, "remove", "acl_remove",
            done=lambda t, p: f"Target {t['iqn']}: removed ACL for {p['initiator'].lower()}.")
@click.argument("iqn")
@click.argument("initiator")
def acl_remove() -> None:
    """Remove INITIATOR's ACL entry (and its CHAP credentials)."""


# ------------------------------------------------------------------ chap

def _secret(value: str | None, path: str | None, prompt: str, option: str) -> str:
    if value is not None and path is not None:
        raise click.UsageError(f"give either --{option} or --{option}-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            fail(f"cannot read {path}: {e.strerror}")
    if value is not None:
        return value
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


@click.group()
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


def _where(p: dict[str, Any]) -> str:
    return f"initiator {p['initiator'].lower()}" if p["initiator"] else "target-wide"


@op_command(chap, "clear", "chap_clear",
            done=lambda t, p: f"Target {t['iqn']}: CHAP cleared ({_where(p)}).")
@click.argument("iqn")
@click.option("--initiator", help="Clear this ACL entry's CHAP instead of the target-wide one.")
def chap_clear() -> None:
    """Remove CHAP credentials."""


# -------------------------------------------------------------- settings

@click.group()
def settings() -> None:
    """Global defaults (nop_interval, nop_timeout, default_portal)."""


@op_command(settings, "set", "settings_set",
            done=lambda s, _: "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ".",
            args=lambda p: {"values": pairs(p["pairs"])})
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
def settings_set() -> None:
    """Change global settings."""


# -------------------------------------------------------------------- pr

@click.group()
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
    shared = b.get("shared")
    if shared is not None:
        lines.append(f"  shared with the cluster's storage nodes: change {b.get('seq', 0)}, "
                     + ("in step" if shared["synced"] else "NOT caught up yet (PR IN refused)"))
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


# ------------------------------------------------------------ storaged iscsi

@click.group(cls=LazyGroup)
def iscsi() -> None:
    """iSCSI: the target's backstores, targets, LUNs, portals, ACLs, CHAP and PR;
    the initiator's discover, inq and dd."""


for _group in (backstore, target, lun, portal, acl, chap, settings, pr):
    iscsi.add_command(_group)
# The initiator's verbs (storaged.initiator.cli).
for _verb in ("discover", "inq", "dd"):
    iscsi.add_lazy(_verb, f"storaged.initiator.cli:{_verb}")
