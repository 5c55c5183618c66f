"""The fast path: compiled _fastio and the pure reference must agree.

Every behavioural test runs against both implementations; property tests
check compiled == pure on random input, including which exception is raised.
If _fastio is not built the compiled tests FAIL (run ``pip install -e .``),
unless STORAGED_NO_EXTENSIONS=1 is set, in which case they are skipped.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storaged import _purefastio as pure

NO_EXT = os.environ.get("STORAGED_NO_EXTENSIONS", "").strip().lower() not in (
    "",
    "0",
    "false",
    "no",
)
REPO = Path(__file__).resolve().parent.parent

try:
    import _fastio as _compiled
    import _fastio._crc as _compiled_crc

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built
    _compiled = _compiled_crc = None
    _IMPORT_ERROR = exc


def need_compiled():
    if _compiled is None:
        if NO_EXT:
            pytest.skip("STORAGED_NO_EXTENSIONS=1 and the _fastio extensions are not built")
        pytest.fail(
            f"the compiled _fastio package cannot be imported ({_IMPORT_ERROR}); "
            "run `pip install -e .` to build the Cython extensions "
            "(or set STORAGED_NO_EXTENSIONS=1 to test only the pure-Python path)",
            pytrace=False,
        )
    return _compiled


@pytest.fixture(scope="module")
def compiled():
    return need_compiled()


@pytest.fixture(scope="module", params=["pure", "compiled"])
def impl(request):
    return pure if request.param == "pure" else need_compiled()


def outcome(fn, *args):
    """("ok", result) or ("error", exception type): compared across implementations."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the exception type is the result
        return "error", type(exc)


# --------------------------------------------------------------------------- module shape

NAMES = {"crc32c", "decode_bhs", "encode_bhs", "encode_bhs_into", "scsi_rw_decode"}
# RAID parity kernels (tested in tests/test_raid_parity.py)
NAMES |= {"gf_mul", "pq_gen", "raid6_recov_2data", "raid6_recov_datap", "xor_gen"}


def test_pure_exports():
    assert set(pure.__all__) == NAMES
    for name in NAMES:
        assert callable(getattr(pure, name))


def test_compiled_exports_same_names(compiled):
    assert set(compiled.__all__) == set(pure.__all__)
    for name in NAMES:
        assert callable(getattr(compiled, name))


def test_loader_in_this_process():
    import storaged.fastio as fastio

    for name in NAMES:
        assert callable(getattr(fastio, name))
    if NO_EXT:
        assert fastio.IMPLEMENTATION == "pure"
        assert fastio.crc32c is pure.crc32c
    else:
        need_compiled()
        assert fastio.IMPLEMENTATION == "compiled"
        assert fastio.crc32c is _compiled.crc32c


def _implementation_in_subprocess(no_ext: str | None) -> str:
    env = dict(os.environ)
    env.pop("STORAGED_NO_EXTENSIONS", None)
    if no_ext is not None:
        env["STORAGED_NO_EXTENSIONS"] = no_ext
    out = subprocess.run(
        [sys.executable, "-c", "import storaged.fastio as f; print(f.IMPLEMENTATION)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_loader_env_forces_pure():
    assert _implementation_in_subprocess("1") == "pure"


def test_loader_prefers_compiled():
    need_compiled()
    assert _implementation_in_subprocess(None) == "compiled"
    assert _implementation_in_subprocess("0") == "compiled"


# --------------------------------------------------------------------------- CRC32C

# RFC 3720 Appendix B.4.  The RFC prints the digest bytes in wire order, and
# iSCSI sends the CRC least-significant byte first: "aa 36 91 8a" on the wire
# is crc32c(...) == 0x8A9136AA.  So crc32c() returns these values directly and
# a digest is crc32c(data).to_bytes(4, "little").
RFC3720_READ10_PDU = bytes.fromhex(
    "01c00000 00000000 00000000 00000000"
    "14000000 00000400 00000014 00000018"
    "28000000 00000000 02000000 00000000"
)
CRC_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (RFC3720_READ10_PDU, 0xD9963A56),
    (b"", 0),
]


@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_vectors(impl, data, expected):
    assert impl.crc32c(data) == expected


def test_crc32c_wire_order_matches_rfc(impl):
    assert impl.crc32c(bytes(32)).to_bytes(4, "little") == bytes.fromhex("aa36918a")
    assert impl.crc32c(b"\xff" * 32).to_bytes(4, "little") == bytes.fromhex("43aba862")
    assert impl.crc32c(bytes(range(32))).to_bytes(4, "little") == bytes.fromhex("4e79dd46")
    assert impl.crc32c(bytes(range(31, -1, -1))).to_bytes(4, "little") == bytes.fromhex(
        "5cdb3f11"
    )
    assert impl.crc32c(RFC3720_READ10_PDU).to_bytes(4, "little") == bytes.fromhex("563a96d9")


def test_crc32c_buffer_types(impl):
    data = bytes(range(256)) * 3
    want = impl.crc32c(data)
    assert impl.crc32c(bytearray(data)) == want
    assert impl.crc32c(memoryview(data)) == want
    assert impl.crc32c(memoryview(bytearray(b"xx" + data))[2:]) == want
    words = array.array("I", data)
    assert impl.crc32c(words) == want
    assert impl.crc32c(memoryview(words)) == want
    assert impl.crc32c(memoryview(data).cast("B", (len(data) // 16, 16))) == want


def test_crc32c_continuation(impl):
    a, b = b"hello, ", b"world" * 1000
    assert impl.crc32c(b, impl.crc32c(a)) == impl.crc32c(a + b)
    assert impl.crc32c(b"", 0x12345678) == 0x12345678
    assert impl.crc32c(b"abc", value=0) == impl.crc32c(b"abc")


@pytest.mark.parametrize(
    "args,exc",
    [
        ((b"x", -1), ValueError),
        ((b"x", 1 << 32), ValueError),
        ((b"x", 1 << 70), ValueError),
        ((b"x", 1.0), TypeError),
        ((b"x", "0"), TypeError),
        (("text",), TypeError),
        ((123,), TypeError),
        ((None,), TypeError),
        ((memoryview(bytes(16))[::2],), BufferError),
    ],
)
def test_crc32c_errors(impl, args, exc):
    with pytest.raises(exc):
        impl.crc32c(*args)


def test_crc32c_compiled_paths_agree_on_block_boundaries(compiled):
    blob = os.urandom(3 * 8192 * 2 + 3 * 256 + 100)
    sizes = [0, 1, 7, 8, 9, 63, 767, 768, 769, 2303, 2304, 2305, 24575, 24576, 24577,
             49152 + 767, len(blob) - 8]
    for size in sizes:
        for start in range(8):  # every alignment
            chunk = memoryview(blob)[start : start + size]
            want = _compiled_crc._crc32c_sw(chunk)
            assert compiled.crc32c(chunk) == want, (size, start)
            cut = size // 3
            assert compiled.crc32c(chunk[cut:], compiled.crc32c(chunk[:cut])) == want
    # the large-buffer path releases the GIL; check it on a long bytes object too
    big = os.urandom(1 << 20)
    assert compiled.crc32c(big) == _compiled_crc._crc32c_sw(big) == pure.crc32c(big)
    assert _compiled_crc.backend() in ("sse4.2", "software")


@given(data=st.binary(max_size=4096), value=st.integers(0, 0xFFFFFFFF))
def test_crc32c_compiled_equals_pure(compiled, data, value):
    want = pure.crc32c(data, value)
    assert compiled.crc32c(data, value) == want
    assert _compiled_crc._crc32c_sw(data, value) == want


@given(a=st.binary(max_size=600), b=st.binary(max_size=600))
def test_crc32c_split_property(impl, a, b):
    assert impl.crc32c(b, impl.crc32c(a)) == impl.crc32c(a + b)


# --------------------------------------------------------------------------- BHS

FIELD_NAMES = ("opcode", "immediate", "flags", "b2", "b3", "ahs_len", "data_len", "lun",
               "itt", "w20", "w24", "w28", "w32", "w36", "w40", "w44")
FIELD_MAX = (0x3F, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFFFFFF, 2**64 - 1, *([2**32 - 1] * 8))

# The RFC 3720 B.4 READ(10) command PDU, decoded by hand.
RFC3720_READ10_FIELDS = (
    0x01, False, 0xC0, 0, 0, 0, 0, 0, 0x14000000,
    0x00000400, 0x00000014, 0x00000018,  # expected length, CmdSN, ExpStatSN
    0x28000000, 0x00000000, 0x02000000, 0x00000000,  # CDB
)


def fields_strategy():
    return st.tuples(
        st.integers(0, 0x3F),
        st.booleans(),
        *[st.integers(0, m) for m in FIELD_MAX[2:]],
    )


def test_decode_known_pdu(impl):
    fields = impl.decode_bhs(RFC3720_READ10_PDU)
    assert type(fields) is tuple and len(fields) == 16
    assert fields == RFC3720_READ10_FIELDS
    assert fields[1] is False


def test_encode_known_pdu(impl):
    out = impl.encode_bhs(*RFC3720_READ10_FIELDS)
    assert type(out) is bytes
    assert out == RFC3720_READ10_PDU


def test_decode_field_layout(impl):
    raw = bytes.fromhex(
        "c3 81 02 03 04 050607 08090a0b0c0d0e0f 10111213"
        "14151617 18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f"
    )
    assert impl.decode_bhs(raw + b"trailing data is ignored") == (
        0x03, True, 0x81, 0x02, 0x03, 0x04, 0x050607, 0x08090A0B0C0D0E0F, 0x10111213,
        0x14151617, 0x18191A1B, 0x1C1D1E1F, 0x20212223, 0x24252627, 0x28292A2B, 0x2C2D2E2F,
    )
    # bit 7 of byte 0 is reserved: ignored on decode, never set on encode
    fields = impl.decode_bhs(raw)
    assert impl.encode_bhs(*fields) == bytes([raw[0] & 0x7F]) + raw[1:]


def test_decode_buffer_types(impl):
    padded = bytearray(b"\0" * 5 + RFC3720_READ10_PDU + b"\0" * 3)
    assert impl.decode_bhs(memoryview(padded)[5:]) == RFC3720_READ10_FIELDS
    assert impl.decode_bhs(bytearray(RFC3720_READ10_PDU)) == RFC3720_READ10_FIELDS
    assert impl.decode_bhs(array.array("I", RFC3720_READ10_PDU)) == RFC3720_READ10_FIELDS


@pytest.mark.parametrize("buf", [b"", bytes(47), bytearray(47), memoryview(bytes(100))[:47]])
def test_decode_short_buffer(impl, buf):
    with pytest.raises(ValueError):
        impl.decode_bhs(buf)


@pytest.mark.parametrize("buf", ["x" * 48, 48, None])
def test_decode_not_a_buffer(impl, buf):
    with pytest.raises(TypeError):
        impl.decode_bhs(buf)


def test_encode_extremes(impl):
    top = (0x3F, True, *FIELD_MAX[2:])
    raw = impl.encode_bhs(*top)
    assert raw == b"\x7f" + b"\xff" * 47
    assert impl.decode_bhs(raw) == top
    assert impl.encode_bhs(*([0] * 16)) == bytes(48)


def test_encode_immediate_is_truthiness(impl):
    base = list(RFC3720_READ10_FIELDS)
    for truthy in (True, 1, 2, "yes", [0]):
        base[1] = truthy
        assert impl.encode_bhs(*base)[0] == 0x41
    for falsy in (False, 0, "", None, []):
        base[1] = falsy
        assert impl.encode_bhs(*base)[0] == 0x01


@pytest.mark.parametrize("index", [i for i in range(16) if i != 1])
def test_encode_out_of_range(impl, index):
    for bad in (-1, FIELD_MAX[index] + 1, 2**64, -(2**70)):
        fields = list(RFC3720_READ10_FIELDS)
        fields[index] = bad
        with pytest.raises(ValueError, match=FIELD_NAMES[index]):
            impl.encode_bhs(*fields)
        with pytest.raises(ValueError, match=FIELD_NAMES[index]):
            impl.encode_bhs_into(bytearray(48), 0, *fields)


@pytest.mark.parametrize("bad", [1.0, "1", None, b"\x01"])
def test_encode_wrong_type(impl, bad):
    fields = list(RFC3720_READ10_FIELDS)
    fields[8] = bad
    with pytest.raises(TypeError):
        impl.encode_bhs(*fields)


def test_encode_accepts_index_types(impl):
    class Idx:
        def __index__(self):
            return 7

    fields = list(RFC3720_READ10_FIELDS)
    fields[2] = Idx()
    fields[7] = True
    assert impl.decode_bhs(impl.encode_bhs(*fields))[2] == 7
    assert impl.decode_bhs(impl.encode_bhs(*fields))[7] == 1


def test_encode_into(impl):
    buf = bytearray(b"\xee" * 100)
    assert impl.encode_bhs_into(buf, 10, *RFC3720_READ10_FIELDS) is None
    assert buf[:10] == b"\xee" * 10
    assert bytes(buf[10:58]) == RFC3720_READ10_PDU
    assert buf[58:] == b"\xee" * 42
    # exact fit at the end, through a memoryview
    mv = memoryview(buf)
    impl.encode_bhs_into(mv, 52, *RFC3720_READ10_FIELDS)
    assert bytes(buf[52:]) == RFC3720_READ10_PDU
    words = array.array("I", bytes(48))
    impl.encode_bhs_into(words, 0, *RFC3720_READ10_FIELDS)
    assert words.tobytes() == RFC3720_READ10_PDU


@pytest.mark.parametrize(
    "buf,offset,exc",
    [
        (bytearray(47), 0, ValueError),
        (bytearray(48), 1, ValueError),
        (bytearray(100), 53, ValueError),
        (bytearray(100), -1, ValueError),
        (bytearray(100), 2**64, ValueError),
        (bytearray(100), 1.5, TypeError),
        (bytes(48), 0, TypeError),  # read-only
        (memoryview(bytes(48)), 0, TypeError),
        (memoryview(bytearray(96))[::2], 0, TypeError),  # not contiguous
        ("x" * 48, 0, TypeError),
        (None, 0, TypeError),
    ],
)
def test_encode_into_errors(impl, buf, offset, exc):
    before = bytes(buf) if isinstance(buf, bytearray) else None
    with pytest.raises(exc):
        impl.encode_bhs_into(buf, offset, *RFC3720_READ10_FIELDS)
    if before is not None:
        assert bytes(buf) == before  # nothing written on error


@given(fields=fields_strategy())
def test_bhs_round_trip(impl, fields):
    raw = impl.encode_bhs(*fields)
    assert len(raw) == 48
    assert impl.decode_bhs(raw) == fields
    buf = bytearray(60)
    impl.encode_bhs_into(buf, 7, *fields)
    assert bytes(buf[7:55]) == raw


@given(fields=fields_strategy())
def test_bhs_encode_compiled_equals_pure(compiled, fields):
    assert compiled.encode_bhs(*fields) == pure.encode_bhs(*fields)


@given(raw=st.binary(min_size=0, max_size=64))
def test_bhs_decode_compiled_equals_pure(compiled, raw):
    assert outcome(compiled.decode_bhs, raw) == outcome(pure.decode_bhs, raw)
    if len(raw) >= 48:
        fields = compiled.decode_bhs(raw)
        assert compiled.encode_bhs(*fields) == bytes([raw[0] & 0x7F]) + raw[1:48]


@given(
    fields=fields_strategy(),
    index=st.integers(0, 15),
    bad=st.one_of(
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False),
        st.none(),
        st.text(max_size=2),
    ),
    size=st.integers(0, 100),
    offset=st.integers(-3, 100),
)
def test_bhs_errors_compiled_equals_pure(compiled, fields, index, bad, size, offset):
    fields = list(fields)
    fields[index] = bad
    assert outcome(compiled.encode_bhs, *fields) == outcome(pure.encode_bhs, *fields)
    a, b = bytearray(size), bytearray(size)
    assert outcome(compiled.encode_bhs_into, a, offset, *fields) == outcome(
        pure.encode_bhs_into, b, offset, *fields
    )
    assert a == b


# --------------------------------------------------------------------------- CDB


def cdb(*prefix: int, size: int) -> bytes:
    return bytes(prefix) + bytes(size - len(prefix))


@pytest.mark.parametrize(
    "raw,expected",
    [
        # READ(6) / WRITE(6): 21-bit LBA, length 0 means 256 blocks, no flags byte
        (bytes([0x08, 0x1F, 0xFF, 0xFE, 0x08, 0x00]), (0x1FFFFE, 8, 0)),
        (bytes([0x0A, 0xE1, 0x02, 0x03, 0x00, 0x00]), (0x010203, 256, 0)),
        (bytes([0x08, 0, 0, 0, 1, 0]), (0, 1, 0)),
        # (10): the RFC 3720 example CDB is READ(10) LBA 0, 2 blocks
        (RFC3720_READ10_PDU[32:48], (0, 2, 0)),
        (bytes([0x2A, 0x08, 0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x12, 0x34, 0x00]),
         (0xDEADBEEF, 0x1234, 0x08)),
        (bytes([0x2F, 0x02, 0, 0, 0, 5, 0, 0, 1, 0]), (5, 1, 0x02)),
        (bytes([0x2E, 0x10, 0, 0, 1, 0, 0, 0, 0, 0]), (256, 0, 0x10)),
        # (12)
        (bytes([0xA8, 0x18, 0, 0, 0, 9, 0x00, 0x01, 0x00, 0x00, 0, 0]), (9, 0x10000, 0x18)),
        (cdb(0xAA, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, size=12),
         (0xFFFFFFFF, 0xFFFFFFFF, 0x08)),
        (cdb(0xAF, 0, 0, 0, 0, 1, 0, 0, 0, 2, size=12), (1, 2, 0)),
        (cdb(0xAE, 0x02, size=12), (0, 0, 0x02)),
        # (16)
        (cdb(0x88, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
             0x00, 0x00, 0x01, 0x00, size=16), (1 << 32, 256, 0)),
        (cdb(0x8A, 0x08, *([0xFF] * 8), 0xFF, 0xFF, 0xFF, 0xFF, size=16),
         (2**64 - 1, 2**32 - 1, 0x08)),
        (cdb(0x8F, 0x06, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 3, size=16), (7, 3, 0x06)),
        (cdb(0x8E, 0x10, size=16), (0, 0, 0x10)),
        # a longer buffer (the 16-byte CDB field of a BHS) is fine
        (cdb(0x28, 0x00, 0, 0, 0, 1, 0, 0, 4, size=16), (1, 4, 0)),
    ],
)
def test_scsi_rw_decode(impl, raw, expected):
    assert impl.scsi_rw_decode(raw) == expected
    assert impl.scsi_rw_decode(bytearray(raw)) == expected
    assert impl.scsi_rw_decode(memoryview(b"\0" + raw)[1:]) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(16),  # TEST UNIT READY
        cdb(0x12, size=6),  # INQUIRY
        cdb(0x13, size=6),  # VERIFY(6) is SSC, not SBC
        cdb(0x35, size=10),  # SYNCHRONIZE CACHE(10)
        cdb(0x08, size=5),  # short
        cdb(0x28, size=9),
        cdb(0xA8, size=11),
        cdb(0x88, size=15),
        bytes([0x8A]),
    ],
)
def test_scsi_rw_decode_errors(impl, raw):
    with pytest.raises(ValueError):
        impl.scsi_rw_decode(raw)


@pytest.mark.parametrize("bad", ["\x28" * 10, 0x28, None])
def test_scsi_rw_decode_not_a_buffer(impl, bad):
    with pytest.raises(TypeError):
        impl.scsi_rw_decode(bad)


RW_OPCODES = [0x08, 0x0A, 0x28, 0x2A, 0x2F, 0x2E, 0xA8, 0xAA, 0xAF, 0xAE, 0x88, 0x8A, 0x8F, 0x8E]


@given(
    raw=st.one_of(
        st.binary(max_size=20),
        st.tuples(st.sampled_from(RW_OPCODES), st.binary(max_size=19)).map(
            lambda t: bytes([t[0]]) + t[1]
        ),
    )
)
def test_scsi_rw_decode_compiled_equals_pure(compiled, raw):
    assert outcome(compiled.scsi_rw_decode, raw) == outcome(pure.scsi_rw_decode, raw)
