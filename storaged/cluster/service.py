"""The cluster node inside ``storaged serve``: membership + DLM in the daemon process.

When the state store holds a cluster configuration (``storaged cluster init``
or ``join``), the daemon starts this host's :class:`~storaged.cluster.node.ClusterNode`
on its own event loop, with the local endpoint ``<dir>/cluster.sock`` that
``storaged cluster status|leave|fence-ack`` and ``storaged lock`` use, so
in-process users (the cluster filesystem) reach the DLM without another
process.  ``storaged cluster node`` runs the same node stand-alone (tests,
hosts that only arbitrate locks); run one or the other on a host, not both
(they would bind the same address).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from storaged.cluster.client import socket_path
from storaged.cluster.config import ClusterConfig, LocalNode
from storaged.state import Store

if TYPE_CHECKING:
    from storaged.cluster.node import ClusterNode

log = logging.getLogger("storaged.cluster")


def stored_cluster(store: Store) -> tuple[ClusterConfig, int] | None:
    """The cluster config and local node id kept in ``store``, or None if not configured."""
    with store.read() as txn:
        cfg = txn.get(ClusterConfig, ClusterConfig.KEY)
        local = txn.get(LocalNode, LocalNode.KEY)
    if cfg is None or local is None:
        return None
    return cfg, local.node_id


async def start_cluster_node(directory: str, store: Store) -> ClusterNode | None:
    """Start the configured node on the running loop; None when no cluster is configured.

    Configuration updates that arrive from peers (a node joined) are written to
    ``store`` in the daemon's own process (LMDB allows one environment per process).
    """
    found = stored_cluster(store)
    if found is None:
        return None
    from storaged.cluster.node import ClusterNode  # noqa: F811 - ZeroMQ only when configured

    cfg, node_id = found
    path = socket_path(directory)
    if os.path.exists(path):
        os.unlink(path)

    def save(c: ClusterConfig) -> None:
        with store.write() as txn:
            txn.put(c)

    node = ClusterNode(cfg, node_id, control_path=path, on_config=save)
    try:
        await node.start()
    except RuntimeError as e:
        # membership=corosync without a usable corosync: the rest of the daemon (LUNs,
        # exports) still serves; the node is simply not running (cluster status says so).
        log.error("cluster node %d of %s not started: %s", node_id, cfg.name, e)
        return None
    log.info("cluster node %d of %s runs in the daemon (endpoint %s)", node_id, cfg.name, path)
    return node


async def stop_cluster_node(directory: str, node: ClusterNode) -> None:
    """Stop a node started by :func:`start_cluster_node` and remove its endpoint."""
    await node.stop()
    path = socket_path(directory)
    if os.path.exists(path):
        os.unlink(path)
