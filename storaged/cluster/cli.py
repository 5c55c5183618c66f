"""``storaged cluster ...`` and ``storaged lock ...`` commands.

The cluster configuration lives in the state store (``--dir``); the node
process (``storaged cluster node``) runs membership and the DLM, and the
other commands talk to it over ``<dir>/cluster.sock``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import click
import zmq

from storaged.cluster.client import NodeClient, NodeError, socket_path
from storaged.cluster.config import (
    FENCERS,
    MEMBERSHIP_PROVIDERS,
    NO_QUORUM_POLICIES,
    ClusterConfig,
    LocalNode,
    NodeEntry,
)
from storaged.state import StateError, Store, ValidationError

DEFAULT_PORT = 7870


def _fail(message: str) -> NoReturn:
    click.echo(f"storaged: error: {message}", err=True)
    sys.exit(1)


def _dir(ctx: click.Context) -> str:
    return ctx.find_root().obj["dir"]


def _address(text: str) -> str:
    return text if text.rsplit(":", 1)[-1].isdigit() and ":" in text else f"{text}:{DEFAULT_PORT}"


def _parse_node(text: str) -> tuple[int, NodeEntry]:
    """``ID=ADDRESS[:PORT][/VOTES]``."""
    nid, sep, rest = text.partition("=")
    if not sep or not nid.strip().isdigit():
        raise click.BadParameter(f"expected ID=ADDRESS[:PORT][/VOTES], got {text!r}")
    addr, _, votes = rest.partition("/")
    return int(nid), NodeEntry(_address(addr.strip()), int(votes) if votes else 1)


def load(directory: str) -> tuple[ClusterConfig, int]:
    """The stored cluster config and local node id; exits with an error if missing."""
    try:
        with Store(directory) as store, store.read() as txn:
            cfg = txn.get(ClusterConfig, ClusterConfig.KEY)
            local = txn.get(LocalNode, LocalNode.KEY)
    except (StateError, ValidationError) as e:
        _fail(str(e))
    if cfg is None or local is None:
        _fail(f"no cluster configured in {directory}: run 'storaged cluster init' or "
              "'storaged cluster join' first")
    return cfg, local.node_id


def save(directory: str, cfg: ClusterConfig, node_id: int | None = None) -> None:
    """Store ``cfg`` (and the local node id) in one transaction."""
    try:
        with Store(directory) as store, store.write() as txn:
            txn.put(cfg)
            if node_id is not None:
                txn.put(LocalNode(node_id))
    except (StateError, ValidationError) as e:
        _fail(str(e))


@click.group()
def cluster() -> None:
    """Cluster membership, quorum and fencing (the node runs the DLM)."""


@cluster.command("init")
@click.argument("name")
@click.option("--node", "nodes", multiple=True, required=True, metavar="ID=ADDR[:PORT][/VOTES]",
              help=f"A cluster node (repeatable); port defaults to {DEFAULT_PORT}.")
@click.option("--id", "node_id", type=int, required=True, help="This host's node id.")
@click.option("--token-ms", type=int, default=3000, show_default=True,
              help="Failure detection timeout.")
@click.option("--consensus-ms", type=int, default=0, help="View change timeout (0: 1.2 x token).")
@click.option("--heartbeat-ms", type=int, default=0, help="Heartbeat interval (0: token / 5).")
@click.option("--expected-votes", type=int, default=0, help="0: sum of all nodes' votes.")
@click.option("--two-node", is_flag=True, help="Two-node cluster (implies --wait-for-all).")
@click.option("--wait-for-all", is_flag=True, help="First quorum only once all nodes were seen.")
@click.option("--no-quorum-policy", type=click.Choice(NO_QUORUM_POLICIES), default="stop",
              show_default=True, help="What the DLM does without quorum.")
@click.option("--fencer", type=click.Choice(FENCERS), default="manual", show_default=True)
@click.option("--fence-command", help="Command for --fencer command (node id is appended).")
@click.option("--membership", type=click.Choice(MEMBERSHIP_PROVIDERS), default="storaged",
              show_default=True,
              help="Membership and quorum from storaged's heartbeats or from the local "
                   "corosync (node ids must be corosync's).")
@click.option("--lockspace", "lockspaces", multiple=True, help="Lockspace (default: default).")
@click.option("--skew-warn-ms", type=int, default=1000, show_default=True,
              help="Warn when a peer's clock differs by more than this.")
@click.option("--clock-warn-ms", type=int, default=1000, show_default=True,
              help="Warn when a node's kernel clock is unsynchronized or its maxerror "
                   "exceeds this.")
@click.pass_context
def cluster_init(ctx: click.Context, name: str, nodes: tuple[str, ...], node_id: int,
                 token_ms: int, consensus_ms: int, heartbeat_ms: int, expected_votes: int,
                 two_node: bool, wait_for_all: bool, no_quorum_policy: str, fencer: str,
                 fence_command: str | None, membership: str, lockspaces: tuple[str, ...],
                 skew_warn_ms: int, clock_warn_ms: int) -> None:
    """Create cluster NAME in this state directory (copy the same command to every node,
    changing --id, or use 'storaged cluster join')."""
    entries = dict(_parse_node(n) for n in nodes)
    cfg = ClusterConfig(
        name=name, nodes=entries, token_ms=token_ms, consensus_ms=consensus_ms,
        heartbeat_ms=heartbeat_ms, expected_votes=expected_votes, two_node=two_node,
        wait_for_all=wait_for_all, no_quorum_policy=no_quorum_policy, fencer=fencer,
        fence_command=fence_command.split() if fence_command else [],
        lockspaces=list(lockspaces) or ["default"], skew_warn_ms=skew_warn_ms,
        clock_warn_ms=clock_warn_ms, membership=membership)
    if node_id not in entries:
        _fail(f"--id {node_id} is not one of the --node ids")
    save(_dir(ctx), cfg, node_id)
    click.echo(f"Cluster {name}: {len(entries)} node(s), this is node {node_id}.")


@cluster.command("fencing")
@click.option("--fencer", type=click.Choice(FENCERS), default=None)
@click.option("--agent", default=None, metavar="AGENT",
              help="fence-agents agent for --fencer agent (e.g. fence_storaged).")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
              help="An option passed to the agent on stdin (repeatable; NAME= removes one).")
@click.option("--delay-ms", type=int, default=None, help="Static delay before any fence.")
@click.option("--delay-max-ms", type=int, default=None,
              help="Random extra delay 0..N ms before fencing (like pcmk_delay_max).")
@click.option("--node-name", "node_names", multiple=True, metavar="ID=NAME",
              help="The name fence agents know node ID by (pacemaker's plug).")
@click.option("--node-delay-ms", "node_delays", multiple=True, metavar="ID=MS",
              help="Static delay before node ID is fenced (like pcmk_delay_base).")
@click.pass_context
def cluster_fencing(ctx: click.Context, fencer: str | None, agent: str | None,
                    options: tuple[str, ...], delay_ms: int | None, delay_max_ms: int | None,
                    node_names: tuple[str, ...], node_delays: tuple[str, ...]) -> None:
    """Configure how this node fences others (run the same on every node)."""
    directory = _dir(ctx)
    cfg, node_id = load(directory)
    if fencer is not None:
        cfg.fencer = fencer
    if agent is not None:
        cfg.fence_agent = agent
    for item in options:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _fail(f"--option expects NAME=VALUE, got {item!r}")
        if v:
            cfg.fence_options[k.strip()] = v
        else:
            cfg.fence_options.pop(k.strip(), None)
    if delay_ms is not None:
        cfg.fence_delay_ms = delay_ms
    if delay_max_ms is not None:
        cfg.fence_delay_max_ms = delay_max_ms
    for items, attr in ((node_names, "name"), (node_delays, "fence_delay_ms")):
        for item in items:
            k, sep, v = item.partition("=")
            if not sep or not k.strip().isdigit() or int(k) not in cfg.nodes:
                _fail(f"expected ID=VALUE with a node id of the cluster, got {item!r}")
            if attr == "fence_delay_ms":
                if not v.strip().isdigit():
                    _fail(f"node delay must be milliseconds, got {v!r}")
                setattr(cfg.nodes[int(k)], attr, int(v))
            else:
                setattr(cfg.nodes[int(k)], attr, v.strip())
    cfg.version += 1
    try:
        cfg.validate()
    except ValidationError as e:
        _fail(str(e))
    save(directory, cfg, node_id)
    click.echo(f"Fencer {cfg.fencer}" + (f" ({cfg.fence_agent})" if cfg.fencer == "agent"
                                        else "") + f", config version {cfg.version}.")


@cluster.command("join")
@click.option("--peer", required=True, metavar="ADDR:PORT", help="A running member.")
@click.option("--id", "node_id", type=int, required=True, help="This host's node id.")
@click.option("--address", metavar="ADDR[:PORT]", help="This node's address if it is new.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def cluster_join(ctx: click.Context, peer: str, node_id: int, address: str | None,
                 timeout: float) -> None:
    """Fetch the cluster config from a running member (adding this node if it is new)."""
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{_address(peer)}")
        sock.send(json.dumps({"t": "cfgreq", "id": node_id,
                              "address": _address(address) if address else None}).encode())
        if not sock.poll(int(timeout * 1000)):
            _fail(f"no answer from {peer} within {timeout:g}s")
        reply = json.loads(sock.recv())
    finally:
        sock.close(0)
        zctx.term()
    if not reply.get("ok"):
        _fail(reply.get("error", "join refused"))
    cfg = ClusterConfig.from_dict(reply["config"])
    save(_dir(ctx), cfg, node_id)
    click.echo(f"Joined cluster {cfg.name} as node {node_id} "
               f"({len(cfg.nodes)} nodes, config version {cfg.version}).")


@cluster.command("node")
@click.option("--test-hooks", is_flag=True, hidden=True, help="Enable test-only operations.")
@click.pass_context
def cluster_node(ctx: click.Context, test_hooks: bool) -> None:
    """Run this host's cluster node (membership + DLM) in the foreground."""
    directory = _dir(ctx)
    cfg, node_id = load(directory)
    logging.basicConfig(level=os.environ.get("STORAGED_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        asyncio.run(run_node(directory, cfg, node_id, test_hooks=test_hooks))
    except RuntimeError as e:  # e.g. membership corosync without a corosync here
        _fail(str(e))


async def run_node(directory: str, cfg: ClusterConfig, node_id: int, *,
                   test_hooks: bool = False) -> None:
    """Run a node until SIGINT/SIGTERM or a clean leave."""
    from storaged.cluster.node import ClusterNode

    path = socket_path(directory)
    if os.path.exists(path):
        os.unlink(path)
    node = ClusterNode(cfg, node_id, control_path=path, test_hooks=test_hooks,
                       on_config=lambda c: save(directory, c))
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stopped.set)
    try:
        await node.stopped.wait()
    finally:
        await node.stop()
        if os.path.exists(path):
            os.unlink(path)


def _client(ctx: click.Context) -> NodeClient:
    try:
        return NodeClient(_dir(ctx))
    except NodeError as e:
        _fail(str(e))


@cluster.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cluster_status(ctx: click.Context, as_json: bool) -> None:
    """Configuration, and the live view when the node runs."""
    cfg, node_id = load(_dir(ctx))
    live: dict[str, Any] | None = None
    if os.path.exists(socket_path(_dir(ctx))):
        try:
            with NodeClient(_dir(ctx)) as c:
                live = c.call("status", timeout=3)
        except NodeError:
            live = None
    if as_json:
        click.echo(json.dumps({"config": cfg.to_dict(), "node": node_id, "live": live},
                              indent=2))
        return
    click.echo(f"Cluster {cfg.name} (config version {cfg.version}), this node: {node_id}")
    click.echo(f"  providers: membership {cfg.membership}, fencing {cfg.fencer}")
    if cfg.membership == "corosync":
        click.echo(f"  no-quorum-policy {cfg.no_quorum_policy} (token, quorum, two_node and "
                   "wait_for_all are corosync's)")
    else:
        click.echo(f"  token {cfg.token_ms} ms, consensus {int(cfg.consensus * 1000)} ms, "
                   f"no-quorum-policy {cfg.no_quorum_policy}, fencer {cfg.fencer}")
    for nid, e in sorted(cfg.nodes.items()):
        click.echo(f"  node {nid}: {e.address} votes {e.votes}")
    if live is None:
        click.echo("  node process: not running")
        return
    v = live["view"]
    if v is None:
        click.echo("  view: none yet")
    else:
        click.echo(f"  view {v['id']}: members {v['members']}, "
                   f"{'quorate' if v['quorate'] else 'NOT quorate'} "
                   f"({v['votes']}/{v['expected_votes']} votes, quorum {v['quorum']}"
                   f"{', waiting for all' if v['wait_for_all'] else ''})")
    cs = live.get("corosync")
    if cs is not None:
        names = cs.get("names", {})
        ring = ", ".join(f"{n} ({names.get(str(n), '?')})" for n in cs["ring_members"])
        click.echo(f"  corosync: ring {cs['ring']} members [{ring}], "
                   f"{'quorate' if cs['quorate'] else 'NOT quorate'} "
                   f"({cs.get('total_votes', '?')}/{cs.get('expected_votes', '?')} votes, "
                   f"quorum {cs.get('quorum', '?')}), token {cs.get('token_ms', '?')} ms, "
                   f"storaged CPG members {cs['cpg_members']}")
        for ls, members in live.get("dlm_members", {}).items():
            click.echo(f"  DLM lockspace {ls}: members {members}")
        if live.get("mismatch"):
            click.echo(f"  MISMATCH: the DLM counts {live['mismatch']} as members but "
                       "corosync dropped them (recovery pending)")
    if live["pending_fence"]:
        click.echo(f"  waiting for fencing of: {live['pending_fence']}")
    skew = ", ".join(f"node {n}: {ms:+.1f} ms" for n, ms in live["skew_ms"].items())
    warn = f"  WARNING: above threshold for {live['skew_warn']}" if live["skew_warn"] else ""
    click.echo(f"  clock skew: {skew or 'n/a'}{warn}")
    clocks = ", ".join(
        f"node {n}: {'synced' if c['synced'] else 'UNSYNCED'} maxerror {c['maxerror_ms']:g} ms"
        f"{' (WARNING)' if c['warn'] else ''}" for n, c in live.get("clock", {}).items())
    click.echo(f"  kernel clocks: {clocks or 'n/a'}")
    click.echo("  lockspaces: " + ", ".join(f"{n} ({s})" for n, s in live["lockspaces"].items()))


@cluster.command("leave")
@click.option("--force", is_flag=True, help="Leave even if locks are held here.")
@click.pass_context
def cluster_leave(ctx: click.Context, force: bool) -> None:
    """Leave the cluster cleanly: peers drop this node without fencing it; the node exits."""
    with _client(ctx) as c:
        try:
            r = c.call("leave", {"force": force})
        except NodeError as e:
            _fail(str(e))
    click.echo(f"Node {r['node']} left the cluster.")


@cluster.command("fence-ack")
@click.argument("node", type=int)
@click.pass_context
def cluster_fence_ack(ctx: click.Context, node: int) -> None:
    """Confirm NODE is fenced (powered off / cut off from storage): the manual fencer waits for
    this before the cluster recovers the node's locks."""
    with _client(ctx) as c:
        try:
            c.call("fence_ack", {"node": node})
        except NodeError as e:
            _fail(str(e))
    click.echo(f"Fencing of node {node} acknowledged.")


# ------------------------------------------------------------------ lock

# ``storaged lock`` lives in its own light module (fast start-up for scripts).
from storaged.cluster.lockcli import lock  # noqa: E402,F401
