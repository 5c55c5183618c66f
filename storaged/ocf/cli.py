"""``storaged ocf install``: put the OCF resource agents where pacemaker looks."""

from __future__ import annotations

import os
import sys

import click

from storaged.cli.root import fail

OCF_DIR = "/usr/lib/ocf/resource.d/storaged"
AGENTS = {"storaged": "storaged.ocf.daemon_ra", "vip": "storaged.ocf.vip_ra",
          "clusterfs": "storaged.ocf.clusterfs_ra"}


def stub(name: str, module: str) -> str:
    """A /bin/sh agent: meta-data answered by the shell itself (pacemaker and
    ocf-tester ask for it as any user, who may not reach this Python), every
    other action run by this Python."""
    import importlib

    meta = importlib.import_module(module).METADATA
    return (f"#!/bin/sh\n# ocf:storaged:{name}, installed by 'storaged ocf install'\n"
            f'case "$1" in\nmeta-data|metadata)\n'
            f"cat <<'STORAGED_OCF_METADATA'\n{meta}STORAGED_OCF_METADATA\nexit 0;;\nesac\n"
            f'exec {sys.executable} -m {module} "$@"\n')


@click.group()
def ocf() -> None:
    """OCF resource agents for pacemaker."""


@ocf.command("install")
@click.option("--dir", "directory", default=OCF_DIR, show_default=True,
              help="Provider directory (pacemaker looks in /usr/lib/ocf/resource.d/<provider>).")
@click.option("--remove", is_flag=True, help="Remove the agents installed there instead.")
@click.option("--agent", "agents", multiple=True, type=click.Choice(sorted(AGENTS)),
              help="Only this agent (repeatable; default: all of them).")
def ocf_install(directory: str, remove: bool, agents: tuple[str, ...]) -> None:
    """Install the agents (a stub running this Python) as ocf:storaged:<agent>."""
    try:
        for name, module in AGENTS.items():
            if agents and name not in agents:
                continue
            path = os.path.join(directory, name)
            if remove:
                if os.path.exists(path):
                    os.unlink(path)
                    click.echo(f"Removed {path}.")
                continue
            os.makedirs(directory, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(stub(name, module))
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            click.echo(f"Installed {path}.")
        if remove and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
    except OSError as e:
        fail(f"cannot {'remove' if remove else 'install'} in {directory}: {e.strerror or e}")
