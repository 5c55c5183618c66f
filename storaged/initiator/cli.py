"""The initiator's CLI verbs under ``storaged iscsi`` (libiscsi's tools as the model).

* ``storaged iscsi discover PORTAL``: SendTargets through a discovery session.
* ``storaged iscsi inq URL``: log in and show the LU (INQUIRY, VPD 83h, capacity).
* ``storaged iscsi dd --if SRC --of DST``: copy a file to or from an iscsi:// URL.
"""

from __future__ import annotations

import asyncio
import os

import click

from storaged.cli.root import fail


def _open(url: str):
    from storaged.block.base import BlockDeviceError
    from storaged.initiator.device import RemoteBlockDevice

    try:
        return RemoteBlockDevice(url)
    except (BlockDeviceError, ValueError) as e:
        fail(f"{url.split('@')[-1]}: {e}")


@click.command()
@click.argument("portal")
@click.option("--initiator", "initiator_name", default=None, help="Our initiator IQN.")
@click.option("--user", default=None, help="CHAP user for the discovery session.")
@click.option("--password", default=None, help="CHAP secret for the discovery session.")
def discover(portal: str, initiator_name: str | None, user: str | None,
             password: str | None) -> None:
    """List the targets a portal (host[:port]) offers (SendTargets)."""
    from storaged.initiator import session as s
    from storaged.initiator.client import IscsiClient, IscsiError

    host, port = s.parse_target_address(portal.removeprefix("iscsi://").rstrip("/"))
    opts = s.LoginOptions(target_name=None, user=user, password=password)
    if initiator_name:
        opts.initiator_name = initiator_name

    async def run() -> list[tuple[str, list[str]]]:
        c = IscsiClient(host, port, opts)
        await c.connect()
        try:
            return await c.send_targets()
        finally:
            await c.close()

    try:
        found = asyncio.run(run())
    except (IscsiError, OSError) as e:
        fail(f"discovery at {host}:{port}: {e}")
    for name, addrs in found:
        for addr in addrs or [f"{host}:{port}"]:
            click.echo(f"{addr} {name}")


@click.command()
@click.argument("url")
def inq(url: str) -> None:
    """Log in to URL and describe the LU."""
    dev = _open(url)
    try:
        p = dev.client.params
        click.echo(f"Vendor: {dev.vendor}")
        click.echo(f"Product: {dev.product}")
        click.echo(f"Identity: {dev.identity}")
        click.echo(f"Block size: {dev.block_size}")
        click.echo(f"Capacity: {dev.size} bytes ({dev.blocks} blocks)")
        click.echo(f"Digests: header {p['HeaderDigest']}, data {p['DataDigest']}")
    finally:
        dev.close()


@click.command()
@click.option("--if", "src", required=True, help="Source: a file or an iscsi:// URL.")
@click.option("--of", "dst", required=True, help="Destination: a file or an iscsi:// URL.")
@click.option("--bs", default=1 << 20, show_default=True, help="Bytes per I/O.")
@click.option("--count", type=int, default=None, help="Copy this many bytes at most.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def dd(src: str, dst: str, bs: int, count: int | None, progress: bool) -> None:
    """Copy a file to a remote LUN or a remote LUN to a file."""
    from rich.progress import BarColumn, Progress, TransferSpeedColumn

    from storaged.block.base import BlockDeviceError

    remote_in, remote_out = src.startswith("iscsi://"), dst.startswith("iscsi://")
    if remote_in == remote_out:
        fail("exactly one of --if and --of must be an iscsi:// URL")
    dev = _open(src if remote_in else dst)
    try:
        if bs % dev.block_size:
            fail(f"--bs must be a multiple of the LUN's block size {dev.block_size}")
        if remote_in:
            total = dev.size if count is None else min(count, dev.size)
            fobj = open(dst, "wb")  # noqa: SIM115 - closed below
        else:
            try:
                fobj = open(src, "rb")  # noqa: SIM115 - closed below
            except OSError as e:
                fail(f"{src}: {e.strerror}")
            size = os.fstat(fobj.fileno()).st_size
            total = size if count is None else min(count, size)
            if total > dev.size:
                fail(f"{src} ({total} bytes) does not fit the LUN ({dev.size} bytes)")
        with fobj, Progress(*Progress.get_default_columns()[:3], BarColumn(),
                            TransferSpeedColumn(), disable=not progress) as bar:
            task = bar.add_task("copy", total=total)
            off = 0
            while off < total:
                n = min(bs, total - off)
                if remote_in:
                    fobj.write(dev.read(off, -(-n // dev.block_size) * dev.block_size)[:n])
                else:
                    chunk = fobj.read(n)
                    pad = -len(chunk) % dev.block_size
                    dev.write(off, chunk + bytes(pad))
                off += n
                bar.update(task, completed=off)
            if remote_out:
                dev.flush()
    except BlockDeviceError as e:
        fail(str(e))
    finally:
        dev.close()
    click.echo(f"{total} bytes copied", err=True)
