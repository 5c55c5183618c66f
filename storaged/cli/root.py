"""The ``storaged`` root command, and what every area's verbs share.

Every admin verb goes to the running daemon over its control socket
(``<dir>/control.sock``) so the change is applied live; when no daemon is
running it opens the LMDB store directly.  Both paths run the same
``storaged.control.ops`` operation, so validation and messages are identical.
Errors print ``storaged: error: ...`` and exit 1 with nothing changed; bad
arguments are usage errors (exit 2).

Each area's command group lives in its own module and is imported only when
used (:class:`~storaged.cli.lazy.LazyGroup`): ``storaged lock run`` starts
without loading the control operations, RAID or NFS.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from storaged import __version__
from storaged.cli.lazy import LazyGroup

DEFAULT_DIR = "/var/lib/storaged"
DEMO_DIR = "./storaged-demo"
SOCKET_NAME = "control.sock"


def socket_path(directory: str) -> str:
    """The control socket of the state directory ``directory``."""
    return os.path.join(directory, SOCKET_NAME)


def fail(message: str) -> NoReturn:
    """Print ``storaged: error: MESSAGE`` and exit 1."""
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
        fail(str(e))


def op_command(group: click.Group, name: str, op: str,
               done: Callable[[Any, dict[str, Any]], str] | None = None,
               args: Callable[[dict[str, Any]], dict[str, Any]] | None = None
               ) -> Callable[[Callable[..., None]], click.Command]:
    """Make a click command of ``group`` that runs control operation ``op``.

    The decorated function only carries the click parameters and the help
    text.  ``args`` turns the parameters into the operation's arguments (by
    default they are passed as they are); ``done(result, params)`` gives the
    line printed on success.  Verbs are thin this way: what a verb does is
    the operation's, the same live and offline.
    """
    def deco(fn: Callable[..., None]) -> click.Command:
        @functools.wraps(fn)
        @click.pass_context
        def callback(ctx: click.Context, **params: Any) -> None:
            result = run_op(ctx, op, args(params) if args else params)
            if done is not None:
                click.echo(done(result, params))

        return group.command(name)(callback)
    return deco


def pairs(values: tuple[str, ...]) -> dict[str, str]:
    """``("a=1", "b=")`` -> ``{"a": "1", "b": ""}``; anything else is a usage error."""
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
    """storaged: iSCSI, RAID, NFS and cluster storage server administration."""
    ctx.obj = {"dir": directory}


#: Every command group: name -> "module:attribute", imported on first use.
GROUPS: dict[str, str] = {
    # iSCSI target verbs, at the top level (targetcli-like) and under `storaged iscsi`
    "iscsi": "storaged.cli.iscsi:iscsi",
    "backstore": "storaged.cli.iscsi:backstore",
    "target": "storaged.cli.iscsi:target",
    "lun": "storaged.cli.iscsi:lun",
    "portal": "storaged.cli.iscsi:portal",
    "acl": "storaged.cli.iscsi:acl",
    "chap": "storaged.cli.iscsi:chap",
    "settings": "storaged.cli.iscsi:settings",
    "pr": "storaged.cli.iscsi:pr",
    "alua": "storaged.cli.alua:alua",
    "ls": "storaged.cli.config:ls",
    "config": "storaged.cli.config:config",
    "serve": "storaged.cli.serve:serve",
    "demo": "storaged.cli.serve:demo",
    "nfs": "storaged.nfs.cli:nfs",
    "raid": "storaged.raid.cli:raid",
    "cluster": "storaged.cluster.cli:cluster",
    "lock": "storaged.cluster.lockcli:lock",
    "fs": "storaged.clusterfs.cli:fs",
    "fence": "storaged.cli.fence:fence",
    "mgmt": "storaged.cli.fence:mgmt",
    "ocf": "storaged.ocf.cli:ocf",
    "lb": "storaged.lb.cli:lb",
    "lab": "storaged.lab.cli:lab",
    "vip": "storaged.vip.cli:vip",
}
for _name, _target in GROUPS.items():
    cli.add_lazy(_name, _target)


def main() -> None:
    """Console-script entry point (``storaged``)."""
    cli(prog_name="storaged")
