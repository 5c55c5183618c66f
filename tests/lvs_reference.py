"""A deliberately literal transcription of the kernel's IPVS selection code.

Kept in the tests (not in storaged) as the oracle for tests/test_lb_sched.py:
a doubly linked ``list_head`` with a head node, ``list_add`` at the head,
``list_for_each_entry_continue`` walks, and each scheduler's C function
rewritten line by line (net/netfilter/ipvs/ip_vs_{rr,wrr,lc,wlc,sed,nq,sh,
dh,lblc,lblcr}.c, ip_vs_ctl.c __ip_vs_update_dest, ip_vs_conn.c
ip_vs_bind_dest/ip_vs_unbind_dest).  Written independently of
storaged.lb.sched so that the two can disagree.
"""

from __future__ import annotations

import math

GOLDEN_RATIO_32 = 0x61C88647


def hash_32(val, bits):
    return ((val * GOLDEN_RATIO_32) % 2**32) >> (32 - bits)


class ListHead:
    def __init__(self):
        self.next = self
        self.prev = self


def list_add(new, head):
    nxt = head.next
    nxt.prev = new
    new.next = nxt
    new.prev = head
    head.next = new


def list_del(entry):
    # list_del_rcu: entry->next stays valid, prev is poisoned
    entry.next.prev = entry.prev
    entry.prev.next = entry.next
    entry.prev = None


class KDest(ListHead):
    def __init__(self, name):
        super().__init__()
        self.name = name
        self.weight = 0
        self.u_threshold = 0
        self.l_threshold = 0
        self.activeconns = 0
        self.inactconns = 0
        self.OVERLOAD = False
        self.AVAILABLE = False


def conn_overhead(dest):
    return (dest.activeconns << 8) + dest.inactconns


def entries(head, start):
    """list_for_each_entry_continue(dest, head): from start->next up to head."""
    p = start.next
    while p is not head:
        yield p
        p = p.next


class KService:
    def __init__(self, sched, sh_fallback=False):
        self.destinations = ListHead()
        self.trash = {}
        self.sched = sched
        self.sh_fallback = sh_fallback
        self.now = 0
        getattr(self, f"init_{sched}", lambda: None)()

    def lookup(self, name):
        for d in entries(self.destinations, self.destinations):
            if d.name == name:
                return d
        return None

    # ---- ip_vs_ctl.c
    def update_dest(self, dest, weight, u, lo):
        dest.weight = weight
        dest.AVAILABLE = True
        if u == 0 or u > dest.u_threshold:
            dest.OVERLOAD = False
        dest.u_threshold = u
        dest.l_threshold = lo

    def add_dest(self, name, weight, u, lo):
        dest = self.trash.pop(name, None) or KDest(name)
        self.update_dest(dest, weight, u, lo)
        list_add(dest, self.destinations)
        self.hook("add_dest", dest)

    def edit_dest(self, name, weight, u, lo):
        dest = self.lookup(name)
        self.update_dest(dest, weight, u, lo)
        self.hook("upd_dest", dest)

    def del_dest(self, name):
        dest = self.lookup(name)
        dest.AVAILABLE = False
        list_del(dest)
        self.hook("del_dest", dest)
        self.trash[name] = dest

    def hook(self, what, dest):
        fn = getattr(self, f"{self.sched}_{what}", None)
        if fn:
            fn(dest)

    # ---- ip_vs_conn.c
    def bind(self, dest, active):
        if active:
            dest.activeconns += 1
        else:
            dest.inactconns += 1
        if dest.u_threshold != 0 and dest.activeconns + dest.inactconns >= dest.u_threshold:
            dest.OVERLOAD = True

    def unbind(self, dest, active):
        if active:
            dest.activeconns -= 1
        else:
            dest.inactconns -= 1
        total = dest.activeconns + dest.inactconns
        if dest.l_threshold != 0:
            if total < dest.l_threshold:
                dest.OVERLOAD = False
        elif dest.u_threshold != 0:
            if total * 4 < dest.u_threshold * 3:
                dest.OVERLOAD = False
        else:
            if dest.OVERLOAD:
                dest.OVERLOAD = False

    # ---- ip_vs_rr.c
    def init_rr(self):
        self.sched_data = self.destinations

    def rr_del_dest(self, dest):
        p = self.sched_data
        if p is dest:
            self.sched_data = p.next.prev

    def schedule_rr(self, saddr, daddr):
        p = self.sched_data
        last = dest = p
        pass_ = 0
        while True:
            for dest in entries(self.destinations, dest):  # noqa: B020 (as the C macro does)
                if not dest.OVERLOAD and dest.weight > 0:
                    self.sched_data = dest
                    return dest
                if dest is last:
                    return None
            dest = self.destinations
            pass_ += 1
            if not (pass_ < 2 and p is not self.destinations):
                return None

    # ---- ip_vs_wrr.c
    def wrr_gcd_weight(self):
        g = 0
        for dest in entries(self.destinations, self.destinations):
            weight = dest.weight
            if weight > 0:
                if g > 0:
                    g = math.gcd(weight, g)
                else:
                    g = weight
        return g if g else 1

    def wrr_max_weight(self):
        weight = 0
        for dest in entries(self.destinations, self.destinations):
            if dest.weight > weight:
                weight = dest.weight
        return weight

    def init_wrr(self):
        self.cl = self.destinations
        self.di = self.wrr_gcd_weight()
        self.mw = self.wrr_max_weight() - (self.di - 1)
        self.cw = self.mw

    def wrr_dest_changed(self, dest):
        self.cl = self.destinations
        self.di = self.wrr_gcd_weight()
        self.mw = self.wrr_max_weight() - (self.di - 1)
        if self.cw > self.mw or not self.cw:
            self.cw = self.mw
        elif self.di > 1:
            self.cw = (self.cw // self.di) * self.di + 1

    wrr_add_dest = wrr_del_dest = wrr_upd_dest = wrr_dest_changed

    def schedule_wrr(self, saddr, daddr):
        stop = None
        last_pass = restarted = False
        dest = self.cl
        if self.mw == 0:
            return None
        last = dest
        while True:
            for dest in entries(self.destinations, dest):  # noqa: B020 (as the C macro does)
                if not dest.OVERLOAD and dest.weight >= self.cw:
                    self.cl = dest
                    return dest
                if dest is stop:
                    self.cl = dest
                    return None
            dest = self.destinations
            self.cw -= self.di
            if self.cw <= 0:
                self.cw = self.mw
                if last_pass or last is self.destinations:
                    self.cl = dest
                    return None
                restarted = True
            last_pass = self.cw <= self.di
            if last_pass and restarted and last is not self.destinations:
                stop = last

    # ---- ip_vs_lc.c
    def schedule_lc(self, saddr, daddr):
        least = None
        loh = 0
        for dest in entries(self.destinations, self.destinations):
            if dest.OVERLOAD or dest.weight == 0:
                continue
            doh = conn_overhead(dest)
            if least is None or doh < loh:
                least = dest
                loh = doh
        return least

    # ---- ip_vs_wlc.c / ip_vs_sed.c (same shape, different overhead)
    def _wlc(self, head, overhead):
        found = None
        for dest in entries(head, head):
            if not dest.OVERLOAD and dest.weight > 0:
                found = dest
                break
        if found is None:
            return None
        least = found
        loh = overhead(least)
        for dest in entries(head, found):
            if dest.OVERLOAD:
                continue
            doh = overhead(dest)
            if loh * dest.weight > doh * least.weight:
                least = dest
                loh = doh
        return least

    def schedule_wlc(self, saddr, daddr):
        return self._wlc(self.destinations, conn_overhead)

    def schedule_sed(self, saddr, daddr):
        return self._wlc(self.destinations, lambda d: d.activeconns + 1)

    # ---- ip_vs_nq.c
    def schedule_nq(self, saddr, daddr):
        least = None
        loh = 0
        for dest in entries(self.destinations, self.destinations):
            if dest.OVERLOAD or not dest.weight:
                continue
            doh = dest.activeconns + 1
            if dest.activeconns == 0:
                return dest
            if least is None or loh * dest.weight > doh * least.weight:
                least = dest
                loh = doh
        return least

    # ---- ip_vs_sh.c
    def init_sh(self):
        self.buckets = [None] * 256
        self.sh_reassign()

    def sh_reassign(self):
        p = self.destinations
        empty = self.destinations.next is self.destinations
        d_count = 0
        for i in range(256):
            if empty:
                self.buckets[i] = None
            else:
                if p is self.destinations:
                    p = p.next
                dest = p
                self.buckets[i] = dest
                d_count += 1
                if d_count >= dest.weight:
                    p = p.next
                    d_count = 0

    def sh_dest_changed(self, dest):
        self.sh_reassign()

    sh_add_dest = sh_del_dest = sh_upd_dest = sh_dest_changed

    @staticmethod
    def sh_unavailable(dest):
        return dest.weight <= 0 or dest.OVERLOAD

    @staticmethod
    def sh_hashkey(addr, port, offset):
        return (offset + hash_32((port + addr) % 2**32, 8)) & 255

    def schedule_sh(self, saddr, daddr):
        port = 0
        if self.sh_fallback:
            ihash = self.sh_hashkey(saddr, port, 0)
            dest = self.buckets[ihash]
            if dest is None:
                return None
            if not self.sh_unavailable(dest):
                return dest
            for offset in range(256):
                roffset = (offset + ihash) % 256
                h = self.sh_hashkey(saddr, port, roffset)
                dest = self.buckets[h]
                if dest is None:
                    break
                if not self.sh_unavailable(dest):
                    return dest
            return None
        dest = self.buckets[self.sh_hashkey(saddr, port, 0)]
        return None if (dest is None or self.sh_unavailable(dest)) else dest

    # ---- ip_vs_dh.c
    def init_dh(self):
        self.buckets = [None] * 256
        self.dh_reassign()

    def dh_reassign(self):
        p = self.destinations
        empty = self.destinations.next is self.destinations
        for i in range(256):
            if empty:
                self.buckets[i] = None
            else:
                if p is self.destinations:
                    p = p.next
                self.buckets[i] = p
                p = p.next

    def dh_dest_changed(self, dest):
        self.dh_reassign()

    dh_add_dest = dh_del_dest = dh_upd_dest = dh_dest_changed

    def schedule_dh(self, saddr, daddr):
        dest = self.buckets[hash_32(daddr, 8)]
        if (dest is None or not dest.AVAILABLE or dest.weight <= 0 or dest.OVERLOAD):
            return None
        return dest

    # ---- ip_vs_lblc.c / ip_vs_lblcr.c
    EXPIRATION = 24 * 60 * 60

    def init_lblc(self):
        self.tbl = {}

    init_lblcr = init_lblc

    def lblc_is_overloaded(self, dest):
        if dest.activeconns > dest.weight:
            for d in entries(self.destinations, self.destinations):
                if d.activeconns * 2 < d.weight:
                    return True
        return False

    def lbl_get(self, daddr):
        en = self.tbl.get(daddr)
        if en is not None and en["lastuse"] + self.EXPIRATION < self.now:
            del self.tbl[daddr]  # the garbage collector got it first
            return None
        return en

    def schedule_lblc(self, saddr, daddr):
        en = self.lbl_get(daddr)
        if en is not None:
            en["lastuse"] = self.now
            dest = en["dest"]
            if dest.AVAILABLE and dest.weight > 0 and not self.lblc_is_overloaded(dest):
                return dest
        dest = self._wlc(self.destinations, conn_overhead)
        if dest is None:
            return None
        en = self.tbl.get(daddr)
        if en is None:
            self.tbl[daddr] = {"dest": dest, "lastuse": self.now}
        elif en["dest"] is not dest:
            en["dest"] = dest
        return dest

    @staticmethod
    def dest_set_min(dset):
        least = None
        it = iter(dset)
        for e in it:
            least = e
            if least.OVERLOAD:
                continue
            if least.weight > 0 and least.AVAILABLE:
                loh = conn_overhead(least)
                break
        else:
            return None
        for dest in it:
            if dest.OVERLOAD:
                continue
            doh = conn_overhead(dest)
            if loh * dest.weight > doh * least.weight and dest.AVAILABLE:
                least = dest
                loh = doh
        return least

    @staticmethod
    def dest_set_max(dset):
        it = iter(dset)
        for e in it:
            most = e
            if most.weight > 0:
                moh = conn_overhead(most)
                break
        else:
            return None
        for dest in it:
            doh = conn_overhead(dest)
            if moh * dest.weight < doh * most.weight and dest.weight > 0:
                most = dest
                moh = doh
        return most

    def dest_set_insert(self, en, dest, check):
        if check and any(e is dest for e in en["set"]):
            return
        en["set"].insert(0, dest)
        en["lastmod"] = self.now

    def schedule_lblcr(self, saddr, daddr):
        en = self.lbl_get(daddr)
        if en is not None:
            en["lastuse"] = self.now
            dest = self.dest_set_min(en["set"])
            if len(en["set"]) > 1 and self.now > en["lastmod"] + self.EXPIRATION:
                m = self.dest_set_max(en["set"])
                if m is not None:
                    en["set"] = [e for e in en["set"] if e is not m]
                    en["lastmod"] = self.now
            if dest is not None and not self.lblc_is_overloaded(dest):
                return dest
            dest = self._wlc(self.destinations, conn_overhead)
            if dest is None:
                return None
            self.dest_set_insert(en, dest, True)
            return dest
        dest = self._wlc(self.destinations, conn_overhead)
        if dest is None:
            return None
        en = {"set": [], "lastuse": self.now, "lastmod": self.now}
        self.dest_set_insert(en, dest, False)
        self.tbl[daddr] = en
        return dest

    def schedule(self, saddr, daddr):
        return getattr(self, f"schedule_{self.sched}")(saddr, daddr)
