"""The IPVS schedulers, sans-IO, as the Linux kernel implements them.

Each scheduler follows its ``net/netfilter/ipvs/ip_vs_<name>.c`` selection
code, including the order in which real servers are examined and how ties
break, so that an LVS admin's intuition (and ``ipvsadm`` habits) carry over
to iSCSI logins:

* The destination list is in kernel order: ``ip_vs_add_dest`` links a new
  real server at the *head* of the service's list (``list_add_rcu``), so the
  most recently added real server is examined first.
* ``IP_VS_DEST_F_OVERLOAD`` follows ``ip_vs_bind_dest``/``ip_vs_unbind_dest``:
  set when a new connection makes ``active + inactive >= upper``; cleared on a
  connection's end when below ``lower`` (or, with no lower threshold, below
  3/4 of ``upper``); an edit that removes or raises ``upper`` clears it.
* A real server taken out of a service goes to the kernel's "trash": it is no
  longer available, and adding the same server again revives that object
  (so lblc/lblcr cache entries that point at it become valid again).

What counts as a connection for iSCSI (the caller feeds the counts in):

* **active** -- normal sessions of the real server in full feature phase
  (logged-in sessions), like ESTABLISHED TCP connections in LVS;
* **inactive** -- logins redirected to the real server that have not yet
  completed there, plus logins in progress on it: LVS counts a new TCP
  connection as inactive until it is established, and doing the same keeps
  a burst of logins from all landing on the one server that looked least
  loaded before any of them arrived.

The hash-based schedulers need 32-bit keys: ``sh`` hashes the initiator's
address (IPv4, or the XOR fold of an IPv6 address, as the kernel does);
``dh``/``lblc``/``lblcr`` hash the *destination*, which for a login to a
virtual service is always the VIP, so this module takes the requested
target name folded to 32 bits (:func:`fold_name`) as the destination key:
logins to one target go to the same node (locality, as dh gives a cache
cluster).
"""

from __future__ import annotations

import ipaddress
import math
import zlib
from dataclasses import dataclass, field

#: ``ip_vs_dest_conn_overhead``: an active connection weighs 256 inactive ones.
ACTIVE_SHIFT = 8
#: 256-bucket tables of sh and dh (``CONFIG_IP_VS_{SH,DH}_TAB_BITS`` = 8).
TAB_BITS = 8
TAB_SIZE = 1 << TAB_BITS
TAB_MASK = TAB_SIZE - 1
GOLDEN_RATIO_32 = 0x61C88647
#: lblc/lblcr ``sysctl_lbl{c,cr}_expiration`` default: 24 hours.
LBLC_EXPIRATION = 24 * 60 * 60
#: ipvsadm's default persistence timeout (``-p`` without a value), seconds.
DEFAULT_PERSISTENCE = 300

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh", "lblc", "lblcr")


def hash_32(val: int, bits: int) -> int:
    """``include/linux/hash.h``: multiply by the 32-bit golden ratio, keep the top bits."""
    return ((val * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


def addr_key(address: str) -> int:
    """The kernel's 32-bit view of an address: IPv4 as a host-order integer,
    IPv6 folded as ``ip6[0]^ip6[1]^ip6[2]^ip6[3]``."""
    ip = ipaddress.ip_address(address.strip("[]"))
    if ip.version == 4:
        return int(ip)
    v = int(ip)
    return ((v >> 96) ^ (v >> 64) ^ (v >> 32) ^ v) & 0xFFFFFFFF


def fold_name(name: str) -> int:
    """A target name as a 32-bit destination key (CRC-32 of the lowercased name)."""
    return zlib.crc32(name.lower().encode()) & 0xFFFFFFFF


@dataclass(eq=False)
class Dest:
    """One real server of a virtual service (``struct ip_vs_dest``)."""

    name: str
    weight: int = 1
    u_threshold: int = 0
    l_threshold: int = 0
    activeconns: int = 0
    inactconns: int = 0
    overload: bool = False
    available: bool = True

    def overhead(self) -> int:
        """``ip_vs_dest_conn_overhead``: active*256 + inactive."""
        return (self.activeconns << ACTIVE_SHIFT) + self.inactconns

    def totalconns(self) -> int:
        return self.activeconns + self.inactconns

    def bound(self) -> None:
        """After a connection was added (``ip_vs_bind_dest``)."""
        if self.u_threshold and self.totalconns() >= self.u_threshold:
            self.overload = True

    def unbound(self) -> None:
        """After a connection went away (``ip_vs_unbind_dest``)."""
        if self.l_threshold:
            if self.totalconns() < self.l_threshold:
                self.overload = False
        elif self.u_threshold:
            if self.totalconns() * 4 < self.u_threshold * 3:
                self.overload = False
        else:
            self.overload = False


@dataclass
class Request:
    """What a scheduler sees of a login: source address key, destination key."""

    src: int = 0
    dst: int = 0
    port: int = 0


def _ok(d: Dest) -> bool:
    """Not overloaded and weight > 0: may take new connections."""
    return not d.overload and d.weight > 0


class Scheduler:
    """Base: the hooks ``struct ip_vs_scheduler`` has; stateless by default."""

    name = ""

    def init(self, dests: list[Dest]) -> None:
        pass

    def add_dest(self, dests: list[Dest], dest: Dest) -> None:
        pass

    def del_dest(self, dests: list[Dest], dest: Dest, index: int) -> None:
        """``dest`` was at ``index`` and is already unlinked from ``dests``."""

    def upd_dest(self, dests: list[Dest], dest: Dest) -> None:
        pass

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        raise NotImplementedError


class RoundRobin(Scheduler):
    """ip_vs_rr.c: next dest after the last pick with weight > 0, not overloaded."""

    name = "rr"

    def __init__(self) -> None:
        self.cursor = -1  # index of the last pick; -1 is the list head

    def init(self, dests: list[Dest]) -> None:
        self.cursor = -1

    def del_dest(self, dests: list[Dest], dest: Dest, index: int) -> None:
        # The cursor on the removed dest moves to its predecessor (p->next->prev).
        if index == self.cursor:
            self.cursor = index - 1
        elif index < self.cursor:
            self.cursor -= 1

    def add_dest(self, dests: list[Dest], dest: Dest) -> None:
        if self.cursor >= 0:
            self.cursor += 1  # the new dest went in at the head, before the cursor

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        n = len(dests)
        start = self.cursor
        # Walk from the entry after the cursor round to the cursor itself (one
        # full lap, the head excluded); from the head, one pass over the list.
        order = list(range(start + 1, n)) + (list(range(0, start + 1)) if start >= 0 else [])
        for i in order:
            if _ok(dests[i]):
                self.cursor = i
                return dests[i]
        return None


class WeightedRoundRobin(Scheduler):
    """ip_vs_wrr.c: passes with current weight cw from max weight down by the gcd."""

    name = "wrr"

    def __init__(self) -> None:
        self.cl = -1
        self.cw = self.mw = 0
        self.di = 1

    def _marks(self, dests: list[Dest]) -> None:
        g = 0
        for d in dests:
            if d.weight > 0:
                g = math.gcd(d.weight, g) if g > 0 else d.weight
        self.di = g or 1
        self.mw = max([0] + [d.weight for d in dests]) - (self.di - 1)

    def init(self, dests: list[Dest]) -> None:
        self.cl = -1
        self._marks(dests)
        self.cw = self.mw

    def _changed(self, dests: list[Dest]) -> None:
        self.cl = -1
        self._marks(dests)
        if self.cw > self.mw or not self.cw:
            self.cw = self.mw
        elif self.di > 1:
            self.cw = (self.cw // self.di) * self.di + 1

    def add_dest(self, dests: list[Dest], dest: Dest) -> None:
        self._changed(dests)

    def del_dest(self, dests: list[Dest], dest: Dest, index: int) -> None:
        self._changed(dests)

    def upd_dest(self, dests: list[Dest], dest: Dest) -> None:
        self._changed(dests)

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        if self.mw == 0:
            return None
        last = self.cl
        stop: int | None = None
        last_pass = restarted = False
        start = self.cl
        while True:
            for j in range(start + 1, len(dests)):
                d = dests[j]
                if not d.overload and d.weight >= self.cw:
                    self.cl = j
                    return d
                if j == stop:
                    self.cl = j
                    return None
            start = -1  # back at the head
            self.cw -= self.di
            if self.cw <= 0:
                self.cw = self.mw
                if last_pass or last == -1:
                    self.cl = -1
                    return None
                restarted = True
            last_pass = self.cw <= self.di
            if last_pass and restarted and last != -1:
                stop = last


def _least_weighted(cands: list[Dest], cost: str = "overhead") -> Dest | None:
    """The wlc/sed selection loop: first usable dest, then any with a strictly
    smaller cost/weight (cross-multiplied) wins; overloaded dests are skipped
    (weight 0 can never win after the first pick, since loh*0 > doh*w fails)."""
    least: Dest | None = None
    loh = 0
    for d in cands:
        doh = d.overhead() if cost == "overhead" else d.activeconns + 1
        if least is None:
            if _ok(d):
                least, loh = d, doh
            continue
        if d.overload:
            continue
        if loh * d.weight > doh * least.weight:
            least, loh = d, doh
    return least


class LeastConnection(Scheduler):
    """ip_vs_lc.c: least active*256+inactive, weight only as 0 = quiesced."""

    name = "lc"

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        least: Dest | None = None
        loh = 0
        for d in dests:
            if d.overload or d.weight == 0:
                continue
            doh = d.overhead()
            if least is None or doh < loh:
                least, loh = d, doh
        return least


class WeightedLeastConnection(Scheduler):
    """ip_vs_wlc.c: least (active*256+inactive)/weight."""

    name = "wlc"

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        return _least_weighted(dests)


class ShortestExpectedDelay(Scheduler):
    """ip_vs_sed.c: least (active+1)/weight."""

    name = "sed"

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        return _least_weighted(dests, cost="sed")


class NeverQueue(Scheduler):
    """ip_vs_nq.c: the first idle dest (no active connection), else as sed."""

    name = "nq"

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        least: Dest | None = None
        loh = 0
        for d in dests:
            if d.overload or not d.weight:
                continue
            doh = d.activeconns + 1
            if d.activeconns == 0:
                return d
            if least is None or loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


class _HashTable(Scheduler):
    """A 256-bucket table reassigned on every add/remove/edit of a dest."""

    def __init__(self) -> None:
        self.buckets: list[Dest | None] = [None] * TAB_SIZE

    def assign(self, dests: list[Dest]) -> None:
        raise NotImplementedError

    def init(self, dests: list[Dest]) -> None:
        self.assign(dests)

    def add_dest(self, dests: list[Dest], dest: Dest) -> None:
        self.assign(dests)

    def del_dest(self, dests: list[Dest], dest: Dest, index: int) -> None:
        self.assign(dests)

    def upd_dest(self, dests: list[Dest], dest: Dest) -> None:
        self.assign(dests)


class SourceHashing(_HashTable):
    """ip_vs_sh.c: bucket hash_32(port + source address); weight w fills w
    consecutive buckets (weight 0 still takes one, and is then refused).

    ``fallback`` (ipvsadm ``-b sh-fallback``) walks the table for an usable
    dest when the hashed one is not; ``port`` (``-b sh-port``) adds the
    initiator's source port to the hash.
    """

    name = "sh"

    def __init__(self, fallback: bool = False, port: bool = False) -> None:
        super().__init__()
        self.fallback = fallback
        self.use_port = port

    def assign(self, dests: list[Dest]) -> None:
        if not dests:
            self.buckets = [None] * TAB_SIZE
            return
        out: list[Dest | None] = []
        p, count = 0, 0
        for _ in range(TAB_SIZE):
            d = dests[p % len(dests)]
            out.append(d)
            count += 1
            if count >= d.weight:
                p, count = p + 1, 0
        self.buckets = out

    def hashkey(self, req: Request, offset: int = 0) -> int:
        port = req.port if self.use_port else 0
        return (offset + hash_32((port + req.src) & 0xFFFFFFFF, TAB_BITS)) & TAB_MASK

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        ihash = self.hashkey(req)
        d = self.buckets[ihash]
        if d is None:
            return None
        if _ok(d):
            return d
        if not self.fallback:
            return None
        for offset in range(TAB_SIZE):
            roffset = (offset + ihash) % TAB_SIZE
            d = self.buckets[self.hashkey(req, roffset)]
            if d is None:
                return None
            if _ok(d):
                return d
        return None


class DestinationHashing(_HashTable):
    """ip_vs_dh.c: bucket hash_32(destination); one bucket per dest in turn."""

    name = "dh"

    def assign(self, dests: list[Dest]) -> None:
        self.buckets = ([dests[i % len(dests)] for i in range(TAB_SIZE)] if dests
                        else [None] * TAB_SIZE)

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        d = self.buckets[hash_32(req.dst, TAB_BITS)]
        if d is None or not d.available or not _ok(d):
            return None
        return d


def _lblc_overloaded(dest: Dest, dests: list[Dest]) -> bool:
    """lblc/lblcr ``is_overloaded``: more active connections than its weight
    while some dest has fewer than half its weight."""
    if dest.activeconns > dest.weight:
        return any(d.activeconns * 2 < d.weight for d in dests)
    return False


@dataclass
class _Entry:
    dest: Dest | None = None
    lastuse: float = 0.0
    dset: list[Dest] = field(default_factory=list)  # lblcr: newest first (list_add)
    lastmod: float = 0.0


class LocalityLeastConnection(Scheduler):
    """ip_vs_lblc.c: a destination keeps its dest while that one is usable
    and not overloaded; else the weighted least-connection dest takes over.

    Entries unused for ``expiration`` seconds are dropped (the kernel's
    periodic garbage collection with ``lblc_expiration``, 24 h by default).
    """

    name = "lblc"

    def __init__(self, expiration: float = LBLC_EXPIRATION) -> None:
        self.table: dict[int, _Entry] = {}
        self.expiration = expiration

    def init(self, dests: list[Dest]) -> None:
        self.table.clear()

    def _get(self, key: int, now: float) -> _Entry | None:
        en = self.table.get(key)
        if en is not None and now - en.lastuse > self.expiration:
            del self.table[key]
            return None
        return en

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        en = self._get(req.dst, now)
        if en is not None:
            en.lastuse = now
            d = en.dest
            if d is not None and d.available and d.weight > 0 and not _lblc_overloaded(d, dests):
                return d
        d = _least_weighted(dests)
        if d is None:
            return None
        if en is None:
            self.table[req.dst] = _Entry(dest=d, lastuse=now)
        else:
            en.dest = d
        return d


class LocalityLeastConnectionReplication(LocalityLeastConnection):
    """ip_vs_lblcr.c: a destination maps to a *set* of dests; the set grows
    with the weighted least-connection dest when its least-loaded member is
    overloaded, and sheds its most-loaded member when unchanged for
    ``expiration`` seconds."""

    name = "lblcr"

    @staticmethod
    def _set_min(dset: list[Dest]) -> Dest | None:
        least: Dest | None = None
        loh = 0
        for d in dset:
            if least is None:
                if d.overload:
                    continue
                if d.weight > 0 and d.available:
                    least, loh = d, d.overhead()
                continue
            if d.overload:
                continue
            doh = d.overhead()
            if loh * d.weight > doh * least.weight and d.available:
                least, loh = d, doh
        return least

    @staticmethod
    def _set_max(dset: list[Dest]) -> Dest | None:
        most: Dest | None = None
        moh = 0
        for d in dset:
            if most is None:
                if d.weight > 0:
                    most, moh = d, d.overhead()
                continue
            doh = d.overhead()
            if moh * d.weight < doh * most.weight and d.weight > 0:
                most, moh = d, doh
        return most

    def schedule(self, dests: list[Dest], req: Request, now: float) -> Dest | None:
        en = self._get(req.dst, now)
        if en is not None:
            en.lastuse = now
            d = self._set_min(en.dset)
            if len(en.dset) > 1 and now > en.lastmod + self.expiration:
                m = self._set_max(en.dset)
                if m is not None:
                    en.dset.remove(m)
                    en.lastmod = now
            if d is not None and not _lblc_overloaded(d, dests):
                return d
            d = _least_weighted(dests)
            if d is None:
                return None
            if d not in en.dset:
                en.dset.insert(0, d)
                en.lastmod = now
            return d
        d = _least_weighted(dests)
        if d is None:
            return None
        self.table[req.dst] = _Entry(dset=[d], lastuse=now, lastmod=now)
        return d


def make_scheduler(name: str, flags: frozenset[str] = frozenset()) -> Scheduler:
    """A scheduler by its ipvsadm name (``-s``); ``flags`` are ``-b`` flags."""
    classes: dict[str, type[Scheduler]] = {
        "rr": RoundRobin, "wrr": WeightedRoundRobin, "lc": LeastConnection,
        "wlc": WeightedLeastConnection, "sed": ShortestExpectedDelay, "nq": NeverQueue,
        "dh": DestinationHashing, "lblc": LocalityLeastConnection,
        "lblcr": LocalityLeastConnectionReplication,
    }
    if name == "sh":
        return SourceHashing(fallback="sh-fallback" in flags, port="sh-port" in flags)
    try:
        return classes[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r} (one of {', '.join(SCHEDULERS)})") from None


@dataclass
class _Template:
    dest: Dest
    expires: float


class Service:
    """A virtual service: its real servers in kernel list order, a scheduler,
    and persistence (``ip_vs_sched_persist``) when ``timeout`` > 0.

    Persistence keys are strings chosen by the caller (the initiator's
    address masked with ``netmask``, or its IQN); a template sends the same
    key back to its real server until ``timeout`` seconds after it was last
    used.  A template whose real server was removed or has weight 0 is
    dropped (the kernel's ``expire_quiescent_template`` = 1 behaviour), so a
    quiesced server gets no new logins at all.
    """

    def __init__(self, scheduler: str = "wlc", timeout: int = 0,
                 flags: frozenset[str] = frozenset()) -> None:
        self.scheduler_name = scheduler
        self.flags = flags
        self.sched = make_scheduler(scheduler, flags)
        self.dests: list[Dest] = []
        self.trash: dict[str, Dest] = {}
        self.timeout = timeout
        self.templates: dict[str, _Template] = {}
        self.sched.init(self.dests)

    def find(self, name: str) -> Dest | None:
        for d in self.dests:
            if d.name == name:
                return d
        return None

    def set_scheduler(self, name: str, flags: frozenset[str] = frozenset()) -> None:
        """``ipvsadm -E -s``: a new scheduler starts from fresh state."""
        if name == self.scheduler_name and flags == self.flags:
            return
        self.scheduler_name, self.flags = name, flags
        self.sched = make_scheduler(name, flags)
        self.sched.init(self.dests)

    def add_dest(self, name: str, weight: int = 1, u_threshold: int = 0,
                 l_threshold: int = 0) -> Dest:
        if self.find(name) is not None:
            raise ValueError(f"real server {name} already exists")
        d = self.trash.pop(name, None) or Dest(name)
        d.available = True
        self._update(d, weight, u_threshold, l_threshold)
        self.dests.insert(0, d)  # list_add_rcu: at the head
        self.sched.add_dest(self.dests, d)
        return d

    @staticmethod
    def _update(d: Dest, weight: int, u_threshold: int, l_threshold: int) -> None:
        # __ip_vs_update_dest: dropping or raising the upper threshold clears OVERLOAD.
        d.weight = weight
        if u_threshold == 0 or u_threshold > d.u_threshold:
            d.overload = False
        d.u_threshold, d.l_threshold = u_threshold, l_threshold

    def edit_dest(self, name: str, weight: int, u_threshold: int = 0,
                  l_threshold: int = 0) -> Dest:
        d = self.find(name)
        if d is None:
            raise ValueError(f"no real server {name}")
        self._update(d, weight, u_threshold, l_threshold)
        self.sched.upd_dest(self.dests, d)
        return d

    def del_dest(self, name: str) -> None:
        d = self.find(name)
        if d is None:
            raise ValueError(f"no real server {name}")
        index = self.dests.index(d)
        del self.dests[index]
        d.available = False
        self.trash[name] = d
        self.sched.del_dest(self.dests, d, index)

    def set_counts(self, name: str, active: int, inactive: int) -> None:
        """Feed a real server's connection counts; OVERLOAD follows each change
        the way one bind/unbind per connection would move it."""
        d = self.find(name) or self.trash.get(name)
        if d is None:
            return
        before = d.totalconns()
        d.activeconns, d.inactconns = active, inactive
        after = d.totalconns()
        if after > before:
            d.bound()
        elif after < before:
            d.unbound()

    def schedule(self, req: Request, now: float, key: str | None = None) -> Dest | None:
        """Choose the real server for one login (``None``: no dest available)."""
        if self.timeout and key is not None:
            t = self.templates.get(key)
            if t is not None and (now >= t.expires or not t.dest.available
                                  or t.dest.weight == 0):
                del self.templates[key]
                t = None
            if t is not None:
                t.expires = now + self.timeout
                return t.dest
            d = self.sched.schedule(self.dests, req, now)
            if d is not None:
                self.templates[key] = _Template(d, now + self.timeout)
            return d
        return self.sched.schedule(self.dests, req, now)

    def touch(self, key: str, now: float) -> None:
        """Restart a template's timeout (a session under it is still alive)."""
        t = self.templates.get(key)
        if t is not None:
            t.expires = max(t.expires, now + self.timeout)
