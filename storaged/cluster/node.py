"""The cluster node: membership, fencing and DLM lockspaces over ZeroMQ (asyncio shell).

One process per host runs a :class:`ClusterNode` (``storaged cluster node``).
It owns:

* a ZeroMQ ROUTER socket bound to the node's configured address (every
  message from peers arrives here) and one DEALER per peer for sending.
  Messages are JSON objects; what the node produces for one peer in one
  event loop iteration travels as one batch frame stamped with the sender's
  node id and incarnation (:mod:`storaged.cluster.wire`); DLM messages carry
  their lockspace ``ls``.  Per-peer channels are FIFO, which the DLM relies
  on (asynchronous unlock, recovery barrier);
* the sans-IO :class:`~storaged.cluster.membership.Membership` core, ticked
  every few milliseconds, and the :class:`~storaged.cluster.fencing.Fencer`;
* one :class:`~storaged.dlm.api.Lockspace` per configured lockspace;
* a local client endpoint (Unix socket ``<dir>/cluster.sock``, one JSON
  request per line) for the ``storaged cluster`` and ``storaged lock``
  commands: a client's locks are released when it disconnects, so a killed
  ``storaged lock run`` never leaves a lock behind.

Test hook (``test_hooks=True`` only): ``drop`` makes the node ignore every
message from, and send nothing to, the given peers: a network partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from storaged.cluster.clock import read_kernel_clock
from storaged.cluster.config import ClusterConfig
from storaged.cluster.fencing import Fencer, make_fencer
from storaged.cluster.membership import (
    ClockWarning,
    Fenced,
    FenceRequest,
    Membership,
    Reset,
    SkewWarning,
    View,
    ViewInstalled,
)
from storaged.cluster.wire import decode, encode_batch
from storaged.dlm.api import LockError, Lockspace
from storaged.dlm.core import LockspaceCore, PLock
from storaged.dlm.modes import Flag, Mode, Status

log = logging.getLogger("storaged.cluster")

# Plain ints: pyzmq's enum members make every flag test an IntFlag operation.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_LOADS = json.loads
# At most this many messages per frame: once a peer's queue is this long it is sent at
# once, so the peer starts on the first ones while this node produces the rest (both
# nodes work at the same time instead of in turns).  With 8 clients on a remote master
# that took lock+unlock pairs from 12-16k to 22-28k/s on a 2-vCPU VM; one client is
# unaffected (docs/benchmarks.md).
MAX_BATCH = 8
_RC_KINDS = frozenset({"rc1", "rc2", "rcb", "rcd"})


def new_incarnation() -> int:
    """A fresh incarnation number: microseconds since the epoch (grows across restarts)."""
    return time.time_ns() // 1000


class ClusterNode:
    """Membership + DLM for one node, on the running asyncio loop."""

    def __init__(self, config: ClusterConfig, node_id: int, *, fencer: Fencer | None = None,
                 control_path: str | None = None, test_hooks: bool = False,
                 on_config: Callable[[ClusterConfig], None] | None = None,
                 incarnation: int | None = None) -> None:
        config.validate()
        if node_id not in config.nodes:
            raise ValueError(f"node {node_id} is not in cluster {config.name!r}")
        self.config = config
        self.node_id = node_id
        self.inc = incarnation or new_incarnation()
        self.fencer = fencer or make_fencer(config.fencer, config.fence_command, config=config,
                                            node_id=node_id)
        self.control_path = control_path
        self.test_hooks = test_hooks
        self.on_config = on_config
        self._corosync: Any = None
        self.membership: Any
        if config.membership == "corosync":
            # Imported here: the default provider never loads the corosync binding.
            from storaged.cluster.corosync.membership import CorosyncMembership
            from storaged.cluster.corosync.shell import CorosyncShell
            self.membership = CorosyncMembership(node_id, config, self.inc, os.getpid())
            self._corosync = CorosyncShell(self.membership, self._flush_membership)
        else:
            self.membership = Membership(node_id, config, self.inc, time.monotonic())
        self._mismatch: tuple[int, ...] = ()
        self.lockspaces: dict[str, Lockspace] = {}
        for name in config.lockspaces:
            core = LockspaceCore(name, node_id, no_quorum_policy=config.no_quorum_policy)
            self.lockspaces[name] = Lockspace(core, self._send_many)
        self.drop: set[int] = set()
        self.view: View | None = None
        self.view_events: list[tuple[float, View]] = []
        self.fenced_log: list[tuple[float, int, int]] = []
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._dealers: dict[int, zmq.Socket] = {}
        self._client: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._fencing: set[tuple[int, int]] = set()
        self._clients: dict[object, set[PLock]] = {}
        self._client_tasks: dict[object, set[asyncio.Task]] = {}
        self._ticker: asyncio.Task | None = None
        self._view_changed = asyncio.Event()
        self.stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, list[dict[str, Any]]] = {}
        self._flush_scheduled = False
        self.handlers: dict[str, Callable[[int, dict[str, Any]], None]] = {}
        """Message kind -> handler(src, msg) for services built on the node
        (storaged.scsi.pr_cluster); only messages from current members arrive."""
        self.view_listeners: list[Callable[[View], None]] = []
        """Called with every view installed (after the lockspaces saw it)."""

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind sockets, connect to peers and start ticking."""
        loop = self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        host, port = self.config.address(self.node_id)
        r = self._ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.RCVHWM, 0)
        r.bind(f"tcp://{host}:{port}")
        self._router = r
        for n in self.config.nodes:
            if n != self.node_id:
                self._connect(n)
        loop.add_reader(r.getsockopt(zmq.FD), self._on_router)
        if self._corosync is not None:
            try:
                self._corosync.start()
            except RuntimeError:
                loop.remove_reader(r.getsockopt(zmq.FD))
                r.close(0)
                for d in self._dealers.values():
                    d.close(0)
                self._dealers.clear()
                self._ctx.term()
                self._ctx = None
                raise
            if self.fencer.name == "pacemaker":
                # Pacemaker knows nodes by corosync's names: use them where the config
                # names none.
                names = getattr(self.fencer, "names", {})
                for n, name in self.membership.names.items():
                    entry = self.config.nodes.get(n)
                    if entry is not None and not entry.name:
                        names[n] = name
        if self.control_path:
            self._client = await asyncio.start_unix_server(self._on_client, self.control_path)
        self._ticker = loop.create_task(self._tick_loop())
        if self._pending and not self._flush_scheduled:  # queued before start()
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        log.info("node %d (incarnation %d) of cluster %s on %s:%d", self.node_id, self.inc,
                 self.config.name, host, port)

    def _connect(self, n: int) -> None:
        assert self._ctx is not None
        host, port = self.config.address(n)
        d = self._ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        # Queue while (re)connecting: a recovery barrier message must not be lost because
        # the connection to a peer that just started is not up yet.  Stale messages a
        # restarted peer receives are dropped by incarnation and view checks.
        d.setsockopt(zmq.SNDHWM, 10000)
        d.setsockopt(zmq.RECONNECT_IVL, 50)
        d.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        d.connect(f"tcp://{host}:{port}")
        self._dealers[n] = d

    async def stop(self) -> None:
        """Close every socket and cancel background tasks (no leave message)."""
        loop = asyncio.get_running_loop()
        if self._ticker is not None:
            self._ticker.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._corosync is not None:
            self._corosync.close()
        self._flush()
        if self._router is not None and not self._router.closed:
            loop.remove_reader(self._router.getsockopt(zmq.FD))
            self._router.close(0)
        for d in self._dealers.values():
            d.close(0)
        self._dealers.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self.stopped.set()

    async def leave(self) -> None:
        """Leave the cluster cleanly (peers will not fence this node), then stop."""
        self.membership.leave()
        if self._corosync is not None:
            self._corosync.leave()
        self._flush_membership()
        await asyncio.sleep(0.05)
        await self.stop()

    def spawn(self, coro: Any) -> asyncio.Task:
        """Run ``coro`` as a task the node cancels on stop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -------------------------------------------------------------- queries

    def lockspace(self, name: str = "default") -> Lockspace:
        """The :class:`Lockspace` ``name`` (configured in ``ClusterConfig.lockspaces``)."""
        try:
            return self.lockspaces[name]
        except KeyError:
            raise KeyError(f"no lockspace {name!r} (configured: "
                           f"{', '.join(self.lockspaces)})") from None

    def quorate(self) -> bool:
        return self.membership.quorate()

    def ready(self) -> bool:
        """Quorate and every lockspace running (recovery finished)."""
        return self.quorate() and all(ls.core.state == "running"
                                      for ls in self.lockspaces.values())

    async def wait_ready(self, members: int | None = None, timeout: float = 30.0) -> None:
        """Wait until :meth:`ready` (and the view has ``members`` nodes, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.view
            if self.ready() and (members is None or (v is not None
                                                     and len(v.members) == members)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_id} not ready: {self.status()}")
            await asyncio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        """JSON-ready status (membership, quorum, skew, lockspaces)."""
        st = self.membership.status(time.monotonic())
        st["cluster"] = self.config.name
        st["no_quorum_policy"] = self.config.no_quorum_policy
        st["fencer"] = self.fencer.name
        st["membership"] = self.config.membership
        st["lockspaces"] = {n: ls.core.state for n, ls in self.lockspaces.items()}
        st["token_ms"] = self.config.token_ms
        st["consensus_ms"] = int(self.config.consensus * 1000)
        if self._corosync is not None:
            info = self._corosync.info  # corosync's timeouts are the ones in force
            st["token_ms"] = int(info.get("token_ms") or 0)
            st["consensus_ms"] = int(info.get("consensus_ms") or 0)
            st["dlm_members"] = {n: list(ls.core.members) for n, ls in self.lockspaces.items()}
            st["mismatch"] = list(self._check_mismatch())
        return st

    # ---------------------------------------------------------------- sending

    def _send(self, dst: int, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for ``dst``; what is queued in one loop iteration goes out in
        order as one frame (:mod:`storaged.cluster.wire`), or several of ``MAX_BATCH``."""
        if dst in self.drop or dst not in self._dealers:
            return
        q = self._pending.get(dst)
        if q is None:
            self._pending[dst] = [msg]
        else:
            q.append(msg)
            if len(q) >= MAX_BATCH:
                self._flush_peer(dst, self._pending.pop(dst))
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send(self, dst: int, msg: dict[str, Any]) -> None:
        """Queue a service message (a ``handlers`` kind) for node ``dst``: FIFO
        with everything else this node sends there, dropped if it is not up."""
        self._send(dst, msg)

    def _send_many(self, out: list[tuple[int, dict[str, Any]]]) -> None:
        for dst, msg in out:
            self._send(dst, msg)

    def _flush(self) -> None:
        """Send the queued messages: one batch frame per peer."""
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for dst, msgs in pending.items():
            self._flush_peer(dst, msgs)

    def _flush_peer(self, dst: int, msgs: list[dict[str, Any]]) -> None:
        d = self._dealers.get(dst)
        if d is None:
            return
        try:
            d.send(encode_batch(self.node_id, self.inc, msgs), zmq.NOBLOCK)
        except zmq.Again:
            pass  # peer not connected: it is down or not started yet

    # -------------------------------------------------------------- receiving

    def _on_router(self) -> None:
        r = self._router
        if r is None or r.closed:
            return
        dirty: set[Lockspace] = set()
        # The ZeroMQ FD is edge-triggered: drain everything that is queued now.  Asking
        # EVENTS (which also re-arms the FD) is cheaper than ending on a zmq.Again.
        get = r.getsockopt
        while True:
            try:
                if not get(_EVENTS) & _POLLIN:
                    break
                frames = r.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return
            if len(frames) == 2:
                try:
                    self._on_frame(frames[0], frames[1], dirty)
                except Exception:  # noqa: BLE001 - one bad peer message never kills the node
                    log.exception("bad message from a peer ignored")
        for ls in dirty:
            ls.pump()
        self._flush_membership()
        self._flush()  # answers go out now, not one loop iteration later

    def _on_frame(self, ident: bytes, payload: bytes, dirty: set[Lockspace]) -> None:
        try:
            src, inc, msgs = decode(payload)
        except (ValueError, TypeError):
            return
        for msg in msgs:
            self._on_message(ident, src, inc, msg, dirty)

    def _on_message(self, ident: bytes, src: int | None, inc: int | None,
                    msg: dict[str, Any], dirty: set[Lockspace]) -> None:
        kind = msg.get("t")
        if kind == "cfgreq":
            self._answer_join(ident, msg)
            return
        if not isinstance(src, int) or not isinstance(inc, int) or src in self.drop:
            return
        ls_name = msg.get("ls")
        if ls_name is not None:
            v = self.view
            if kind not in _RC_KINDS and (v is None or v.incarnation(src) != inc):
                return  # normal DLM traffic only from current members (recovery may run ahead)
            ls = self.lockspaces.get(ls_name)
            if ls is not None:
                ls.core.receive(src, msg)
                dirty.add(ls)
            return
        handler = self.handlers.get(kind)  # type: ignore[arg-type]
        if handler is not None:
            v = self.view
            if v is not None and v.incarnation(src) == inc:
                handler(src, msg)
            return
        if kind == "fack":
            self.fencer.acknowledge(int(msg["node"]))
            return
        if kind in ("config", "cfgget"):
            self._on_config_msg(src, msg)
            return
        if kind == "hb" and int(msg.get("cv", 0)) > self.config.version:
            self._send(src, {"t": "cfgget"})
        self.membership.receive(src, inc, msg, time.monotonic(), time.time())

    # ------------------------------------------------------------- membership

    async def _tick_loop(self) -> None:
        period = min(0.05, self.config.heartbeat / 4)
        next_clock = 0.0
        while True:
            now = time.monotonic()
            if now >= next_clock:   # the kernel clock state, once a second
                next_clock = now + 1.0
                clock = read_kernel_clock()
                if clock is not None:
                    self.membership.set_local_clock(clock.synced, clock.maxerror_us)
            self.membership.tick(now, time.time())
            self._flush_membership()
            self._on_router()
            await asyncio.sleep(period)

    def _check_mismatch(self) -> tuple[int, ...]:
        """Nodes a lockspace still counts as members that corosync's ring dropped
        (logged once per change; shown by ``cluster status``)."""
        m = self.membership
        ring = m.ring_nodes if m.ring_seq is not None else set()
        dlm = {n for ls in self.lockspaces.values() for n in ls.core.members}
        bad = tuple(sorted(dlm - ring)) if ring else ()
        if bad != self._mismatch:
            self._mismatch = bad
            if bad:
                log.warning("membership mismatch: the DLM counts %s as members, corosync "
                            "dropped them (ring %s: %s)", list(bad), m.ring_seq, sorted(ring))
        return bad

    def _flush_membership(self) -> None:
        m = self.membership
        if self._corosync is not None:
            self._corosync.flush()
        if m.out:
            out, m.out = m.out, []
            self._send_many(out)
        if not m.events:
            return
        events, m.events = m.events, []
        for ev in events:
            if isinstance(ev, ViewInstalled):
                self._on_view(ev.view)
            elif isinstance(ev, FenceRequest):
                self._start_fence(ev.node, ev.inc)
            elif isinstance(ev, Fenced):
                log.warning("node %d (incarnation %d) fenced", ev.node, ev.inc)
                self.fenced_log.append((time.time(), ev.node, ev.inc))
                self._fence_state()
            elif isinstance(ev, SkewWarning):
                if ev.warn:
                    log.warning("clock skew to node %d is %.3f s (threshold %.3f s): "
                                "keep cluster clocks in sync (NTP)", ev.node, ev.skew,
                                self.config.skew_warn_ms / 1000)
                else:
                    log.info("clock skew to node %d back to %.3f s", ev.node, ev.skew)
            elif isinstance(ev, ClockWarning):
                who = "this node's" if ev.node == self.node_id else f"node {ev.node}'s"
                if ev.warn:
                    log.warning("%s kernel clock is %s (maxerror %.3f s, threshold %.3f s): "
                                "run an NTP client (chrony, systemd-timesyncd) on every node",
                                who, "synchronized" if ev.synced else "NOT synchronized",
                                ev.maxerror_us / 1e6, self.config.clock_warn_ms / 1000)
                else:
                    log.info("%s kernel clock is synchronized again (maxerror %.3f s)", who,
                             ev.maxerror_us / 1e6)
            elif isinstance(ev, Reset):
                log.warning("removed from the cluster: rejoining as incarnation %d "
                            "(every lock held here is lost)", ev.new_inc)
                self._flush()  # what was queued is stamped with the old incarnation
                self.inc = ev.new_inc
                self.view = None
                for ls in self.lockspaces.values():
                    ls.core.reset()
                    ls.pump()
        if m.out:
            out, m.out = m.out, []
            self._send_many(out)
        if self._corosync is not None:
            self._corosync.flush()
            self._check_mismatch()

    def _on_view(self, view: View) -> None:
        self.view = view
        if view.removed:
            # The node was gone at most one failure detection (token + consensus) before
            # this view: a fence completed since then counts (pacemaker fences it too).
            slack = self.config.token + self.config.consensus
            if self._corosync is not None:
                info = self._corosync.info
                slack = (int(info.get("token_ms") or 0) + int(info.get("consensus_ms") or 0)
                         ) / 1000 or slack
            since = time.time() - slack
            for n, i in view.removed:
                self.fencer.node_left(n, i, since)
        self.view_events.append((time.time(), view))
        q = view.quorum
        log.info("view %s: members %s, %s (%d/%d votes, quorum %d)%s", view.label(),
                 list(view.nodes), "quorate" if q.quorate else "NOT quorate", q.votes,
                 q.expected, q.quorum,
                 f", unclean: {[n for n, _ in view.removed]}" if view.removed else "")
        fence_ok = not self.membership.pending_fence
        for ls in self.lockspaces.values():
            ls.core.fence_ok = fence_ok
            ls.core.view_change(view.id, view.nodes, q.quorate)
            ls.pump()
        self._view_changed.set()
        self._view_changed = asyncio.Event()
        for listener in list(self.view_listeners):
            try:
                listener(view)
            except Exception:  # noqa: BLE001 - a service bug must not stop membership
                log.exception("view listener failed")

    def _fence_state(self) -> None:
        ok = not self.membership.pending_fence
        for ls in self.lockspaces.values():
            ls.core.set_fence_ok(ok)
            ls.pump()

    def _start_fence(self, node: int, inc: int) -> None:
        pair = (node, inc)
        if pair in self._fencing:
            return
        self._fencing.add(pair)

        async def run() -> None:
            try:
                delay = self.config.fence_delay(node)
                if delay:
                    await asyncio.sleep(delay)
                while pair in self.membership.pending_fence:
                    v = self.membership.view
                    if v is None or v.coordinator != self.node_id or not v.quorate:
                        return
                    log.warning("fencing node %d (incarnation %d) with the %s fencer",
                                node, inc, self.fencer.name)
                    if await self.fencer.fence(node, inc):
                        self.membership.fenced(node, inc)
                        self._flush_membership()
                        return
                    await asyncio.sleep(1.0)
            finally:
                self._fencing.discard(pair)
        self.spawn(run())

    def fence_ack(self, node: int) -> None:
        """Operator confirmation for the manual fencer, sent to every node."""
        self.fencer.acknowledge(node)
        for n in self.config.nodes:
            if n != self.node_id:
                self._send(n, {"t": "fack", "node": node})

    # ------------------------------------------------------------- config sync

    def _answer_join(self, ident: bytes, msg: dict[str, Any]) -> None:
        from storaged.cluster.config import NodeEntry
        try:
            nid = int(msg["id"])
            addr = msg.get("address")
            cfg = ClusterConfig.from_dict(self.config.to_dict())
            if nid not in cfg.nodes:
                if not addr:
                    raise ValueError(f"node {nid} is not in the cluster: give its address")
                cfg.nodes[nid] = NodeEntry(addr)
                cfg.version += 1
                cfg.validate()
                self._adopt_config(cfg)
                for n in self.config.nodes:
                    if n != self.node_id:
                        self._send(n, {"t": "config", "cfg": cfg.to_dict()})
            reply = {"ok": True, "config": self.config.to_dict()}
        except Exception as e:  # noqa: BLE001 - answered as an error
            reply = {"ok": False, "error": str(e)}
        assert self._router is not None
        self._router.send_multipart([ident, _DUMPS(reply).encode()])

    def _on_config_msg(self, src: int, msg: dict[str, Any]) -> None:
        if msg["t"] == "cfgget":
            self._send(src, {"t": "config", "cfg": self.config.to_dict()})
            return
        try:
            cfg = ClusterConfig.from_dict(msg["cfg"])
        except Exception:  # noqa: BLE001
            log.warning("invalid cluster config from node %d ignored", src)
            return
        if cfg.version > self.config.version and cfg.name == self.config.name:
            self._adopt_config(cfg)

    def _adopt_config(self, cfg: ClusterConfig) -> None:
        if self.node_id not in cfg.nodes:
            log.warning("this node was removed from the cluster configuration")
        old = self.config
        self.config = cfg
        self.membership.config = cfg
        for n in cfg.nodes:
            if n != self.node_id and (n not in self._dealers or
                                      old.nodes.get(n) != cfg.nodes[n]):
                if n in self._dealers:
                    self._dealers.pop(n).close(0)
                self._connect(n)
        for n in list(self._dealers):
            if n not in cfg.nodes:
                self._dealers.pop(n).close(0)
        log.info("cluster configuration version %d (%d nodes)", cfg.version, len(cfg.nodes))
        if self.on_config is not None:
            self.on_config(cfg)

    # ------------------------------------------------------------- clients

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """One local client connection: newline-delimited JSON requests, served in order."""
        ident = object()
        tasks: set[asyncio.Task] = set()
        self._client_tasks[ident] = tasks
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = _LOADS(line)
                    op, args = req["op"], req.get("args") or {}
                except (ValueError, KeyError, TypeError):
                    self._reply(writer, {"ok": False, "error": "bad request"})
                    continue
                task = asyncio.get_running_loop().create_task(self._serve(ident, op, args))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda t, w=writer: self._reply(w, t.result())
                                       if not t.cancelled() else None)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._client_gone(ident)
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(_DUMPS(reply).encode() + b"\n")

    async def _serve(self, ident: object, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await self._op(ident, op, args)}
        except LockError as e:
            return {"ok": False, "error": str(e), "status": e.status.name}
        except (KeyError, ValueError, TimeoutError) as e:
            return {"ok": False, "error": str(e) or type(e).__name__}

    async def _op(self, ident: object, op: str, args: dict[str, Any]) -> Any:
        if op == "status":
            return self.status()
        if op == "ls":
            return [ls.describe() for ls in self.lockspaces.values()]
        if op == "fence_ack":
            self.fence_ack(int(args["node"]))
            return {"node": int(args["node"])}
        if op == "leave":
            held = sum(len(ls.core.locks) for ls in self.lockspaces.values())
            if held and not args.get("force"):
                raise ValueError(f"{held} lock(s) are held on this node: release them first "
                                 "(or --force)")
            self.spawn(self.leave())
            return {"node": self.node_id}
        if op == "lock":
            return await self._client_lock(ident, args)
        if op == "unlock":
            ls = self.lockspace(args.get("lockspace", "default"))
            lkid = int(args["lkid"])
            lk = ls.core.locks.get(lkid)
            mine = self._clients.get(ident, set())
            if lk is None or lk not in mine:
                raise KeyError(f"no lock {lkid} held by this client")
            mine.discard(lk)
            await ls.unlock(lk)
            return {"lkid": lkid}
        if op == "drop" and self.test_hooks:
            self.drop = {int(n) for n in args.get("peers", [])}
            return {"drop": sorted(self.drop)}
        raise ValueError(f"unknown operation {op!r}")

    async def _client_lock(self, ident: object, args: dict[str, Any]) -> dict[str, Any]:
        ls = self.lockspace(args.get("lockspace", "default"))
        flags = 0
        for f in args.get("flags", []):
            flags |= Flag[f.upper()]
        timeout = args.get("timeout")
        lk = await ls.lock(args["name"], Mode.parse(args.get("mode", "EX")), flags=flags,
                           timeout=None if timeout is None else float(timeout))
        self._clients.setdefault(ident, set()).add(lk)
        return {"lkid": lk.lkid, "mode": lk.mode.name, "name": args["name"],
                "lockspace": ls.name}

    def _client_gone(self, ident: object) -> None:
        for task in self._client_tasks.pop(ident, set()):
            task.cancel()  # a lock request still waiting is cancelled (or released)
        locks = self._clients.pop(ident, set())
        for ls in self.lockspaces.values():
            for lk in list(locks):
                if ls.core.locks.get(lk.lkid) is lk and lk.op is None:
                    self.spawn(self._release(ls, lk))

    async def _release(self, ls: Lockspace, lk: PLock) -> None:
        try:
            await ls.unlock(lk)
        except LockError as e:
            if e.status != Status.ENOENT:
                log.warning("releasing a lock of a departed client: %s", e)
