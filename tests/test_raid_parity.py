"""RAID parity kernels: compiled (every backend this CPU has) vs the pure reference.

Also checks md's layout arithmetic against hand-written tables from
drivers/md/raid5.c / raid10.c, and that reconstruction works for every
one- and two-block loss.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storaged import _pureraid as pure
from storaged.raid.layout import Geometry, stripe_map
from tests.test_fastio import NO_EXT, need_compiled


def backends() -> list[str]:
    if NO_EXT:
        return []
    try:
        import _fastio._raid as c
    except ImportError:
        return ["missing"]
    out = []
    for name in ("generic", "avx2", "avx512"):
        try:
            c._set_backend(name)
            out.append(name)
        except ValueError:
            pass
    c._set_backend("")
    return out


@pytest.fixture(params=backends() or ["none"])
def compiled(request):
    if request.param == "none":
        pytest.skip("STORAGED_NO_EXTENSIONS=1: only the pure path is tested")
    need_compiled()
    import _fastio._raid as c
    c._set_backend(request.param)
    yield c
    c._set_backend("")


def blocks(n: int, length: int, seed: bytes) -> list[bytes]:
    return [(seed * (length // max(len(seed), 1) + 1))[:length] if i == 0 else os.urandom(length)
            for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), length=st.integers(0, 3000), seed=st.binary(min_size=1))
def test_xor_and_pq_agree(n, length, seed):
    srcs = blocks(n, length, seed)
    for name in backends():
        if name == "missing":
            pytest.fail("the compiled _fastio._raid module is not built (pip install -e .)")
        import _fastio._raid as c
        c._set_backend(name)
        try:
            a, b = bytearray(length), bytearray(length)
            c.xor_gen(a, srcs)
            pure.xor_gen(b, srcs)
            assert a == b
            p1, q1, p2, q2 = (bytearray(length) for _ in range(4))
            c.pq_gen(p1, q1, srcs)
            pure.pq_gen(p2, q2, srcs)
            assert (p1, q1) == (p2, q2)
        finally:
            c._set_backend("")


def test_q_matches_definition():
    srcs = [os.urandom(64) for _ in range(5)]
    p, q = bytearray(64), bytearray(64)
    pure.pq_gen(p, q, srcs)
    for i in range(64):
        want = 0
        for k, s in enumerate(srcs):
            want ^= pure.gf_mul_scalar(pure.GF_EXP[k], s[i])
        assert q[i] == want


@pytest.mark.parametrize("length", [1, 63, 64, 4096, 70000])
def test_recovery_every_pair(compiled, length):
    nd = 6
    data = [os.urandom(length) for _ in range(nd)]
    p, q = bytearray(length), bytearray(length)
    compiled.pq_gen(p, q, data)
    good = [bytearray(d) for d in data] + [p, q]
    for impl in (compiled, pure):
        for x in range(nd):
            bl = [bytearray(b) for b in good]
            bl[x][:] = os.urandom(length)
            bl[nd][:] = bytes(length)
            impl.raid6_recov_datap(bl, x)
            assert bl == good
            for y in range(nd):
                if x == y:
                    continue
                bl = [bytearray(b) for b in good]
                bl[x][:] = os.urandom(length)
                bl[y][:] = os.urandom(length)
                impl.raid6_recov_2data(bl, x, y)
                assert bl == good


@settings(max_examples=40, deadline=None)
@given(c=st.integers(0, 255), length=st.integers(0, 300), acc=st.booleans())
def test_gf_mul_agrees(c, length, acc):
    src = os.urandom(length)
    start = os.urandom(length)
    b = bytearray(start)
    pure.gf_mul(b, src, c, acc)
    for name in backends():
        if name == "missing":
            pytest.fail("the compiled _fastio._raid module is not built (pip install -e .)")
        import _fastio._raid as cm
        cm._set_backend(name)
        a = bytearray(start)
        cm.gf_mul(a, src, c, acc)
        cm._set_backend("")
        assert a == b


def test_errors_match(compiled):
    for impl in (compiled, pure):
        with pytest.raises(ValueError):
            impl.xor_gen(bytearray(4), [])
        with pytest.raises(ValueError):
            impl.xor_gen(bytearray(4), [b"abc"])
        with pytest.raises(TypeError):
            impl.xor_gen(b"abcd", [b"abcd"])
        with pytest.raises(TypeError):
            impl.xor_gen(bytearray(4), b"abcd")
        with pytest.raises(ValueError):
            impl.gf_mul(bytearray(4), b"abcd", 256)
        with pytest.raises(TypeError):
            impl.gf_mul(bytearray(4), b"abcd", 2.0)
        with pytest.raises(ValueError):
            impl.raid6_recov_2data([bytearray(4)] * 4, 1, 1)
        with pytest.raises(ValueError):
            impl.raid6_recov_datap([bytearray(4)] * 3, 0)


def test_raid5_layouts_match_md():
    # (layout, stripe) -> (parity member, data members) for 4 members, from raid5.c
    n = 4
    assert stripe_map(5, 2, n, 0).pd == 3 and stripe_map(5, 2, n, 0).data == (0, 1, 2)
    assert stripe_map(5, 2, n, 1).pd == 2 and stripe_map(5, 2, n, 1).data == (3, 0, 1)
    assert stripe_map(5, 0, n, 1).pd == 2 and stripe_map(5, 0, n, 1).data == (0, 1, 3)
    assert stripe_map(5, 3, n, 1).pd == 1 and stripe_map(5, 3, n, 1).data == (2, 3, 0)
    assert stripe_map(5, 1, n, 1).pd == 1 and stripe_map(5, 1, n, 1).data == (0, 2, 3)
    assert stripe_map(4, 0, n, 2).pd == 3
    # RAID-6 left-symmetric, 5 members: pd = n-1-stripe, Q right after it:
    # stripe 0 = Q D D D P, stripe 1 = D D D P Q; Q order starts after Q.
    s0, s1 = stripe_map(6, 2, 5, 0), stripe_map(6, 2, 5, 1)
    assert (s0.pd, s0.qd, s0.data, s0.qexp) == (4, 0, (1, 2, 3), (0, 1, 2))
    assert (s1.pd, s1.qd, s1.data, s1.qexp) == (3, 4, (0, 1, 2), (0, 1, 2))
    # RAID-6 left-asymmetric stripe 2: D D P Q D; syndrome order 4, 0, 1
    a2 = stripe_map(6, 0, 5, 2)
    assert (a2.pd, a2.qd, a2.data, a2.qexp) == (2, 3, (0, 1, 4), (1, 2, 0))


def test_raid10_near2_mapping():
    g = Geometry(10, 0x102, 65536, 4, 1 << 20)
    assert g.raid10_copies(0) == [(0, 0), (1, 0)]
    assert g.raid10_copies(1) == [(2, 0), (3, 0)]
    assert g.raid10_copies(2) == [(0, 1), (1, 1)]
    g3 = Geometry(10, 0x102, 65536, 3, 1 << 20)
    assert g3.raid10_copies(1) == [(2, 0), (0, 1)]
    assert g3.raid10_chunk_of(0, 1) == 1
    assert g3.size == (16 * 3 // 2) * 65536
