"""One persistent reservation state for an LU served by several storage nodes.

When storage nodes of one cluster export the same backing storage (a shared
device, or one image file several daemons open), SPC-4 still sees *one*
logical unit with several target ports: a registration, reservation,
PREEMPT, PREEMPT AND ABORT, CLEAR or RELEASE made through any port must hold
on every port before GOOD is returned (SPC-4 §5.14.1), and PRgeneration is
the LU's.  This module is the cluster PR state backend
(:mod:`storaged.scsi.pr_backend`) that makes it so, for backstores marked
``shared``, in the way SCST does it with the Linux DLM.  It lives with the
SCSI semantics and uses the cluster node below it (membership, DLM,
messages), so the import arrows point down; the PR command logic in
:mod:`storaged.scsi.pr` never sees the cluster.


* **one DLM lock per LU** (``pr:<NAA WWN>`` in the ``default`` lockspace, or
  the first one configured),
  taken EX around every PERSISTENT RESERVE OUT, so changes are serialised
  cluster-wide;
* **the lock value block** carries the LU's change counter ``seq`` and
  PRgeneration (``>QI``).  The node that takes the lock and finds a ``seq``
  newer than its own (or an invalid / empty LVB: its master died) first
  *catches up*: it asks every member for its state and takes the newest.
  Until a node caught up (at start, and after it lost quorum) PERSISTENT
  RESERVE IN through it gets NOT READY 04h/0Ch;
* **broadcast before completion**: the change's
  :class:`~storaged.scsi.pr_backend.Update` (the new state plus the unit
  attentions and task aborts it causes) goes to every member of the view,
  which applies it to its copy, raises the unit attentions for its own I_T
  nexuses, aborts the preempted nexuses' tasks (PREEMPT AND ABORT), saves
  the state in its own store if APTPL, and acknowledges.  Only when every
  member acknowledged (or left the view: it will be fenced and catch up
  when it rejoins) is the lock released, with the new LVB, and the command
  completed;
* **rejoin**: on every quorate view, and before the daemon opens its
  portals, each shared LU catches up under the lock.

Messages ride on the cluster node's FIFO per-peer channels
(:attr:`ClusterNode.handlers`): ``prs`` (an update) / ``prsa`` (applied),
``prq`` (state query) / ``prr`` (state).  A node without quorum cannot take
the lock: its PERSISTENT RESERVE OUT ends in NOT READY, LOGICAL UNIT NOT
ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (04h/0Ch) so a multipath
initiator retries through another node.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storaged.dlm.api import LockError
from storaged.dlm.modes import Flag, Mode
from storaged.scsi.pr_backend import Change, Update
from storaged.scsi.sense import Key
from storaged.scsi.types import ScsiResult

if TYPE_CHECKING:
    from storaged.cluster.membership import View
    from storaged.cluster.node import ClusterNode
    from storaged.scsi.lu import LogicalUnit
    from storaged.scsi.pr import PersistentReservations

log = logging.getLogger("storaged.scsi.pr_cluster")

LOCK_PREFIX = "pr:"
LVB = struct.Struct(">QI")
"""Lock value block: the LU's PR change counter and PRgeneration."""

UNAVAILABLE = (0x04, 0x0C)  # LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE


def lock_name(wwn: str) -> str:
    """The DLM resource of one shared LU (its NAA WWN names it on every node)."""
    return LOCK_PREFIX + wwn.lower()


def pack_lvb(seq: int, generation: int) -> bytes:
    return LVB.pack(seq, generation & 0xFFFFFFFF)


def unpack_lvb(lvb: bytes | None) -> tuple[int, int]:
    """(seq, generation) from a lock value block; (0, 0) if empty."""
    if not lvb or len(lvb) < LVB.size:
        return 0, 0
    return LVB.unpack(lvb[:LVB.size])


class SharedPrError(Exception):
    """The cluster could not make a PR change hold (no quorum, peers gone silent)."""


@dataclass
class _Wait:
    """Replies still expected for one broadcast."""

    pending: set[int]
    fut: asyncio.Future
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)


class SharedPr:
    """The shared-PR service of one daemon: LUs by WWN, messages, catch-up."""

    def __init__(self, node: ClusterNode, *, lockspace: str = "default",
                 lock_timeout: float = 20.0, ack_timeout: float = 30.0,
                 query_timeout: float = 5.0) -> None:
        self.node = node
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        # The configured lockspace list may not have "default": take the first one.
        self.lockspace = lockspace if lockspace in node.lockspaces else next(iter(node.lockspaces))
        self.lock_timeout = lock_timeout
        self.ack_timeout = ack_timeout
        self.query_timeout = query_timeout
        self.lus: dict[str, PersistentReservations] = {}
        self.synced: set[str] = set()
        """WWNs caught up with the group since they were attached."""
        self._tried: set[str] = set()
        """WWNs :meth:`sync_new` already waited for (later views retry them)."""
        self._waits: dict[int, _Wait] = {}
        self._next = 1
        self._catchups: set[asyncio.Task] = set()
        self._resetting: LogicalUnit | None = None
        node.handlers.update({"prs": self._on_update, "prsa": self._on_reply,
                              "prq": self._on_query, "prr": self._on_reply,
                              "lur": self._on_lu_reset, "lura": self._on_reply})
        node.view_listeners.append(self._on_view)

    # ------------------------------------------------------------ LUs
    def attach(self, lu: LogicalUnit) -> None:
        """Serve ``lu``'s PR state with the group (its WWN names it cluster-wide)."""
        wwn = lu.wwn.lower()
        self.lus[wwn] = lu.pr
        lu.pr.backend = ClusterPrBackend(self, wwn)
        if self._lu_reset not in lu.reset_hooks:
            lu.reset_hooks.append(self._lu_reset)

    def detach(self, lu: LogicalUnit) -> None:
        """Back to a local PR state (the backstore is no longer shared or closed)."""
        from storaged.scsi.pr_backend import LOCAL

        wwn = lu.wwn.lower()
        if self.lus.get(wwn) is lu.pr:
            del self.lus[wwn]
            self.synced.discard(wwn)
            self._tried.discard(wwn)
        lu.pr.backend = LOCAL
        if self._lu_reset in lu.reset_hooks:
            lu.reset_hooks.remove(self._lu_reset)

    def _lu_reset(self, lu: LogicalUnit, asc: int, ascq: int) -> None:
        """A LOGICAL UNIT RESET (or target reset) through this node resets the LU
        on every node: their I_T nexuses get the unit attention too (SAM-5
        §6.3.3).  The hook cannot wait (the TMF runs on the loop); it leaves a
        barrier future on the LU that the task management response waits for,
        done once every peer acknowledged (or left the view, or after
        ``query_timeout``)."""
        if lu is self._resetting:
            return
        peers = self._peers()
        if not peers:
            return
        rid = self._next
        self._next += 1
        w = _Wait(set(peers), self.loop.create_future())
        self._waits[rid] = w
        for p in peers:
            self.node.send(p, {"t": "lur", "id": rid, "w": lu.wwn.lower(), "asc": asc,
                               "ascq": ascq})

        def give_up() -> None:
            if not w.fut.done():
                log.warning("shared LU %s: reset not acknowledged by nodes %s", lu.wwn,
                            sorted(w.pending))
                w.fut.set_result(None)
        timer = self.loop.call_later(self.query_timeout, give_up)
        w.fut.add_done_callback(lambda _f: (timer.cancel(), self._waits.pop(rid, None)))
        # The task management response waits for it (ScsiTarget.take_reset_barriers).
        lu.reset_barriers.append(w.fut)

    def _on_lu_reset(self, src: int, msg: dict[str, Any]) -> None:
        pr = self.lus.get(str(msg.get("w", "")).lower())
        if pr is not None:
            self._resetting = pr.lu
            try:
                pr.lu.reset(int(msg["asc"]), int(msg["ascq"]))
            finally:
                self._resetting = None
                pr.lu.reset_barriers.clear()
        self.node.send(src, {"t": "lura", "id": msg.get("id")})

    def close(self) -> None:
        """Stop listening (daemon shutdown)."""
        for kind in ("prs", "prsa", "prq", "prr", "lur", "lura"):
            self.node.handlers.pop(kind, None)
        if self._on_view in self.node.view_listeners:
            self.node.view_listeners.remove(self._on_view)
        for t in list(self._catchups):
            t.cancel()
        for w in self._waits.values():      # nobody will answer any more
            if not w.fut.done():
                w.fut.set_result(None)

    # ------------------------------------------------------------ messages
    def _peers(self) -> list[int]:
        v = self.node.view
        return [] if v is None else [n for n in v.nodes if n != self.node.node_id]

    async def _gather(self, kind: str, body: dict[str, Any],
                      timeout: float) -> dict[int, dict[str, Any]]:
        """Send ``kind`` to every other member; their replies once all answered
        or left the view.  TimeoutError if some member stays silent."""
        peers = self._peers()
        if not peers:
            return {}
        rid = self._next
        self._next += 1
        w = _Wait(set(peers), self.loop.create_future())
        self._waits[rid] = w
        for p in peers:
            self.node.send(p, {"t": kind, "id": rid, **body})
        try:
            await asyncio.wait_for(asyncio.shield(w.fut), timeout)
        finally:
            self._waits.pop(rid, None)
        return w.replies

    def _on_reply(self, src: int, msg: dict[str, Any]) -> None:
        w = self._waits.get(msg.get("id"))  # type: ignore[arg-type]
        if w is None or src not in w.pending:
            return
        w.replies[src] = msg
        w.pending.discard(src)
        if not w.pending and not w.fut.done():
            w.fut.set_result(None)

    def _on_update(self, src: int, msg: dict[str, Any]) -> None:
        """Another node changed a shared LU's PR state: apply it, then acknowledge."""
        ok = True
        pr = self.lus.get(str(msg.get("w", "")).lower())
        if pr is not None:
            try:
                pr.apply_update(Update.from_dict(msg["u"]))
            except Exception:  # noqa: BLE001 - reported to the sender, never fatal here
                log.exception("cannot apply a PR update from node %d", src)
                ok = False
        self.node.send(src, {"t": "prsa", "id": msg.get("id"), "ok": ok})

    def _on_query(self, src: int, msg: dict[str, Any]) -> None:
        pr = self.lus.get(str(msg.get("w", "")).lower())
        if pr is None:
            reply = {"t": "prr", "id": msg.get("id"), "seq": -1, "state": None}
        else:
            with pr.lock:
                reply = {"t": "prr", "id": msg.get("id"), "seq": pr.seq, "state": pr.to_dict()}
        self.node.send(src, reply)

    def _on_view(self, view: View) -> None:
        if not view.quorate:
            # Cut off: changes may happen without us; PR IN waits for the catch-up.
            self.synced.clear()
        members = set(view.nodes)
        for w in list(self._waits.values()):
            w.pending &= members
            if not w.pending and not w.fut.done():
                w.fut.set_result(None)
        if view.quorate and self.lus:
            # A node that (re)joins, or whose peers did, compares states.
            task = self.loop.create_task(self._catch_up_all(list(self.lus)))
            self._catchups.add(task)
            task.add_done_callback(self._catchups.discard)

    # ------------------------------------------------------------ catch-up
    async def _catch_up_all(self, wwns: list[str]) -> None:
        for wwn in wwns:
            try:
                await self.sync(wwn)
            except (SharedPrError, LockError, TimeoutError) as e:
                log.warning("shared LU %s: PR state not caught up: %s", wwn, e)

    async def sync_new(self, timeout: float = 20.0) -> None:
        """Catch up every attached LU not synced yet (before the portals open):
        waits up to ``timeout`` for the cluster to be ready."""
        todo = [w for w in self.lus if w not in self.synced and w not in self._tried]
        if not todo:
            return
        self._tried.update(todo)
        try:
            await self.node.wait_ready(timeout=timeout)
        except TimeoutError:
            log.warning("cluster not ready after %gs: shared LUs %s serve their local PR "
                        "state until it is", timeout, ", ".join(todo))
            return
        await self._catch_up_all(todo)

    async def sync(self, wwn: str) -> None:
        """Catch one LU up with the group, under its lock."""
        pr = self.lus.get(wwn)
        if pr is None:
            return
        lk = await self._lock(wwn)
        try:
            seq, _gen = unpack_lvb(lk.lvb) if lk.lvb_valid else (None, 0)
            await self._catch_up(pr, wwn, seq)
        finally:
            await self._unlock(lk, pr)
        self.synced.add(wwn)

    async def _catch_up(self, pr: PersistentReservations, wwn: str,
                        lvb_seq: int | None) -> None:
        """Take the newest state any member has, if newer than ours.  Raises
        SharedPrError if the LVB says a newer state exists that nobody sent."""
        try:
            replies = await self._gather("prq", {"w": wwn}, self.query_timeout)
        except TimeoutError:
            replies = {}
            log.warning("shared LU %s: not every node answered the state query", wwn)
        best: dict[str, Any] | None = None
        for r in replies.values():
            if r.get("state") is not None and int(r.get("seq", -1)) > \
                    (-1 if best is None else int(best["seq"])):
                best = r
        if best is not None and int(best["seq"]) > pr.seq:
            pr.apply_update(Update(int(best["seq"]), best["state"], []))
            log.info("shared LU %s: PR state caught up to change %d (generation %d)", wwn,
                     pr.seq, pr.generation)
        if lvb_seq is not None and lvb_seq > pr.seq:
            raise SharedPrError(f"the lock value block says change {lvb_seq}, but the "
                                f"newest state found is change {pr.seq}")

    # ------------------------------------------------------------ locking
    async def _lock(self, wwn: str) -> Any:
        if not self.node.quorate():
            raise SharedPrError("this storage node has no quorum")
        ls = self.node.lockspace(self.lockspace)
        return await ls.lock(lock_name(wwn), Mode.EX, flags=Flag.VALBLK,
                             timeout=self.lock_timeout)

    async def _unlock(self, lk: Any, pr: PersistentReservations) -> None:
        ls = self.node.lockspace(self.lockspace)
        seq, _gen = unpack_lvb(lk.lvb)
        try:
            await ls.unlock(lk, lvb=pack_lvb(max(seq, pr.seq), pr.generation),
                            flags=Flag.VALBLK)
        except LockError as e:
            log.warning("releasing %s: %s", lk.name, e)

    async def run_change(self, pr: PersistentReservations, wwn: str,
                         change: Change) -> ScsiResult:
        """One PR change under the LU's cluster lock, applied by every member
        before it returns (see the module docstring)."""
        try:
            lk = await self._lock(wwn)
        except (SharedPrError, LockError, TimeoutError) as e:
            log.warning("shared LU %s: PERSISTENT RESERVE OUT refused: %s", wwn, e)
            return pr.lu.check(Key.NOT_READY, *UNAVAILABLE)
        try:
            seq = unpack_lvb(lk.lvb)[0] if lk.lvb_valid else None
            if seq is None or seq == 0 or seq > pr.seq:
                try:
                    await self._catch_up(pr, wwn, seq)
                except SharedPrError as e:
                    log.error("shared LU %s: %s", wwn, e)
                    return pr.lu.check(Key.NOT_READY, *UNAVAILABLE)
            self.synced.add(wwn)
            result, update = change()
            if update is not None:
                started = time.monotonic()
                try:
                    replies = await self._gather("prs", {"w": wwn, "u": update.to_dict()},
                                                 self.ack_timeout)
                except TimeoutError:
                    log.error("shared LU %s: change %d not acknowledged by every node "
                              "within %gs", wwn, update.seq, self.ack_timeout)
                    return pr.lu.check(Key.HARDWARE_ERROR, 0x44, 0x00)
                bad = [n for n, r in replies.items() if not r.get("ok", True)]
                if bad:
                    log.error("shared LU %s: nodes %s could not apply change %d", wwn, bad,
                              update.seq)
                    return pr.lu.check(Key.HARDWARE_ERROR, 0x44, 0x00)
                log.debug("shared LU %s: change %d on %d peer(s) in %.1f ms", wwn, update.seq,
                          len(replies), (time.monotonic() - started) * 1000)
            return result
        finally:
            await self._unlock(lk, pr)


class ClusterPrBackend:
    """PR state backend of one shared LU (storaged.scsi.pr_backend.PrBackend)."""

    blocking = True

    def __init__(self, shared: SharedPr, wwn: str) -> None:
        self.shared = shared
        self.wwn = wwn

    def run(self, pr: PersistentReservations, change: Change) -> ScsiResult:
        loop = self.shared.loop
        if threading.get_ident() == self.shared.loop_thread:
            # The transport must run PERSISTENT RESERVE OUT off the loop (may_block).
            log.error("shared LU %s: PERSISTENT RESERVE OUT on the event loop", self.wwn)
            return pr.lu.check(Key.HARDWARE_ERROR, 0x44, 0x00)
        fut = asyncio.run_coroutine_threadsafe(self.arun(pr, change), loop)
        s = self.shared
        try:
            # Every wait inside is bounded; this only guards against a loop that stopped.
            return fut.result(timeout=s.lock_timeout + s.ack_timeout + 2 * s.query_timeout + 10)
        except TimeoutError:
            fut.cancel()
            log.error("shared LU %s: PERSISTENT RESERVE OUT did not finish", self.wwn)
            return pr.lu.check(Key.HARDWARE_ERROR, 0x44, 0x00)

    async def arun(self, pr: PersistentReservations, change: Change) -> ScsiResult:
        return await self.shared.run_change(pr, self.wwn, change)

    def stale(self, pr: PersistentReservations) -> ScsiResult | None:
        """Until this node caught up with the group (at start, after losing
        quorum), PERSISTENT RESERVE IN gets NOT READY 04h/0Ch: a multipath
        initiator (fence_scsi's status check) asks another node instead of
        reading keys that may be gone."""
        if self.wwn in self.shared.synced:
            return None
        return pr.lu.check(Key.NOT_READY, *UNAVAILABLE)


__all__ = ["ClusterPrBackend", "SharedPr", "SharedPrError", "lock_name", "pack_lvb",
           "unpack_lvb"]
