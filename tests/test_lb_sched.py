"""The IPVS schedulers: hand-derived golden sequences and a differential
check against the literal kernel transcription in tests/lvs_reference.py."""

from __future__ import annotations

import random

import pytest

from storaged.lb.sched import (
    SCHEDULERS,
    Request,
    Service,
    addr_key,
    hash_32,
)
from tests.lvs_reference import KService


def build(sched: str, servers: list[tuple[str, int]], **kw) -> Service:
    """ipvsadm -A then -a for each server in the order given.  The kernel links
    each new real server at the head, so the list ends up reversed."""
    s = Service(sched, **kw)
    for name, w in servers:
        s.add_dest(name, w)
    return s


def seq(s: Service, n: int, req: Request | None = None) -> str:
    out = []
    for _ in range(n):
        d = s.schedule(req or Request(), 0.0)
        out.append(d.name if d else "-")
    return "".join(out)


def test_list_order_is_head_insertion():
    s = build("rr", [("A", 1), ("B", 1), ("C", 1)])
    assert [d.name for d in s.dests] == ["C", "B", "A"]


def test_rr_golden():
    # list C B A; the cursor starts at the head: C, B, A, C, ...
    s = build("rr", [("A", 1), ("B", 1), ("C", 1)])
    assert seq(s, 6) == "CBACBA"
    # the cursor is on A; weight 0 quiesces B: wrap to C, skip B, A, ...
    s.edit_dest("B", 0)
    assert seq(s, 4) == "CACA"
    # removing A, the dest under the cursor, moves the cursor to its
    # predecessor B (p->next->prev): the list is C B, so next is C, B, C.
    s.edit_dest("B", 1)
    s.del_dest("A")
    assert seq(s, 3) == "CBC"


def test_wrr_golden_steady_state():
    # Added C(2), B(3), A(4): list A B C.  mw=4, di=1.  While C and B were
    # added, cw was set to mw=1 (C alone: gcd 2, mw = 2-(2-1) = 1) and kept
    # (cw <= mw and di == 1), so the first pass is cw=1: A B C; then cw
    # restarts at mw=4: A; cw=3: A B; cw=2: A B C; cw=1: A B C; ...
    s = build("wrr", [("C", 2), ("B", 3), ("A", 4)])
    assert seq(s, 3) == "ABC"
    # steady state, the example: cw=4 A, cw=3 A B, cw=2 A B C, cw=1 A B C
    assert seq(s, 9) == "AABABCABC"
    assert seq(s, 9) == "AABABCABC"


def test_wrr_gcd_stepping():
    # A=4, B=2 (list A B after adding B then A): di=2, mw=4-(2-1)=3.
    # The cw carried from adding B (mw 1) gives the first pass cw=1: A B;
    # then cw=3: A; cw=1: A B  -> the cycle A A B (weights 4:2 = 2:1).
    s = build("wrr", [("B", 2), ("A", 4)])
    assert seq(s, 2) == "AB"
    assert seq(s, 6) == "AABAAB"


def test_wrr_overload_skips():
    s = build("wrr", [("B", 1), ("A", 1)])
    s.edit_dest("A", 1, u_threshold=1)
    s.set_counts("A", 1, 0)  # a connection fills A's upper threshold
    assert s.find("A").overload
    assert seq(s, 3) == "BBB"


def test_lc_golden():
    # overheads A: 1*256+0=256, B: 0*256+5=5, C: 0*256+5=5 -> the first
    # strictly smaller wins: list is C B A, so C (ties keep the first).
    s = build("lc", [("A", 1), ("B", 1), ("C", 1)])
    s.set_counts("A", 1, 0)
    s.set_counts("B", 0, 5)
    s.set_counts("C", 0, 5)
    assert seq(s, 1) == "C"
    s.set_counts("C", 0, 6)
    assert seq(s, 1) == "B"
    # lc ignores weights other than 0
    s.edit_dest("B", 100)
    s.set_counts("B", 0, 7)
    assert seq(s, 1) == "C"


def test_wlc_golden_cross_multiplication():
    # list C B A.  A: w=3, active 2 -> 512/3 = 170.7; B: w=1, active 1 ->
    # 256/1; C: w=2, active 1, inactive 10 -> 266/2 = 133 -> C.
    s = build("wlc", [("A", 3), ("B", 1), ("C", 2)])
    s.set_counts("A", 2, 0)
    s.set_counts("B", 1, 0)
    s.set_counts("C", 1, 10)
    assert seq(s, 1) == "C"
    # C: 2 active -> 512/2 = 256 > 170.7 -> A
    s.set_counts("C", 2, 0)
    assert seq(s, 1) == "A"
    # exact tie A 512/2 vs C 512/2: loh*w > doh*w is false, the first (C) stays
    s.edit_dest("A", 2)
    assert seq(s, 1) == "C"


def test_wlc_weight_zero_never_picked():
    s = build("wlc", [("A", 1), ("B", 0)])
    s.set_counts("A", 50, 0)
    assert seq(s, 3) == "AAA"


def test_sed_vs_wlc():
    # A: w=1 idle; B: w=10, active 1.  wlc: A 0/1 < B 256/10 -> A.
    # sed: A (0+1)/1 = 1 > B (1+1)/10 = 0.2 -> B.
    for sched, want in (("wlc", "A"), ("sed", "B")):
        s = build(sched, [("B", 10), ("A", 1)])  # list A B
        s.set_counts("B", 1, 0)
        assert seq(s, 1) == want, sched


def test_nq_prefers_idle():
    # list A B.  A: w=10, active 1 -> sed cost 0.2; B: w=1 idle -> nq takes B.
    s = build("nq", [("B", 1), ("A", 10)])
    s.set_counts("A", 1, 0)
    assert seq(s, 1) == "B"
    s.set_counts("B", 1, 0)  # nobody idle: sed: A 2/10 < B 2/1
    assert seq(s, 1) == "A"


def test_hash_32_known_values():
    # hash_32(x, 8) = (x * 0x61C88647 mod 2^32) >> 24
    assert hash_32(0, 8) == 0
    assert hash_32(1, 8) == 0x61
    assert hash_32(0x7F000001, 8) == ((0x7F000001 * 0x61C88647) & 0xFFFFFFFF) >> 24


def test_sh_golden():
    # list B A with weights B=1 A=2: buckets B A A B A A ...: bucket i is
    # B when i % 3 == 0.  127.0.0.1 hashes to bucket h below.
    s = build("sh", [("A", 2), ("B", 1)])
    src = addr_key("127.0.0.1")
    h = hash_32(src, 8)
    want = "B" if h % 3 == 0 else "A"
    assert seq(s, 3, Request(src=src)) == want * 3
    # quiesce A: the table is refilled B A B A ... (weight 0 still takes one
    # bucket per turn, ++d_count >= 0); an A bucket is then refused by plain
    # sh, and sh-fallback walks on (offset + 2*h) to the next usable bucket, B.
    s.edit_dest("A", 0)
    assert seq(s, 1, Request(src=src)) == ("B" if h % 2 == 0 else "-")
    f = build("sh", [("A", 2), ("B", 1)], flags=frozenset({"sh-fallback"}))
    f.edit_dest("A", 0)
    assert seq(f, 1, Request(src=src)) == "B"
    assert [d.name for d in f.sched.buckets[:4]] == ["B", "A", "B", "A"]


def test_dh_golden():
    # list C B A, buckets C B A C B A ... : bucket hash_32(dst) % 3 decides
    s = build("dh", [("A", 1), ("B", 1), ("C", 1)])
    for dst in (1, 2, 3, 0xDEADBEEF):
        want = "CBA"[hash_32(dst, 8) % 3]
        assert seq(s, 2, Request(dst=dst)) == want * 2


def test_lblc_sticks_then_moves():
    s = build("lblc", [("A", 1), ("B", 1)])  # list B A
    r = Request(dst=7)
    assert seq(s, 1, r) == "B"          # wlc tie -> first, B; cached
    s.set_counts("B", 1, 0)
    assert seq(s, 1, r) == "B"          # 1 active is not > weight 1
    s.set_counts("B", 2, 0)             # 2 > 1 and A has 0*2 < 1: overloaded
    assert seq(s, 1, r) == "A"
    assert seq(s, 1, Request(dst=8)) == "A"


def test_lblcr_grows_set():
    s = build("lblcr", [("A", 1), ("B", 1)])
    r = Request(dst=7)
    assert seq(s, 1, r) == "B"
    s.set_counts("B", 2, 0)
    assert seq(s, 1, r) == "A"          # set {A, B}
    s.set_counts("A", 1, 0)
    assert seq(s, 1, r) == "A"          # least loaded member of the set
    # a day later the set sheds its most loaded member (B)
    assert s.schedule(r, 86401.0).name == "A"
    assert [d.name for d in s.sched.table[7].dset] == ["A"]


def test_thresholds_overload_semantics():
    s = build("rr", [("A", 1)])
    s.edit_dest("A", 1, u_threshold=4, l_threshold=0)
    s.set_counts("A", 4, 0)
    assert s.find("A").overload and seq(s, 1) == "-"
    s.set_counts("A", 3, 0)              # 3*4 = 12 < 4*3 = 12 is false: still over
    assert s.find("A").overload
    s.set_counts("A", 2, 0)              # 8 < 12: cleared
    assert not s.find("A").overload and seq(s, 1) == "A"
    s.edit_dest("A", 1, u_threshold=4, l_threshold=2)
    s.set_counts("A", 4, 0)
    s.set_counts("A", 2, 0)              # not below lower 2
    assert s.find("A").overload
    s.set_counts("A", 1, 0)
    assert not s.find("A").overload


def test_persistence_templates():
    s = build("rr", [("A", 1), ("B", 1)], timeout=300)
    assert s.schedule(Request(), 0, key="iqn.x").name == "B"
    assert s.schedule(Request(), 100, key="iqn.x").name == "B"
    assert s.schedule(Request(), 100, key="iqn.y").name == "A"
    assert s.schedule(Request(), 399, key="iqn.x").name == "B"   # refreshed at 100
    assert s.schedule(Request(), 800, key="iqn.x").name == "B"   # expired; rr says B
    s.edit_dest("B", 0)                                            # quiesced: template dropped
    assert s.schedule(Request(), 801, key="iqn.x").name == "A"


# ---------------------------------------------------------------- differential

NAMES = ["r1", "r2", "r3", "r4", "r5"]


def _run_sequence(rng: random.Random, sched: str, steps: int) -> int:
    flags = frozenset({"sh-fallback"}) if sched == "sh" and rng.random() < 0.5 else frozenset()
    mine = Service(sched, flags=flags)
    ref = KService(sched, sh_fallback="sh-fallback" in flags)
    conns: list[tuple[str, bool]] = []
    now = 0.0
    picks = 0
    for _ in range(steps):
        present = [d.name for d in mine.dests]
        ev = rng.choices(["add", "edit", "remove", "connect", "disconnect", "activate", "time"],
                         [3, 2, 1, 10, 4, 2, 1])[0]
        if ev == "add":
            free = [n for n in NAMES if n not in present]
            if not free:
                continue
            name = rng.choice(free)
            w, u = rng.choice([0, 1, 1, 2, 3, 4, 6]), rng.choice([0, 0, 2, 3, 5])
            lo = rng.choice([0, 0, 1, 2]) if u else 0
            mine.add_dest(name, w, u, lo)
            ref.add_dest(name, w, u, lo)
        elif ev == "edit" and present:
            name = rng.choice(present)
            w, u = rng.choice([0, 1, 2, 3, 5, 8]), rng.choice([0, 0, 2, 4])
            lo = rng.choice([0, 1]) if u else 0
            mine.edit_dest(name, w, u, lo)
            ref.edit_dest(name, w, u, lo)
        elif ev == "remove" and present:
            name = rng.choice(present)
            mine.del_dest(name)
            ref.del_dest(name)
        elif ev == "connect":
            src = rng.choice([0x7F000001, 0x7F000002, 0x0A000001, rng.getrandbits(32)])
            dst = rng.choice([1, 2, 3, rng.getrandbits(32)])
            ref.now = now
            a = mine.schedule(Request(src=src, dst=dst), now)
            b = ref.schedule(src, dst)
            assert (a.name if a else None) == (b.name if b else None), (sched, picks)
            picks += 1
            if a is not None:
                # a new login starts inactive (redirected, not yet logged in)
                conns.append((a.name, False))
                _feed(mine, ref, a.name, conns, +1, False)
        elif ev == "disconnect" and conns:
            i = rng.randrange(len(conns))
            name, active = conns.pop(i)
            _feed(mine, ref, name, conns, -1, active)
        elif ev == "activate":
            idle = [i for i, c in enumerate(conns) if not c[1]]
            if idle:
                i = rng.choice(idle)
                name = conns[i][0]
                conns[i] = (name, True)
                # the kernel moves inactive -> active without bind/unbind
                d = mine.find(name) or mine.trash[name]
                mine.set_counts(name, d.activeconns + 1, d.inactconns - 1)
                k = ref.lookup(name) or ref.trash[name]
                k.activeconns += 1
                k.inactconns -= 1
        elif ev == "time":
            now += rng.choice([1.0, 60.0, 3600.0, 90000.0])
    return picks


def _feed(mine: Service, ref: KService, name: str, conns, delta: int, active: bool) -> None:
    d = mine.find(name) or mine.trash[name]
    a, i = d.activeconns, d.inactconns
    if active:
        a += delta
    else:
        i += delta
    mine.set_counts(name, a, i)
    k = ref.lookup(name) or ref.trash[name]
    (ref.bind if delta > 0 else ref.unbind)(k, active)


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_random_sequences_match_kernel_transcription(sched):
    """1,000 random event sequences per scheduler (10,000 in all), every
    scheduling decision identical to the literal kernel transcription."""
    rng = random.Random(f"lvs-{sched}")
    picks = sum(_run_sequence(rng, sched, rng.randint(5, 60)) for _ in range(1000))
    assert picks > 10000
