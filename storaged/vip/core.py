"""Who holds which floating address, and what to do about it (sans-IO).

The shell (:mod:`storaged.vip.service`) feeds the core what it observes and
executes the actions the core appends to ``actions``, in order:

* inputs: :meth:`VipCore.configure` (the stored addresses),
  :meth:`VipCore.health` (is this node quorate, and is its *lease* fresh),
  :meth:`VipCore.granted` / :meth:`VipCore.lost` (the DLM lock of an
  address), :meth:`VipCore.add_failed` (the kernel refused the address),
  :meth:`VipCore.tick` (time) and :meth:`VipCore.shutdown`;
* actions: :class:`Acquire` / :class:`Release` the address's EX lock,
  :class:`AddAddress` / :class:`RemoveAddress` on the interface,
  :class:`Serve` / :class:`Unserve` its iSCSI portals, :class:`Announce`
  (one gratuitous ARP).

Ownership is the EX lock ``vip:ADDRESS`` in the cluster's DLM: the DLM
grants it to one node at a time, grants it to no one while its holder's
fate is unknown, and recovers it from a dead holder only after the
membership layer reports that node fenced.  The core only adds an address
while it holds the lock *and* the node is quorate *and* its lease is fresh:

* quorate: a node outside a quorate view drops its addresses at once
  (no-quorum stop, whatever the DLM's own no-quorum policy is);
* lease: the shell reports the lease stale when the members that carry
  quorum were not all heard within ``token - 2 x heartbeat``.  A partitioned
  holder therefore drops its addresses before the other side can even
  declare it failed (``token`` after the last heartbeat it got), so the
  address is never up on two nodes, even with an instant fencer.  After a
  gap the same view must be fresh for ``settle`` seconds again (see
  :meth:`VipCore.health`).

Placement: only the best two members of the view in the address's
preference order queue for its lock (:data:`CANDIDATES`), the second one
``preference_delay_ms`` later, so the holder's successor is the preferred
survivor rather than whoever the DLM's queue after a recovery puts first.

Address moves are make-before-announce on one node and break-before-make
across nodes: the old holder removes the address before it unlocks, and the
new holder adds it only once granted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storaged.vip.records import FloatingAddress

#: Retry a lock request this long after the kernel refused to add the address.
ADD_RETRY = 5.0
#: Keep this many history entries per address.
HISTORY = 32
#: Nodes with a request queued for an address: the holder and the next in preference
#: order among the view's members.  Only they queue, so when the holder fails the DLM
#: has one waiter to grant, the most preferred survivor; the next one queues behind
#: it ``preference_delay`` later.
CANDIDATES = 2


@dataclass(frozen=True)
class Acquire:
    """Request the EX lock ``name`` (queue behind the holder)."""

    key: str
    name: str
    lockspace: str


@dataclass(frozen=True)
class Release:
    """Unlock (or cancel the request for) the address lock."""

    key: str


@dataclass(frozen=True)
class AddAddress:
    vip: FloatingAddress


@dataclass(frozen=True)
class RemoveAddress:
    vip: FloatingAddress


@dataclass(frozen=True)
class Serve:
    """Open the iSCSI portals on this address."""

    ip: str


@dataclass(frozen=True)
class Unserve:
    """Close the portals on this address and end the sessions that came in on it."""

    ip: str


@dataclass(frozen=True)
class Announce:
    """Send one gratuitous ARP for the address on its interface."""

    vip: FloatingAddress


Action = Acquire | Release | AddAddress | RemoveAddress | Serve | Unserve | Announce

# Lock states.
NONE, WAITING, HELD = "none", "waiting", "held"


@dataclass
class _Entry:
    vip: FloatingAddress
    lock: str = NONE
    up: bool = False
    request_at: float | None = None      #: when to ask for the lock (None: not scheduled)
    retry_at: float = 0.0                #: not before this (after a failure)
    garp_left: int = 0
    next_garp: float = 0.0
    error: str = ""
    held_since: float | None = None
    history: list[tuple[float, str]] = field(default_factory=list)


class VipCore:
    """The floating addresses of one node; see the module docstring for the protocol."""

    def __init__(self, node_id: int, settle: float = 0.0) -> None:
        self.node_id = node_id
        self.settle = settle
        self.entries: dict[str, _Entry] = {}
        self.quorate = False
        self.lease_ok = False
        self.view: object = None
        self.suspect_view: object = None    #: the view in which the lease last expired
        self.fresh_since: float | None = None
        self.stopping = False
        self.members: tuple[int, ...] = ()
        self.clock_ok = True
        self.actions: list[Action] = []

    # ---------------------------------------------------------------- inputs

    @property
    def eligible(self) -> bool:
        """May this node hold addresses right now?"""
        return self.quorate and self.lease_ok and not self.stopping

    def configure(self, vips: list[FloatingAddress], now: float) -> None:
        """The stored addresses: start competing for new ones, give up removed ones."""
        wanted = {v.key: v for v in vips}
        for key in list(self.entries):
            e = self.entries[key]
            new = wanted.get(key)
            if new is None:
                self._note(e, now, "deleted")
                self._give_up(e)
                del self.entries[key]
            elif new != e.vip:
                changed_iface = (new.address, new.dev) != (e.vip.address, e.vip.dev)
                if e.up and changed_iface:
                    self._take_down(e, now, "reconfigured")
                e.vip = new
        for key, v in wanted.items():
            if key not in self.entries:
                e = self.entries[key] = _Entry(v)
                self._note(e, now, "configured")
        self._step(now)

    def health(self, quorate: bool, lease_ok: bool, now: float,
               members: tuple[int, ...] = (), view: object = None,
               clock_ok: bool = True) -> None:
        """Quorum of the installed view, whether the quorum was heard recently, the
        view's members (empty: unknown, this node is always a candidate) and its id.

        A lease that expired stays expired in the same view until it has been fresh
        again for ``settle`` seconds (token + consensus): the others may have removed
        this node meanwhile, and their view (or the order to rejoin, which drops the
        node's locks) reaches it only after it hears them again.  A new view that
        this node is a quorate member of ends the doubt at once.

        ``clock_ok`` False (this node's kernel clock warns) keeps the node from taking
        addresses that ask for a synchronized clock; it does not drop held ones.
        """
        self.clock_ok = clock_ok
        was = self.eligible
        if not lease_ok:
            if quorate:
                self.suspect_view = view
            self.fresh_since = None
        elif self.suspect_view is not None:
            if view != self.suspect_view:
                self.suspect_view = None
            else:
                if self.fresh_since is None:
                    self.fresh_since = now
                if now - self.fresh_since >= self.settle:
                    self.suspect_view = None
                else:
                    lease_ok = False
        self.view = view
        self.quorate, self.lease_ok = quorate, lease_ok
        if tuple(members) != self.members:
            self.members = tuple(members)
            for e in self.entries.values():
                if e.lock == NONE:  # preference delays count from the view change
                    e.request_at = None
        if self.eligible and not was:
            for e in self.entries.values():
                if e.lock == NONE:  # ... and from the moment of quorum
                    e.request_at = None
        elif was and not self.eligible:
            why = "no quorum" if not quorate else "lease expired (quorum not heard)"
            for e in self.entries.values():
                if e.up:
                    self._take_down(e, now, why)
        self._step(now)

    def granted(self, key: str, now: float) -> None:
        """The EX lock of ``key`` was granted."""
        e = self.entries.get(key)
        if e is None or e.lock != WAITING:
            return
        e.lock = HELD
        self._note(e, now, "lock granted")
        self._step(now)

    def lost(self, key: str, now: float, why: str = "lock lost", retry: float = 0.0) -> None:
        """The lock (or the request for it) of ``key`` is gone; ask again after the
        preference delay, and not before ``retry`` seconds."""
        e = self.entries.get(key)
        if e is None:
            return
        if e.up:
            self._take_down(e, now, why)
        elif e.lock != NONE:
            self._note(e, now, why)
        e.lock = NONE
        e.held_since = None
        e.request_at = None
        e.retry_at = now + retry
        self._step(now)

    def add_failed(self, key: str, error: str, now: float) -> None:
        """The kernel refused the address: let another node have it, retry later."""
        e = self.entries.get(key)
        if e is None:
            return
        e.up = False
        e.error = error
        e.held_since = None
        self._note(e, now, f"add failed: {error}")
        self.actions.append(Unserve(e.vip.ip))
        if e.lock != NONE:
            self.actions.append(Release(key))
            e.lock = NONE
        e.request_at = None
        e.retry_at = now + ADD_RETRY

    def tick(self, now: float) -> None:
        """Timers: delayed lock requests, gratuitous ARP trains, re-announcements."""
        self._step(now)

    def shutdown(self, now: float) -> None:
        """Clean stop: remove every address, then release its lock (never the reverse)."""
        self.stopping = True
        for e in self.entries.values():
            self._note(e, now, "shutdown")
            self._give_up(e)

    # --------------------------------------------------------------- queries

    def state(self, key: str) -> str:
        """One word for ``vip ls``: held, standby, taking, no-quorum, lease-expired,
        failed, clock-unsynced, stopped."""
        e = self.entries[key]
        if e.up:
            return "held"
        if self.stopping:
            return "stopped"
        if not self.quorate:
            return "no-quorum"
        if not self.lease_ok:
            return "lease-expired"
        if e.error and e.lock == NONE:
            return "failed"
        if e.vip.require_synced_clock and not self.clock_ok and e.lock == NONE:
            return "clock-unsynced"
        if e.lock == HELD:
            return "taking"
        return "standby"

    def held(self) -> list[str]:
        """Keys of the addresses up on this node."""
        return [k for k, e in self.entries.items() if e.up]

    # -------------------------------------------------------------- internal

    def _note(self, e: _Entry, now: float, what: str) -> None:
        e.history.append((now, what))
        del e.history[:-HISTORY]

    def position(self, v: FloatingAddress) -> int:
        """This node's place among the view's members in ``v``'s preference order."""
        if not self.members:
            return v.rank(self.node_id)
        order = sorted(self.members, key=lambda n: (v.rank(n), n))
        return order.index(self.node_id) if self.node_id in order else len(order)

    def _take_down(self, e: _Entry, now: float, why: str) -> None:
        e.up = False
        e.held_since = None
        e.garp_left = 0
        self._note(e, now, f"dropped: {why}")
        self.actions.append(RemoveAddress(e.vip))
        self.actions.append(Unserve(e.vip.ip))

    def _give_up(self, e: _Entry) -> None:
        if e.up:
            e.up = False
            self.actions.append(RemoveAddress(e.vip))
            self.actions.append(Unserve(e.vip.ip))
        if e.lock != NONE:
            self.actions.append(Release(e.vip.key))
            e.lock = NONE
        e.request_at = None

    def _step(self, now: float) -> None:
        eligible = self.eligible
        for key, e in self.entries.items():
            v = e.vip
            place = self.position(v)
            candidate = place < CANDIDATES and (self.clock_ok or not v.require_synced_clock)
            if e.lock == WAITING and not candidate:
                # Better placed members joined: leave the queue to them, so the DLM's
                # order (arbitrary after a recovery) cannot pick a less preferred node.
                self._note(e, now, "standing down: better placed members"
                           if self.clock_ok else "standing down: kernel clock not synchronized")
                self.actions.append(Release(key))
                e.lock = NONE
            if e.lock != NONE or not candidate:
                e.request_at = None
            elif eligible and now >= e.retry_at:
                if e.request_at is None:
                    e.request_at = now + place * v.preference_delay_ms / 1000
                if now >= e.request_at:
                    e.request_at = None
                    e.lock = WAITING
                    self._note(e, now, "lock requested")
                    self.actions.append(Acquire(key, v.lock_name, v.lockspace))
            if eligible and e.lock == HELD and not e.up:
                e.up = True
                e.error = ""
                e.held_since = now
                self._note(e, now, "taken")
                self.actions.append(AddAddress(v))
                self.actions.append(Serve(v.ip))
                e.garp_left, e.next_garp = v.garp_count, now
            if not e.up:
                continue
            if e.garp_left > 0 and now >= e.next_garp:
                # One per tick, at least garp_interval apart (IPaddr2: 5 at 200 ms).
                self.actions.append(Announce(v))
                e.garp_left -= 1
                e.next_garp = now + (v.garp_interval_ms / 1000 if e.garp_left
                                     else v.reannounce_s)
            elif e.garp_left == 0 and v.reannounce_s and now >= e.next_garp:
                self.actions.append(Announce(v))
                e.next_garp = now + v.reannounce_s
