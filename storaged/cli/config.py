"""``storaged ls`` and ``storaged config save|restore``: the whole configuration."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from storaged.cli.root import fail, run_op


@click.command("ls")
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

@click.group()
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
        fail(f"cannot write {file}: {e.strerror or e}")
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
        fail(str(e))
    except OSError as e:
        fail(f"cannot read {file}: {e.strerror or e}")
    r = run_op(ctx, "import_config", {"data": data})
    click.echo(f"Restored {r['summary']} from {file}.")
