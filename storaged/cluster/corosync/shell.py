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

    def start(self) -> None:
        """Connect, check the node id, join the group and start reading (raises
        :class:`RuntimeError` naming the problem when corosync is not usable)."""
        core = self.core
        try:
            self.info = binding.read_cluster_info()
            self.quorum = binding.Quorum(core.quorum_changed)
            self.cpg = binding.Cpg(group_name(core.config.name), core.deliver,
                                   core.confchg, lambda seq, _rep, nodes: core.totem(seq, nodes))
        except binding.CorosyncError as e:
            self.close()
            raise RuntimeError(f"corosync membership: {e}") from None
        if self.cpg.nodeid != core.node:
            nodeid = self.cpg.nodeid
            self.close()
            raise RuntimeError(f"corosync membership: this host is corosync node {nodeid}, "
                               f"but storaged node {core.node}: use the same node ids")
        core.pid = os.getpid()
        names = self.info.get("nodes")
        core.names = dict(names) if isinstance(names, dict) else {}
        self._refresh_votequorum()
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(self.quorum.fd, self._dispatch, self.quorum)
        loop.add_reader(self.cpg.fd, self._dispatch, self.cpg)
        self.cpg.join()
        log.info("corosync membership: node %d in CPG group %s (token %s ms)", core.node,
                 group_name(core.config.name), self.info.get("token_ms"))
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
        """corosync went away: no membership is known, which is not quorate."""
        self.close()
        core = self.core
        core.q_quorate = False
        core.group = {}
        if core.view is not None and core.view.quorate:
            from storaged.cluster.membership import View, ViewInstalled
            from storaged.cluster.quorum import QuorumInfo
            v = core.view
            q = QuorumInfo(False, 0, v.quorum.expected, v.quorum.quorum, False)
            core.view = View((v.id[0] + 1, core.node), ((core.node, core.inc),), q)
            core.events.append(ViewInstalled(core.view))
        self.on_events()

    def flush(self) -> None:
        """Multicast what the core queued."""
        core = self.core
        if not core.mcast or self.cpg is None:
            core.mcast.clear()
            return
        out, core.mcast = core.mcast, []
        for data in out:
            try:
                self.cpg.mcast(data)
            except binding.CorosyncError as e:
                log.error("CPG multicast failed: %s", e)

    def leave(self) -> None:
        """Leave the CPG group cleanly (peers do not fence us)."""
        if self.cpg is not None:
            self.cpg.leave()
            try:
                self.cpg.dispatch()
            except binding.CorosyncError:
                pass

    def close(self) -> None:
        loop = self._loop
        for h in (self.cpg, self.quorum):
            if h is None:
                continue
            if loop is not None and h.handle.value:
                loop.remove_reader(h.fd)
            h.close()
        self.cpg = self.quorum = None
