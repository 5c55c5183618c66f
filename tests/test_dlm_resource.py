"""Grant rules of the master-side Resource (Linux fs/dlm semantics), in memory."""

from __future__ import annotations

import random

import pytest

from storaged.dlm.modes import COMPAT, Flag, Mode, Status, check_name, compatible
from storaged.dlm.resource import GRANTED, Bast, Cast, Resource

NL, CR, CW, PR, PW, EX = (m.value for m in (Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW,
                                             Mode.EX))


def casts(out, lkid=None):
    return [c for c in out if isinstance(c, Cast) and (lkid is None or c.lkid == lkid)]


def basts(out):
    return [(b.lkid, Mode(b.mode).name) for b in out if isinstance(b, Bast)]


def test_compat_matrix_is_the_standard_one():
    names = "NL CR CW PR PW EX".split()
    expected = {
        "NL": "NL CR CW PR PW EX", "CR": "NL CR CW PR PW", "CW": "NL CR CW",
        "PR": "NL CR PR", "PW": "NL CR", "EX": "NL"}
    for g, row in expected.items():
        for r in names:
            assert compatible(Mode[g], Mode[r]) == (r in row.split()), (g, r)
    for a in range(6):
        for b in range(6):
            assert COMPAT[a][b] == COMPAT[b][a]


def test_names_limited_to_64_bytes():
    assert check_name("x" * 64) == b"x" * 64
    with pytest.raises(ValueError):
        check_name("x" * 65)
    with pytest.raises(ValueError):
        check_name(b"")


def test_new_request_waits_behind_queue_even_if_compatible():
    r, out = Resource(b"r"), []
    r.request(1, 1, PR, 0, out)
    r.request(2, 2, EX, 0, out)          # waits
    r.request(3, 3, PR, 0, out)          # compatible with PR but EX is queued ahead
    assert [c.lkid for c in casts(out)] == [1]
    assert [lk.lkid for lk in r.waiting] == [2, 3]
    out.clear()
    r.unlock(1, 1, out)
    assert [(c.lkid, c.status) for c in casts(out)] == [(1, Status.EUNLOCK), (2, Status.OK)]
    out.clear()
    r.unlock(2, 2, out)
    assert casts(out)[-1].lkid == 3 and casts(out)[-1].status == Status.OK


def test_noqueue_fails_with_eagain():
    r, out = Resource(b"r"), []
    r.request(1, 1, EX, 0, out)
    r.request(2, 2, PR, Flag.NOQUEUE, out)
    assert casts(out, 2)[0].status == Status.EAGAIN and (2, 2) not in r.locks


def test_convert_queue_served_before_wait_queue_and_in_order():
    r, out = Resource(b"r"), []
    r.request(1, 1, PR, 0, out)
    r.request(2, 2, NL, 0, out)
    r.request(3, 3, NL, 0, out)
    r.request(4, 4, EX, 0, out)          # waits behind PR
    r.convert(2, 2, PW, 0, out)          # blocked by PR: convert queue
    r.convert(3, 3, CR, 0, out)          # compatible: granted in place
    assert [lk.lkid for lk in r.converting] == [2]
    out.clear()
    r.unlock(1, 1, out)
    granted = [c.lkid for c in casts(out) if c.status == Status.OK]
    assert granted == [2]                # the conversion, not the EX waiter
    assert r.locks[(2, 2)].grmode == PW


def test_down_conversion_is_immediate_and_grants_others():
    r, out = Resource(b"r"), []
    r.request(1, 1, EX, 0, out)
    r.request(2, 2, PR, 0, out)
    out.clear()
    r.convert(1, 1, PR, 0, out)
    assert [(c.lkid, Mode(c.mode).name) for c in casts(out)] == [(1, "PR"), (2, "PR")]


def test_quecvt_queues_behind_other_conversions():
    r, out = Resource(b"r"), []
    r.request(1, 1, PR, 0, out)
    r.request(2, 2, CR, 0, out)
    r.request(3, 3, NL, 0, out)
    r.convert(2, 2, EX, 0, out)          # blocked by PR
    out.clear()
    r.convert(3, 3, CR, Flag.QUECVT, out)  # compatible, but QUECVT queues it
    assert not casts(out) and [lk.lkid for lk in r.converting] == [2, 3]
    r2, out = Resource(b"r2"), []
    r2.request(1, 1, PR, 0, out)
    out.clear()
    r2.convert(1, 1, NL, Flag.QUECVT, out)  # QUECVT is only for up-conversions
    assert casts(out)[0].status == Status.EINVAL


def test_conversion_deadlock_edeadlk_and_convdeadlk():
    r, out = Resource(b"r"), []
    r.request(1, 1, PR, 0, out)
    r.request(2, 2, PR, 0, out)
    r.convert(1, 1, EX, 0, out)          # waits for 2's PR
    out.clear()
    r.convert(2, 2, EX, 0, out)          # 1 waits on 2, 2 would wait on 1
    assert casts(out)[0].status == Status.EDEADLK and r.locks[(2, 2)].grmode == PR
    out.clear()
    r.convert(2, 2, EX, Flag.CONVDEADLK, out)  # demote 2 to NL: 1 gets EX
    got = {c.lkid: c for c in casts(out)}
    assert got[1].status == Status.OK and Mode(got[1].mode) == Mode.EX
    assert r.locks[(2, 2)].grmode == NL and r.locks[(2, 2)].queue != GRANTED
    out.clear()
    r.unlock(1, 1, out)
    c = casts(out, 2)[0]
    assert c.status == Status.OK and c.demoted and Mode(c.mode) == Mode.EX


def test_cancel_waiting_request_and_conversion():
    r, out = Resource(b"r"), []
    r.request(1, 1, EX, 0, out)
    r.request(2, 2, PR, 0, out)
    r.request(3, 3, NL, 0, out)
    out.clear()
    assert r.cancel(2, 2, out)
    assert casts(out)[0].status == Status.ECANCEL and (2, 2) not in r.locks
    r.convert(3, 3, EX, 0, out)
    out.clear()
    assert r.cancel(3, 3, out)
    c = casts(out)[0]
    assert c.status == Status.ECANCEL and Mode(c.mode) == Mode.NL
    assert not r.cancel(1, 1, out)        # granted: nothing to cancel


def test_blocking_callbacks_carry_the_requested_mode_once():
    r, out = Resource(b"r"), []
    r.request(1, 1, PR, 0, out)
    r.request(2, 2, CR, 0, out)
    out.clear()
    r.request(3, 3, EX, 0, out)
    assert basts(out) == [(1, "EX"), (2, "EX")]
    out.clear()
    r.request(4, 4, EX, 0, out)          # highbast already EX: no repeat
    assert basts(out) == []


def test_lvb_rules():
    r, out = Resource(b"r", 32), []
    lvb = b"A" * 32
    r.request(1, 1, EX, Flag.VALBLK, out)
    assert casts(out)[0].lvb == bytes(32)  # returned on grant
    out.clear()
    r.convert(1, 1, PR, Flag.VALBLK, out, lvb=lvb)  # written on down-conversion from EX
    assert r.lvb == lvb and r.lvbseq == 1
    r.request(2, 2, CR, Flag.VALBLK, out)
    assert casts(out, 2)[0].lvb == lvb
    out.clear()
    r.convert(2, 2, PR, Flag.VALBLK, out)  # up-conversion returns it
    assert casts(out, 2)[0].lvb == lvb
    r.request(3, 3, NL, Flag.VALBLK, out)
    out.clear()
    r.unlock(2, 2, out, lvb=b"B" * 32)   # unlock from PR: not written
    assert r.lvb == lvb
    r.unlock(1, 1, out)
    r.convert(3, 3, PW, Flag.VALBLK, out)
    r.unlock(3, 3, out, lvb=b"C" * 32)   # unlock from PW: written
    assert r.lvb == b"C" * 32 and r.lvbseq == 2


def test_purge_reports_dead_pw_holder():
    r, out = Resource(b"r"), []
    r.request(1, 1, CR, 0, out)
    r.request(2, 2, PW, 0, out)
    assert r.purge({1}) is True and list(r.locks) == [(1, 1)]
    assert r.purge({1}) is False


def test_random_operations_never_grant_incompatible_modes():
    for seed in range(300):
        rng = random.Random(seed)
        r, out, n = Resource(b"x"), [], 0
        for _ in range(60):
            locks = list(r.locks.values())
            p = rng.random()
            if p < 0.35 or not locks:
                n += 1
                r.request(rng.randrange(3), n, rng.randrange(6),
                          rng.choice([0, Flag.NOQUEUE]), out)
                continue
            lk = rng.choice(locks)
            idle = lk.queue == GRANTED and lk.rqmode == Mode.IV
            if p < 0.6 and idle:
                r.convert(lk.owner, lk.lkid, rng.randrange(6),
                          rng.choice([0, Flag.NOQUEUE, Flag.CONVDEADLK, Flag.QUECVT]), out)
            elif p < 0.85 and idle:
                r.unlock(lk.owner, lk.lkid, out)
            else:
                r.cancel(lk.owner, lk.lkid, out)
            held = r.granted + r.converting
            for a in held:
                for b in held:
                    assert a is b or COMPAT[a.grmode][b.grmode], (seed, a, b)
