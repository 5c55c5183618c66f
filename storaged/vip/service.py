"""The asyncio shell of floating addresses, on the node's event loop (``storaged serve``).

Every ``PERIOD`` seconds it tells the :class:`~storaged.vip.core.VipCore`
whether the node is quorate and whether its lease is fresh, checks that the
address locks it holds are still granted, advances the core's timers and
executes the actions it produced: DLM lock requests on the running
:class:`~storaged.cluster.node.ClusterNode`, pyroute2 address changes and
gratuitous ARPs (:mod:`storaged.vip.net`), and portal changes through the
``serve(ip, on)`` callback the daemon passes in (it opens or closes the
iSCSI listeners on the address and ends the sessions that came in on it).

Bound on the no-quorum stop: a holder that stops hearing the quorum drops
its addresses within ``lease + PERIOD`` of the last heartbeat it got,
``lease = token - 2 x heartbeat`` (2.4 s with the default 3 s token).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from storaged.dlm.api import LockError
from storaged.dlm.modes import Mode, Status
from storaged.vip import net
from storaged.vip.core import (
    HELD,
    Acquire,
    AddAddress,
    Announce,
    Release,
    RemoveAddress,
    Serve,
    Unserve,
    VipCore,
)
from storaged.vip.records import FloatingAddress

if TYPE_CHECKING:
    from storaged.cluster.node import ClusterNode
    from storaged.dlm.core import PLock

log = logging.getLogger("storaged.vip")

PERIOD = 0.05
#: A lock request the DLM refused at once is retried after this long.
RETRY = 1.0


def lease_time(token: float, heartbeat: float) -> float:
    """How recently the quorum must have been heard for this node to keep its addresses."""
    return max(token - 2 * heartbeat, token / 2)


def lease_fresh(node: ClusterNode, now: float) -> bool:
    """Were enough members of the installed view heard within the lease to make quorum?

    A membership provider that keeps no per-peer heartbeat times (corosync's totem
    decides liveness itself) gives no lease: the quorate view is all there is."""
    m = node.membership
    view = node.view
    if view is None or not view.quorate:
        return False
    if not isinstance(getattr(m, "last_heard", None), dict):
        return node.quorate()
    lease = lease_time(node.config.token, node.config.heartbeat)
    votes = node.config.votes()
    have = votes.get(node.node_id, 0)
    for n in view.nodes:
        if n != node.node_id and now - m.last_heard.get(n, float("-inf")) < lease:
            have += votes.get(n, 0)
    return have >= view.quorum.quorum


class VipService:
    """Floating addresses of one node: see the module docstring."""

    def __init__(self, node: ClusterNode,
                 serve: Callable[[str, bool], Awaitable[None]] | None = None) -> None:
        self.node = node
        self.core = VipCore(node.node_id, settle=node.config.token + node.config.consensus)
        self.serve = serve
        self.locks: dict[str, tuple[str, PLock]] = {}   # key -> (lockspace, handle)
        self.requests: dict[str, asyncio.Future] = {}   # key -> completion of the request
        self.garps: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._busy = asyncio.Lock()
        self._cleaned: set[str] = set()
        self._halt = False

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start ticking on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Clean stop: remove every address and release its lock (a survivor takes it)."""
        self._halt = True
        if self._task is not None:
            # Let the current step finish: cancelling it in the middle of an address
            # change (a worker thread) could let the add land after the removal.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except TimeoutError:
                self._task.cancel()
            self._task = None
        self.core.shutdown(time.monotonic())
        await self._execute()
        await asyncio.sleep(0.05)  # let the unlocks leave before the node closes its sockets

    async def configure(self, vips: list[FloatingAddress]) -> None:
        """The stored addresses (called after each reconcile of the daemon)."""
        for v in vips:
            if v.key not in self._cleaned:
                # An address left on the interface by a crashed run is not ours: remove it
                # before competing for the lock (IPaddr2's stop does the same).
                self._cleaned.add(v.key)
                try:
                    if await asyncio.to_thread(net.remove_address, v.dev, v.ip, v.prefixlen):
                        log.warning("removed stale floating address %s from %s", v.address,
                                    v.dev)
                except net.NetError as e:
                    log.warning("%s", e)
        self.core.configure(vips, time.monotonic())
        await self._execute()

    async def _run(self) -> None:
        while not self._halt:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the ticker must survive one bad step
                log.exception("floating address step failed")
            await asyncio.sleep(PERIOD)

    async def step(self) -> None:
        """One tick: health, lock checks, timers, actions."""
        now = time.monotonic()
        core = self.core
        view = self.node.view
        warned = getattr(self.node.membership, "clock_warned", set())
        core.health(self.node.quorate(), lease_fresh(self.node, now), now,
                    view.nodes if view is not None else (),
                    view.id if view is not None else None,
                    clock_ok=self.node.node_id not in warned)
        for key, (ls_name, lk) in list(self.locks.items()):
            e = core.entries.get(key)
            if e is not None and e.lock == HELD and not self._granted(ls_name, lk):
                del self.locks[key]
                core.lost(key, now, "lock lost")
        core.tick(now)
        await self._execute()

    # ---------------------------------------------------------------- actions

    def _granted(self, ls_name: str, lk: PLock) -> bool:
        ls = self.node.lockspaces.get(ls_name)
        return ls is not None and ls.core.locks.get(lk.lkid) is lk and lk.grmode == Mode.EX

    async def _execute(self) -> None:
        async with self._busy:
            core = self.core
            while core.actions:
                action = core.actions.pop(0)
                try:
                    await self._do(action)
                except Exception:  # noqa: BLE001 - logged; the core decides what next
                    log.exception("floating address action %s failed", action)

    async def _do(self, a: Any) -> None:
        now = time.monotonic()
        if isinstance(a, Acquire):
            self._acquire(a, now)
        elif isinstance(a, Release):
            self._release(a.key)
        elif isinstance(a, AddAddress):
            v = a.vip
            try:
                await asyncio.to_thread(net.add_address, v.dev, v.ip, v.prefixlen)
            except net.NetError as e:
                log.error("%s", e)
                self.core.add_failed(v.key, str(e), now)
                return
            log.warning("floating address %s taken on %s (node %d)", v.address, v.dev,
                        self.node.node_id)
        elif isinstance(a, RemoveAddress):
            v = a.vip
            try:
                await asyncio.to_thread(net.remove_address, v.dev, v.ip, v.prefixlen)
            except net.NetError as e:
                log.error("%s", e)
            log.warning("floating address %s removed from %s", v.address, v.dev)
        elif isinstance(a, Serve | Unserve):
            if self.serve is not None:
                await self.serve(a.ip, isinstance(a, Serve))
        elif isinstance(a, Announce):
            try:
                await asyncio.to_thread(net.send_garp, a.vip.dev, a.vip.ip)
                self.garps[a.vip.key] = self.garps.get(a.vip.key, 0) + 1
            except net.NetError as e:
                log.warning("%s", e)

    def _acquire(self, a: Acquire, now: float) -> None:
        try:
            ls = self.node.lockspace(a.lockspace)
            lk, fut = ls.request(a.name, Mode.EX)
        except (KeyError, LockError) as e:
            log.warning("floating address %s: cannot request lock %s: %s", a.key, a.name, e)
            self.core.lost(a.key, now, f"lock request refused: {e}", retry=RETRY)
            return
        self.locks[a.key] = (a.lockspace, lk)
        self.requests[a.key] = fut

        def done(f: asyncio.Future) -> None:
            if self.locks.get(a.key, (None, None))[1] is not lk:
                return  # released or replaced meanwhile
            status = f.result() if not f.cancelled() else Status.ECANCEL
            t = time.monotonic()
            if status == Status.OK:
                self.core.granted(a.key, t)
            else:
                del self.locks[a.key]
                self.core.lost(a.key, t, f"lock request ended: {Status(status).name}",
                               retry=RETRY)
            asyncio.get_running_loop().create_task(self._execute())
        fut.add_done_callback(done)

    def _release(self, key: str) -> None:
        found = self.locks.pop(key, None)
        if found is None:
            return
        ls_name, lk = found
        fut = self.requests.pop(key, None)
        ls = self.node.lockspaces.get(ls_name)
        if ls is None or ls.core.locks.get(lk.lkid) is not lk:
            return

        def unlock(f: asyncio.Future | None = None) -> None:
            if f is not None and (f.cancelled() or f.result() != Status.OK):
                return
            if ls.core.locks.get(lk.lkid) is not lk or lk.op is not None:
                return
            try:
                ls.core.unlock(lk)
                ls.pump()
            except Exception as e:  # noqa: BLE001 - the lock may be gone with the view
                log.warning("floating address %s: unlock failed: %s", key, e)

        if fut is not None and not fut.done():
            # Still waiting: cancel; if the grant wins the race, release it once it lands.
            fut.add_done_callback(unlock)
            ls.cancel(lk)
            return
        unlock()

    # ---------------------------------------------------------------- status

    def status(self) -> list[dict[str, Any]]:
        """Live state of every address (``storaged vip ls`` while the daemon runs)."""
        offset = time.time() - time.monotonic()
        out = []
        for key, e in sorted(self.core.entries.items()):
            owner = self.node.node_id if e.up else self._owner(e.vip)
            out.append({
                **e.vip.to_dict(), "state": self.core.state(key), "owner": owner,
                "node": self.node.node_id, "lock": e.lock,
                "since": None if e.held_since is None else e.held_since + offset,
                "garps_sent": self.garps.get(key, 0), "error": e.error,
                "history": [{"time": t + offset, "event": what} for t, what in e.history]})
        return out

    def _owner(self, v: FloatingAddress) -> int | None:
        """The holder as this node's DLM knows it (when it masters the address lock)."""
        ls = self.node.lockspaces.get(v.lockspace)
        if ls is None:
            return None
        rsb = ls.core.rsbs.get(v.lock_name.encode())
        if rsb is None:
            return None
        for lk in rsb.granted:
            if lk.grmode == Mode.EX:
                return int(lk.owner)
        return None
