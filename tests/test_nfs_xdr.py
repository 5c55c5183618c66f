"""Golden byte tests of the XDR tables (RFC 4506, RFC 5531, RFC 1813, RFC 1833).

The expected byte strings are written out by hand from the RFCs' struct
definitions, field by field, so a table that drifts from the RFC fails here.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storaged.nas.fs import Attr, FileType
from storaged.nfs import mount, nfs3, portmap, rpc
from storaged.nfs.xdr import (
    BOOL,
    INT32,
    UINT64,
    Array,
    FixedOpaque,
    List,
    Opaque,
    Optional,
    String,
    Struct,
    Union,
    XdrError,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def test_primitives_and_padding():
    assert INT32.encode(-2) == h("fffffffe")
    assert UINT64.encode(1 << 40) == h("00000100 00000000")
    assert BOOL.encode(True) == h("00000001")
    assert Opaque().encode(b"abcde") == h("00000005 61626364 65000000")
    assert String(8).encode(b"ab") == h("00000002 61620000")
    assert FixedOpaque(3).encode(b"xyz") == h("78797a00")
    assert bytes(Opaque().decode(h("00000003 41424300"))) == b"ABC"
    with pytest.raises(XdrError):
        String(2).decode(h("00000003 41424300"))  # longer than its maximum
    with pytest.raises(XdrError):
        Opaque().decode(h("00000008 4142"))  # short
    with pytest.raises(XdrError):
        BOOL.decode(h("00000002"))


def test_composites():
    pair = Struct("pair", ("a", INT32), ("b", String()))
    assert pair.encode({"a": 7, "b": b"hi"}) == h("00000007 00000002 68690000")
    assert Optional(INT32).encode(None) == h("00000000")
    assert Optional(INT32).encode(5) == h("00000001 00000005")
    assert Array(INT32, 4).encode([1, 2]) == h("00000002 00000001 00000002")
    # RFC 4506 §4.19 linked list: TRUE elem TRUE elem FALSE
    assert List(INT32).encode([9, 8]) == h("00000001 00000009 00000001 00000008 00000000")
    assert List(INT32).decode(h("00000001 00000009 00000000")) == [9]
    u = Union("u", INT32, {1: INT32}, default=None)
    assert u.encode((1, 3)) == h("00000001 00000003")
    with pytest.raises(XdrError):
        u.decode(h("00000002 00000003"))


def test_rpc_call_header_auth_sys():
    """RFC 5531 §9 call header with an AUTH_SYS credential (§A.1 authsys_parms)."""
    cred = rpc.encode_authsys(1000, 100, (100, 4), machine=b"host", stamp=0x11)
    msg = rpc.encode_call(0x01020304, nfs3.NFS_PROGRAM, 3, 1, b"", cred)
    assert msg == h("""
        01020304 00000000 00000002 000186a3 00000003 00000001
        00000001 00000020
          00000011 00000004 686f7374 000003e8 00000064 00000002 00000064 00000004
        00000000 00000000""")
    hdr = rpc.CALL_HEADER.decode(msg)
    assert rpc.decode_cred(hdr["cred"]) == rpc.Cred(rpc.AUTH_SYS, 1000, 100, (100, 4), b"host")


def test_rpc_replies():
    assert b"".join(rpc.reply_success(5, [b"\0\0\0\0"])) == h(
        "8000001c 00000005 00000001 00000000 00000000 00000000 00000000 00000000")
    assert b"".join(rpc.reply_accept(5, rpc.PROG_MISMATCH, 3, 3)) == h(
        "80000020 00000005 00000001 00000000 00000000 00000000 00000002 00000003 00000003")
    assert b"".join(rpc.reply_denied(6, rpc.AUTH_ERROR, rpc.AUTH_BADCRED)) == h(
        "80000014 00000006 00000001 00000001 00000001 00000001")
    assert b"".join(rpc.reply_denied(6, rpc.RPC_MISMATCH)) == h(
        "80000018 00000006 00000001 00000001 00000000 00000002 00000002")


def test_record_marking_fragments():
    """RFC 5531 §11: the last-fragment bit and multi-fragment reassembly."""
    msg = bytes(range(10))
    assert rpc.record(msg) == h("8000000a") + msg
    framed = rpc.record(msg, fragment=4)
    assert framed == h("00000004 00010203 00000004 04050607 80000002 0809")
    reader = rpc.RecordReader()
    got = []
    for i in range(len(framed)):  # byte by byte
        got += reader.feed(framed[i:i + 1])
    assert got == [msg]
    with pytest.raises(ValueError):
        rpc.RecordReader(max_record=8).feed(h("80000010"))


ATTR = Attr(FileType.REG, 0o644, 1, 1000, 100, 4096, 8192, (0, 0), 0x5EED, 12345,
            1_700_000_000_500_000_000, 1_700_000_001_000_000_007, 1_700_000_002_000_000_000)


def test_fattr3_fast_codec_matches_rfc_table():
    """The hand-written fattr3 codec equals RFC 1813 §2.6's struct, byte for byte."""
    ref = nfs3.FATTR3_TABLE.encode({
        "type": 1, "mode": 0o644, "nlink": 1, "uid": 1000, "gid": 100, "size": 4096,
        "used": 8192, "rdev": {"specdata1": 0, "specdata2": 0}, "fsid": 0x5EED,
        "fileid": 12345, "atime": {"seconds": 1_700_000_000, "nseconds": 500_000_000},
        "mtime": {"seconds": 1_700_000_001, "nseconds": 7},
        "ctime": {"seconds": 1_700_000_002, "nseconds": 0}})
    assert len(ref) == 84
    assert nfs3.fattr3_bytes(ATTR) == ref
    assert ref == h("""
        00000001 000001a4 00000001 000003e8 00000064
        00000000 00001000 00000000 00002000 00000000 00000000
        00000000 00005eed 00000000 00003039
        6553f100 1dcd6500 6553f101 00000007 6553f102 00000000""")
    assert nfs3.FATTR3.decode(ref) == ATTR


def test_nfs3_args_and_results():
    fh = b"\x01" * 20
    # READ3args: nfs_fh3, offset3, count3
    assert nfs3.READ3ARGS.encode({"file": fh, "offset": 8192, "count": 4096}) == (
        h("00000014") + fh + h("00000000 00002000 00001000"))
    # WRITE3args ends with stable_how and opaque data
    w = nfs3.WRITE3ARGS.decode(h("00000014") + fh + h(
        "00000000 00000000 00000003 00000002 00000003 61626300"))
    assert (w["count"], w["stable"], bytes(w["data"])) == (3, 2, b"abc")
    # A failed LOOKUP: status NOENT, dir_attributes absent
    assert nfs3.LOOKUP3RES.encode((nfs3.Stat.NOENT, {"dir_attributes": None})) == h(
        "00000002 00000000")
    # createhow3 EXCLUSIVE carries the 8-byte verifier
    assert nfs3.CREATEHOW3.encode((2, b"ABCDEFGH")) == h("00000002 4142434445464748")
    # wcc_data with only pre-op attributes
    wcc = nfs3.WCC_DATA.encode({"before": ATTR, "after": None})
    assert wcc == h("00000001 00000000 00001000 6553f101 00000007 6553f102 00000000 00000000")
    # set_time: SET_TO_SERVER_TIME has no body
    assert nfs3.SATTR3.encode({"mode": 0o600, "uid": None, "gid": None, "size": None,
                               "atime": (1, None), "mtime": (0, None)}) == h(
        "00000001 00000180 00000000 00000000 00000000 00000001 00000000")
    assert len(nfs3.PROCEDURES) == 22


def test_mount_and_portmap_tables():
    assert mount.MOUNTRES3.encode((0, {"fhandle": b"\xaa" * 4, "auth_flavors": [1, 0]})) == h(
        "00000000 00000004 aaaaaaaa 00000002 00000001 00000000")
    assert mount.EXPORTS.encode([{"ex_dir": b"/e", "ex_groups": [b"*"]}]) == h(
        "00000001 00000002 2f650000 00000001 00000001 2a000000 00000000 00000000")
    assert portmap.MAPPING.encode({"prog": 100003, "vers": 3, "prot": 6, "port": 2049}) == h(
        "000186a3 00000003 00000006 00000801")
    assert portmap.uaddr("127.0.0.1", 2049) == b"127.0.0.1.8.1"
    assert portmap.parse_uaddr(b"127.0.0.1.8.1") == ("127.0.0.1", 2049)


def test_call_header_fast_path_matches_table():
    cred = rpc.encode_authsys(5, 6, (7,), machine=b"m")
    for args in (b"", b"\0\0\0\1abcd"):
        msg = rpc.encode_call(9, 100005, 3, 1, args, cred)
        ref, off = rpc.CALL_HEADER.unpack(memoryview(msg), 0)
        fast = rpc.parse_call_header(memoryview(msg))
        assert fast == (2, 100005, 3, 1, 1, ref["cred"]["body"], 0, off)
        assert rpc.parse_call_header(memoryview(msg[:off - 1])) is None


_FH = st.binary(min_size=0, max_size=72)


@settings(max_examples=300, deadline=None)
@given(fh=_FH, offset=st.integers(0, 2**64 - 1), count=st.integers(0, 2**32 - 1),
       stable=st.integers(-1, 3), data=st.binary(max_size=40),
       cut=st.integers(0, 8), extra=st.binary(max_size=5))
def test_fast_read_write_args_match_the_tables(fh, offset, count, stable, data, cut, extra):
    """read3_args/write3_args decode exactly what READ3ARGS/WRITE3ARGS do, and
    leave to the tables (None) everything the tables would refuse."""
    def same(fast, table, raw: bytes) -> None:
        buf = memoryview(raw)
        got = fast(buf)
        try:
            want = table.decode(buf)
        except XdrError:
            assert got is None
            return
        if got is not None:
            assert {k: bytes(v) if isinstance(v, memoryview) else v for k, v in got.items()} \
                == {k: bytes(v) if isinstance(v, memoryview) else v for k, v in want.items()}

    fh3 = len(fh).to_bytes(4, "big") + fh + bytes(-len(fh) & 3)
    read = fh3 + offset.to_bytes(8, "big") + count.to_bytes(4, "big")
    write = fh3 + offset.to_bytes(8, "big") + count.to_bytes(4, "big") + \
        stable.to_bytes(4, "big", signed=True) + len(data).to_bytes(4, "big") + data + \
        bytes(-len(data) & 3)
    for raw in (read, read[:len(read) - cut], read + extra):
        same(nfs3.read3_args, nfs3.READ3ARGS, raw)
    for raw in (write, write[:len(write) - cut], write + extra):
        same(nfs3.write3_args, nfs3.WRITE3ARGS, raw)
    if len(fh) <= nfs3.NFS3_FHSIZE:       # well-formed: the fast decoders take them
        assert nfs3.read3_args(memoryview(read)) is not None
        if 0 <= stable <= 2:
            assert nfs3.write3_args(memoryview(write)) is not None
