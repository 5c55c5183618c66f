"""Asyncio glue for the corosync provider: library file descriptors -> sans-IO core.

:class:`CorosyncShell` opens a CPG and a quorum connection to the corosync of
this host (its IPC is libqb's abstract Unix sockets, so it must run in the
same network namespace as corosync), reads node names and timeouts through
cmap, and on every readable descriptor dispatches the callbacks into the
:class:`~storaged.cluster.corosync.membership.CorosyncMembership` core, then
multicasts what the core queued and lets the node act on the events.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from storaged.cluster.corosync import binding
from storaged.cluster.corosync.membership import CorosyncMembership

log = logging.getLogger("storaged.cluster.corosync")
RETRY_S = 0.02        #: multicast retry while corosync answers TRY_AGAIN
RECONNECT_S = 1.0     #: reconnect attempts after the corosync connection was lost


def group_name(cluster: str) -> str:
    """The CPG group every storaged node of ``cluster`` joins."""
    return f"storaged.{cluster}"


class CorosyncShell:
    """Connects one :class:`CorosyncMembership` to the local corosync."""

    def __init__(self, core: CorosyncMembership, on_events: Callable[[], None]) -> None:
        self.core = core
        self.on_events = on_events
        self.cpg: binding.Cpg | None = None
        self.quorum: binding.Quorum | None = None
        self.info: dict[str, object] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[bytes] = []
        self._retry: asyncio.TimerHandle | None = None
        self._reconnect: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self) -> None:
        """Connect, check the node id, join the group and start reading (raises
        :class:`RuntimeError` naming the problem when corosync is not usable)."""
        self._loop = asyncio.get_running_loop()
        self._connect()
        log.info("corosync membership: node %d in CPG group %s (token %s ms)", self.core.node,
                 group_name(self.core.config.name), self.info.get("token_ms"))

    def _connect(self) -> None:
        core = self.core
        try:
            self.info = binding.read_cluster_info()
            self.quorum = binding.Quorum(core.quorum_changed)
            self.cpg = binding.Cpg(group_name(core.config.name), core.deliver,
                                   core.confchg, lambda seq, _rep, nodes: core.totem(seq, nodes))
        except binding.CorosyncError as e:
            self._close_handles()
            raise RuntimeError(f"corosync membership: {e}") from None
        if self.cpg.nodeid != core.node:
            nodeid = self.cpg.nodeid
            self._close_handles()
            raise RuntimeError(f"corosync membership: this host is corosync node {nodeid}, "
                               f"but storaged node {core.node}: use the same node ids")
        core.pid = os.getpid()
        names = self.info.get("nodes")
        core.names = dict(names) if isinstance(names, dict) else {}
        self._refresh_votequorum()
        loop = self._loop
        assert loop is not None
        loop.add_reader(self.quorum.fd, self._dispatch, self.quorum)
        loop.add_reader(self.cpg.fd, self._dispatch, self.cpg)
        try:
            self.cpg.join()
        except binding.CorosyncError as e:
            self._close_handles()
            raise RuntimeError(f"corosync membership: {e}") from None
        self._dispatch(self.quorum)

    def _refresh_votequorum(self) -> None:
        try:
            vi = binding.votequorum_info(0)
        except binding.CorosyncError:
            return
        self.core.votequorum = {
            "expected_votes": vi.node_expected_votes, "total_votes": vi.total_votes,
            "quorum": vi.quorum, "two_node": bool(vi.flags & binding.VOTEQUORUM_INFO_TWONODE),
            "wait_for_all": bool(vi.flags & binding.VOTEQUORUM_INFO_WAIT_FOR_ALL),
            "token_ms": self.info.get("token_ms"), "cluster_name": self.info.get("cluster_name")}

    def _dispatch(self, handle: binding.Cpg | binding.Quorum) -> None:
        try:
            if handle is self.quorum:
                handle.dispatch()
                self._refresh_votequorum()
            else:
                handle.dispatch()
        except binding.CorosyncError as e:
            log.error("corosync connection lost (%s): this node stops granting locks", e)
            self._lost()
            return
        self.flush()
        self.on_events()

    def _lost(self) -> None:
        """corosync went away: no membership is known, which is not quorate.  The node
        keeps trying to reconnect; once corosync is back it rejoins the group as a new
        incarnation (the others fenced or dropped the old one meanwhile)."""
        self._close_handles()
        self.core.lost()
        self.on_events()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._loop is not None and not self.closed and self._reconnect is None:
            self._reconnect = self._loop.call_later(RECONNECT_S, self._try_reconnect)

    def _try_reconnect(self) -> None:
        self._reconnect = None
        if self.closed:
            return
        try:
            self._connect()
        except (RuntimeError, binding.CorosyncError) as e:
            log.debug("corosync still unavailable: %s", e)
            self._close_handles()
            self._schedule_reconnect()
            return
        log.warning("corosync is back: rejoining as a new incarnation")
        self.flush()
        self.on_events()

    def flush(self) -> None:
        """Multicast what the core queued, in order.  While corosync answers
        TRY_AGAIN (it synchronizes a new ring) the rest waits and is retried shortly,
        so the event loop never blocks and no hello is lost."""
        core = self.core
        if core.mcast:
            self._queue += core.mcast
            core.mcast = []
        if self.cpg is None:
            self._queue.clear()
            return
        while self._queue:
            try:
                sent = self.cpg.mcast(self._queue[0])
            except binding.CorosyncError as e:
                log.error("CPG multicast failed: %s", e)
                self._queue.clear()
                return
            if not sent:
                if self._retry is None and self._loop is not None:
                    self._retry = self._loop.call_later(RETRY_S, self._retry_flush)
                return
            self._queue.pop(0)

    def _retry_flush(self) -> None:
        self._retry = None
        self.flush()

    def leave(self) -> None:
        """Leave the CPG group cleanly (peers do not fence us)."""
        if self.cpg is not None:
            self.cpg.leave()
            try:
                self.cpg.dispatch()
            except binding.CorosyncError:
                pass

    def close(self) -> None:
        """Disconnect for good (the node stops)."""
        self.closed = True
        for h in (self._retry, self._reconnect):
            if h is not None:
                h.cancel()
        self._retry = self._reconnect = None
        self._close_handles()

    def _close_handles(self) -> None:
        loop = self._loop
        for h in (self.cpg, self.quorum):
            if h is None:
                continue
            if loop is not None and h.handle.value:
                loop.remove_reader(h.fd)
            h.close()
        self.cpg = self.quorum = None
