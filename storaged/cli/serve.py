"""``storaged serve`` and ``storaged demo``: run the daemon in the foreground."""

from __future__ import annotations

import click

from storaged.cli.root import DEMO_DIR


@click.command("serve")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.pass_context
def serve(ctx: click.Context, metrics: str | None) -> None:
    """Run the daemon in the foreground with the stored configuration."""
    from storaged import daemon

    daemon.serve(ctx.find_root().obj["dir"], metrics=metrics)


@click.command("demo")
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
