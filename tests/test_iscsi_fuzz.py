"""Property-based fuzzing of the sans-IO iSCSI core: hostile bytes and PDUs
never raise out of ``receive_data`` and never break the framing of replies."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.iscsi.pdu import INITIATOR_OPS, Op, build
from tests.iscsi_initiator import Initiator
from tests.test_iscsi_core import TARGET, make, run

u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def pdus(draw):
    op = draw(st.sampled_from(sorted(INITIATOR_OPS) + [0x1C, 0x3F]))
    data = draw(st.binary(max_size=600))
    hdr = bytearray(build(op, flags=draw(st.integers(0, 255)), b2=draw(st.integers(0, 255)),
                          b3=draw(st.integers(0, 255)), data_len=len(data),
                          lun=draw(st.integers(0, 2**64 - 1)), itt=draw(u32), w20=draw(u32),
                          w24=draw(st.one_of(st.just(1), st.just(2), u32)), w28=draw(u32),
                          w32=draw(u32), w36=draw(u32), w40=draw(u32), w44=draw(u32),
                          immediate=draw(st.booleans())))
    if op == Op.SCSI_CMD:
        hdr[32:48] = draw(st.binary(min_size=16, max_size=16))
    return bytes(hdr), data


def _check_output(ini: Initiator) -> None:
    for pdu in ini.collect() + run(ini):
        assert pdu.opcode in (0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3F)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pdus(), max_size=8))
def test_random_pdus_after_login(seq):
    _reg, _conn, ini = make()
    ini.full_login(TARGET)
    for hdr, data in seq:
        if ini.closed:
            break
        ini.send(hdr, data)
        _check_output(ini)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_before_login(blob):
    _reg, conn, ini = make()
    conn.receive_data(blob)
    ini.collect()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=10),
       st.integers(0, 255))
def test_random_login_keys(pairs, flags):
    from storaged.iscsi import text
    _reg, conn, ini = make()
    body = b"".join(f"{k}={v}".encode(errors="replace") + b"\0" for k, v in pairs)
    hdr = build(Op.LOGIN_REQ, flags=flags, data_len=len(body), lun=1 << 16, itt=1,
                immediate=True)
    ini.send(hdr, body)
    assert text.encode([]) == b""
