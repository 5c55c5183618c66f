"""``storaged lab``: the cluster lab on this machine (network namespaces; root)."""

from __future__ import annotations

import os
import secrets
import sys
from typing import NoReturn

import click

DEFAULT_DIR = "./storaged-lab"


def _fail(message: str) -> NoReturn:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def _need_root() -> None:
    if os.geteuid() != 0:
        _fail("the lab needs root (network namespaces, FUSE mounts for other users)")


def _state(directory: str):
    from storaged.lab.shell import LabError, LabState
    st = LabState(directory)
    try:
        return st, st.spec()
    except LabError as e:
        _fail(str(e))


_dir_option = click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True,
                           type=click.Path(file_okay=False),
                           help="Where the lab keeps its state, node directories and image.")


@click.group()
def lab() -> None:
    """The cluster lab: storage and cluster nodes in network namespaces on this machine."""


@lab.command("up")
@click.option("--storage", type=int, default=2, show_default=True, help="Storage nodes.")
@click.option("--nodes", type=int, default=3, show_default=True,
              help="Cluster nodes (2: a two-node cluster, node c1 wins fence races).")
@_dir_option
@click.option("--id", "lab_id", default="", help="Name prefix (default: lab + a hash of DIR).")
@click.option("--subnet", default="10.250.0.0/24", show_default=True,
              help="Private network inside the namespaces.")
@click.option("--token-ms", type=int, default=1000, show_default=True,
              help="Cluster failure detection timeout (corosync's default is 3000).")
@click.option("--image-mib", type=int, default=64, show_default=True,
              help="Size of the shared LUN's image.")
def lab_up(storage: int, nodes: int, directory: str, lab_id: str, subnet: str, token_ms: int,
           image_mib: int) -> None:
    """Build the lab: namespaces on a bridge, storage daemons exporting one shared LUN,
    cluster nodes (membership + DLM + fence_storaged) each mounting the shared filesystem."""
    from storaged.lab.plan import LabSpec
    from storaged.lab.shell import LabError, default_fence_agent, default_python
    from storaged.lab.shell import lab_up as up

    _need_root()
    try:
        spec = LabSpec(directory, storage=storage, nodes=nodes, lab_id=lab_id, subnet=subnet,
                       token_ms=token_ms, image_mib=image_mib, python=default_python(),
                       fence_agent=default_fence_agent())
    except ValueError as e:
        _fail(str(e))
    try:
        up(spec, secrets.token_urlsafe(18), lambda s: click.echo(f"  {s}"))
    except LabError as e:
        _fail(str(e))
    click.echo(f"lab {spec.lab_id} is up in {spec.directory}: "
               f"{storage} storage node(s), {nodes} cluster node(s)")
    click.echo(f"  storaged lab status --dir {directory}")
    click.echo(f"  storaged lab exec --dir {directory} c1 -- ls -l "
               f"{spec.mountpoint(spec.cluster_nodes[0])}")
    click.echo(f"  storaged lab down --dir {directory}")


@lab.command("down")
@_dir_option
@click.option("--id", "lab_id", default=None,
              help="Also sweep namespaces named ID-* (when DIR's state is gone).")
def lab_down(directory: str, lab_id: str | None) -> None:
    """Remove every namespace, mount, process and file the lab made (also after a crash)."""
    from storaged.lab.shell import LabError
    from storaged.lab.shell import lab_down as down

    _need_root()
    try:
        n = down(directory, lambda s: click.echo(f"  {s}"), lab_id=lab_id)
    except LabError as e:
        _fail(str(e))
    click.echo(f"lab in {os.path.abspath(directory)} removed ({n} steps)")


@lab.command("status")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lab_status(directory: str, as_json: bool) -> None:
    """Draw the lab: nodes, addresses, processes, quorum, fenced nodes, mounts."""
    from storaged.lab.render import status_json, status_table

    st, spec = _state(directory)
    if as_json:
        import json
        click.echo(json.dumps(status_json(spec, st.resources()), indent=2))
        return
    from rich.console import Console
    Console().print(status_table(spec, st.resources()))


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@_dir_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(directory: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE's network namespace (files and mounts are the host's):
    storaged lab exec c1 -- ip addr."""
    _need_root()
    _st, spec = _state(directory)
    try:
        n = spec.node(node)
    except KeyError as e:
        _fail(str(e.args[0]))
    argv = spec.in_netns(n.netns, list(command))
    os.execvp(argv[0], list(argv))


@lab.group("scenario")
def scenario() -> None:
    """Failure stories with a timeline: split-brain, failover."""


@scenario.command("split-brain")
@_dir_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Also write the timeline and figures to this JSON file.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def scenario_split_brain(directory: str, json_out: str | None, timeout: float) -> None:
    """Two-node cluster: cut the link between c1 and c2 (both keep the storage);
    exactly one side survives (c1: the other's fence waits for its delay)."""
    from storaged.lab.scenario import ScenarioError, split_brain

    _need_root()
    st, spec = _state(directory)
    try:
        result = split_brain(spec, st, click.echo, timeout=timeout)
    except ScenarioError as e:
        _fail(str(e))
    _finish(result, json_out)


@scenario.command("failover")
@_dir_option
@click.option("--acks", type=click.Path(file_okay=False), default=None,
              help="Directory for the writers' acknowledged-write logs "
                   "(default: DIR.acks, beside the lab, not in it).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Also write the timeline and figures to this JSON file.")
@click.option("--victim", default="", help="Cluster node to cut off (default: the last).")
@click.option("--seconds", type=float, default=3.0, show_default=True,
              help="How long writers run before the cut.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def scenario_failover(directory: str, acks: str | None, json_out: str | None, victim: str,
                      seconds: float, timeout: float) -> None:
    """Writers on every node; one node is cut off, fenced at the SAN, its journal
    replayed by a survivor; then every acknowledged write is checked on the LUN."""
    from storaged.lab.scenario import ScenarioError, failover

    _need_root()
    st, spec = _state(directory)
    ack_dir = acks or spec.directory.rstrip("/") + ".acks"
    try:
        result = failover(spec, st, click.echo, ack_dir=ack_dir, victim=victim,
                          seconds=seconds, timeout=timeout)
    except ScenarioError as e:
        _fail(str(e))
    _finish(result, json_out)


def _finish(result, json_out: str | None) -> None:
    if json_out:
        import json
        with open(json_out, "w") as f:
            json.dump(result.as_dict(), f, indent=2)
    if not result.ok:
        _fail(f"scenario {result.name}: {result.verdict}")
    click.echo(f"scenario {result.name}: {result.verdict}")


@lab.command("check")
@_dir_option
@click.option("--acks", type=click.Path(file_okay=False), required=True,
              help="The writers' acknowledged-write logs.")
@click.option("--via", default="", help="Node whose namespace reads the LUN through the "
                                         "floating portal address (default: its holder).")
def lab_check(directory: str, acks: str, via: str) -> None:
    """Read the shared LUN over iSCSI and verify every acknowledged write."""
    import subprocess

    _need_root()
    _st, spec = _state(directory)
    try:
        from storaged.lab.shell import vip_holders
        holders = [] if via else vip_holders(spec)
        node = spec.node(via or (holders[0] if holders else spec.storage_nodes[0].name))
    except KeyError as e:
        _fail(str(e.args[0]))
    from storaged.lab.plan import shared_lun_url
    argv = spec.in_netns(node.netns, [spec.python, "-m", "storaged.lab.check",
                                      shared_lun_url(spec, "iqn.2026-11.org.storaged.lab:check"),
                                      acks])
    sys.exit(subprocess.call(argv))
