"""The byte-range lock manager (storaged.nas.locks) against POSIX rules and a byte-map model."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from storaged.nas.locks import BLOCKED, DENIED, EOF, GRANTED, LockManager, Owner, span

A = Owner("hosta", 1, b"a")
A2 = Owner("hosta", 2, b"a2")
B = Owner("hostb", 7, b"b")
F = ("export", b"inode")


def held(m: LockManager) -> list[tuple[str, int, int, bool]]:
    return [(lk.owner.host + str(lk.owner.svid), lk.start, lk.end, lk.exclusive)
            for lk in m.locks(F)]


def test_shared_coexist_exclusive_conflicts() -> None:
    m = LockManager()
    assert m.lock(F, A, 0, 10, False) == GRANTED
    assert m.lock(F, B, 5, 20, False) == GRANTED
    assert m.lock(F, B, 5, 20, True) == DENIED
    c = m.conflict(F, B, 0, 1, True)
    assert c is not None and c.owner == A and (c.start, c.end) == (0, 10)
    assert m.conflict(F, A, 0, 10, True) is not None  # B's shared lock on 5..10
    assert m.conflict(F, A, 0, 5, True) is None


def test_same_owner_upgrade_split_and_merge() -> None:
    m = LockManager()
    m.lock(F, A, 0, 100, False)
    m.lock(F, A, 40, 60, True)  # upgrade the middle: three pieces
    assert held(m) == [("hosta1", 0, 40, False), ("hosta1", 40, 60, True),
                       ("hosta1", 60, 100, False)]
    m.lock(F, A, 40, 60, False)  # downgrade again: merges back into one
    assert held(m) == [("hosta1", 0, 100, False)]
    m.unlock(F, A, 10, 20)
    assert held(m) == [("hosta1", 0, 10, False), ("hosta1", 20, 100, False)]
    m.lock(F, A, 100, 200, False)  # adjacent: merge
    assert held(m)[-1] == ("hosta1", 20, 200, False)


def test_to_eof_range() -> None:
    assert span(5, 0) == (5, EOF)
    m = LockManager()
    s, e = span(1000, 0)
    m.lock(F, A, s, e, True)
    assert m.lock(F, B, 1 << 62, (1 << 62) + 1, False) == DENIED
    assert m.lock(F, B, 0, 1000, True) == GRANTED
    assert m.locks(F)[1].length == 0


def test_span_limits() -> None:
    for off, ln in ((EOF, 0), (EOF - 1, 2), (-1, 1)):
        try:
            span(off, ln)
        except ValueError:
            continue
        raise AssertionError(f"span({off}, {ln}) accepted")


def test_blocking_waiter_granted_in_fifo_order() -> None:
    m = LockManager()
    assert m.lock(F, A, 0, 10, True) == GRANTED
    assert m.lock(F, B, 0, 10, True, block=True, ctx="b1") == BLOCKED
    assert m.lock(F, B, 0, 10, True, block=True, ctx="b1-again") == BLOCKED  # retransmit
    assert m.lock(F, A2, 5, 6, True, block=True, ctx="a2") == BLOCKED
    assert len(m.waiters(F)) == 2
    granted = m.unlock(F, A, 0, 10)
    assert [w.ctx for w in granted] == ["b1-again"]  # A2 still conflicts with B
    assert held(m) == [("hostb7", 0, 10, True)]
    granted = m.unlock(F, B, 0, EOF)
    assert [w.ctx for w in granted] == ["a2"]


def test_downgrade_wakes_waiters() -> None:
    m = LockManager()
    m.lock(F, A, 0, 10, True)
    assert m.lock(F, B, 0, 5, False, block=True, ctx="reader") == BLOCKED
    assert m.lock(F, A, 0, 10, False) == GRANTED  # exclusive -> shared
    assert [w.ctx for w in m.take_woken()] == ["reader"]
    assert m.take_woken() == []
    assert ("hostb7", 0, 5, False) in held(m)


def test_cancel_and_free_host() -> None:
    m = LockManager()
    m.lock(F, A, 0, 10, True)
    m.lock(F, B, 0, 10, False, block=True, ctx=1)
    assert m.cancel(F, B, 0, 10, True) is None  # type must match
    assert m.cancel(F, B, 0, 10, False) is not None
    assert m.unlock(F, A, 0, 10) == []
    m.lock(F, A, 0, 10, True)
    m.lock(F, A2, 20, 30, True)
    m.lock(F, B, 0, 30, True, block=True, ctx="wait")
    assert m.hosts() == {"hosta", "hostb"}
    granted = m.free_host("hosta")
    assert [w.ctx for w in granted] == ["wait"]
    assert m.hosts() == {"hostb"}
    m.free_host("hostb")
    assert m.files == {}


def test_share_reservations() -> None:
    m = LockManager()
    assert m.share(F, A, access=1, mode=2)  # read, deny write
    assert not m.share(F, B, access=3, mode=0)  # wants write
    assert m.share(F, B, access=1, mode=0)
    assert not m.share(F, Owner("c", 1), access=1, mode=1)  # denies read others hold
    m.unshare(F, A)
    m.unshare(F, B)
    assert m.files == {}


# ------------------------------------------------------------------ model

N = 24  # the model's file: bytes 0..N-1; "to EOF" is modelled as "to N"
OWNERS = [Owner("h1", 1), Owner("h1", 2), Owner("h2", 1)]

op = st.tuples(st.sampled_from(["lock", "unlock", "test"]), st.integers(0, 2),
               st.integers(0, N - 1), st.integers(0, 8), st.booleans())


@given(st.lists(op, max_size=40))
def test_matches_byte_model(ops: list[tuple[str, int, int, int, bool]]) -> None:
    m = LockManager()
    model: list[dict[Owner, bool]] = [{} for _ in range(N)]
    for kind, who, off, ln, excl in ops:
        owner = OWNERS[who]
        start, end = span(off, min(ln, N - off))  # ends inside the model or at EOF
        mend = min(end, N)
        others = [(o, x) for b in range(start, mend) for o, x in model[b].items() if o != owner]
        conflict = any(excl or x for _o, x in others)
        if kind == "test":
            assert (m.conflict(F, owner, start, end, excl) is not None) == conflict
        elif kind == "lock":
            r = m.lock(F, owner, start, end, excl)
            assert r == (DENIED if conflict else GRANTED)
            if not conflict:
                for b in range(start, mend):
                    model[b][owner] = excl
        else:
            m.unlock(F, owner, start, end)
            for b in range(start, mend):
                model[b].pop(owner, None)
        got: list[dict[Owner, bool]] = [{} for _ in range(N)]
        locks = m.locks(F)
        for lk in locks:
            for b in range(lk.start, min(lk.end, N)):
                assert lk.owner not in got[b], "an owner's ranges overlap"
                got[b][lk.owner] = lk.exclusive
        assert got == model
        # merged: no two ranges of one owner and type touch
        for a in locks:
            for b in locks:
                if a is not b and a.owner == b.owner and a.exclusive == b.exclusive:
                    assert a.end != b.start


bop = st.tuples(st.sampled_from(["lock", "block", "unlock", "cancel", "free"]),
                st.integers(0, 2), st.integers(0, 4), st.integers(0, 4), st.booleans())


@settings(max_examples=500)
@example([("lock", 0, 0, 0, True), ("block", 1, 0, 0, False), ("lock", 0, 0, 0, False)])
@given(st.lists(bop, max_size=30))
def test_waiters_never_starve_and_locks_never_conflict(
        ops: list[tuple[str, int, int, int, bool]]) -> None:
    """After any sequence: held locks of different owners never conflict, and every
    waiter still conflicts with a held lock (a grantable waiter would be a lost wakeup)."""
    m = LockManager()
    for kind, who, off, ln, excl in ops:
        owner = OWNERS[who]
        start, end = span(off, ln)
        if kind in ("lock", "block"):
            r = m.lock(F, owner, start, end, excl, block=kind == "block")
            m.take_woken()
            assert r in (GRANTED, DENIED, BLOCKED)
            assert (r == BLOCKED) == (kind == "block" and r != GRANTED)
        elif kind == "unlock":
            m.unlock(F, owner, start, end)
        elif kind == "cancel":
            m.cancel(F, owner, start, end, excl)
        else:
            m.free_host(owner.host)
        locks = m.locks(F)
        for a in locks:
            for b in locks:
                if a.owner != b.owner and (a.exclusive or b.exclusive):
                    assert not a.overlaps(b.start, b.end), (a, b)
        for w in m.waiters(F):
            assert m.conflict(F, w.owner, w.start, w.end, w.exclusive) is not None, w
