"""Running cluster nodes for clusterfs: an event loop in a thread, nodes on it.

The filesystem core and FUSE are synchronous and multithreaded; the DLM
lives on an asyncio loop.  :class:`LoopThread` runs that loop in a daemon
thread and :func:`dlm_locks` gives the core a thread-safe lock layer over a
node's lockspace (``SyncLockspace``).  Several nodes may share one loop (tests
do); a mount process runs one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from storaged.cluster.config import ClusterConfig
from storaged.clusterfs.glock import DEFAULT_HOLD, Glocks
from storaged.clusterfs.locks import DlmLocks
from storaged.dlm.api import SyncLockspace


class LoopThread:
    """An asyncio event loop running in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="clusterfs-dlm",
                                       daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_node(lt: LoopThread, cfg: ClusterConfig, node_id: int, *, fencer: Any = None,
               members: int | None = None, timeout: float = 30.0, wait: bool = True,
               control_path: str | None = None) -> Any:
    """Start cluster node ``node_id`` on ``lt``'s loop; with ``wait``, until it is in a
    quorate view (start the others first: a lone node of three has no quorum).
    ``control_path``: serve ``storaged cluster status`` / ``storaged lock`` there."""
    from storaged.cluster.node import ClusterNode

    async def go() -> Any:
        node = ClusterNode(cfg, node_id, fencer=fencer, control_path=control_path)
        await node.start()
        return node
    node = lt.call(go())
    if wait:
        wait_ready(lt, node, members, timeout)
    return node


def wait_ready(lt: LoopThread, node: Any, members: int | None = None,
               timeout: float = 30.0) -> None:
    """Wait until ``node`` has a quorate view (of ``members`` nodes, if given)."""
    lt.call(node.wait_ready(members, timeout=timeout))


def stop_node(lt: LoopThread, node: Any, leave: bool = True) -> None:
    """Stop ``node``: with ``leave`` a clean leave (peers do not fence it), else a plain
    stop that peers see as a failure."""
    lt.call(node.leave() if leave else node.stop(), 30)


def dlm_locks(lt: LoopThread, node: Any, lockspace: str = "default", *, cached: bool = True,
              hold: float = DEFAULT_HOLD) -> DlmLocks | Glocks:
    """The clusterfs lock layer over ``node``'s lockspace ``lockspace``: glocks kept
    until another node asks (``cached``, minimum hold ``hold`` seconds), or plain
    per-operation DLM locks."""
    sync = SyncLockspace(node.lockspace(lockspace), lt.loop)
    return Glocks(sync, hold=hold) if cached else DlmLocks(sync)
