"""The compiled ``_fastio._nfsrpc`` against its pure-Python references.

``parse_call_header`` against ``storaged.nfs.rpc.parse_call_header_py`` (which
test_nfs_xdr checks against the CALL_HEADER table), and the READ/WRITE reply
headers against ``storaged.nfs.quick.read_reply_py``/``write_reply_py``, which
are checked here against the XDR result tables: the same bytes, and the same
refusals, for any attributes and any header bytes.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storaged.fastio import extensions_disabled
from storaged.nas.fs import Attr, FileType
from storaged.nfs import nfs3, quick, rpc
from tests.support import compiled_module

NO_EXT = extensions_disabled()


@pytest.fixture(scope="module")
def compiled():
    return compiled_module("_nfsrpc")


def test_loaders_pick_compiled_unless_disabled():
    if not NO_EXT:
        compiled_module("_nfsrpc")
    want = "pure" if NO_EXT else "compiled"
    assert quick.IMPLEMENTATION == want
    assert (rpc.parse_call_header is rpc.parse_call_header_py) == (want == "pure")


U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
ANY_INT = st.one_of(st.integers(-2**70, 2**70), U32, st.sampled_from([0, -1, 2**32, 2**64]))
TIME = st.one_of(st.integers(-2**70, 2**70), st.integers(0, 2**63),
                 st.sampled_from([0, -1, 999_999_999, 1_000_000_000, 2**63 - 1, 2**63,
                                  2**64, (2**32) * 10**9 + 5]))
ATTRS = st.builds(Attr, st.sampled_from(list(FileType)), st.integers(0, 0o7777), ANY_INT,
                  ANY_INT, ANY_INT, U64, U64, st.tuples(ANY_INT, ANY_INT), U64, U64,
                  TIME, TIME, TIME)
# Values the reply cannot carry: both implementations must refuse them.
BAD_U64 = st.sampled_from([-1, 2**64])


@settings(max_examples=500, deadline=None)
@given(xid=U32, attr=ATTRS, count=st.integers(0, 1 << 21), eof=st.booleans())
def test_read_reply_matches_reference_and_table(compiled, xid, attr, count, eof):
    ref = quick.read_reply_py(xid, attr, count, eof)
    assert compiled.read_reply(xid, attr, count, eof) == ref
    body = b"\x07" * count + bytes(-count & 3)
    mark, = struct.unpack_from(">I", ref)
    assert mark == rpc.LAST_FRAGMENT | (len(ref) - 4 + len(body))
    table = nfs3.READ3RES.encode((nfs3.Stat.OK, {"file_attributes": attr, "count": count,
                                                 "eof": eof, "data": b"\x07" * count}))
    assert ref[4:] + body == rpc.accepted_header(xid) + table


@settings(max_examples=500, deadline=None)
@given(xid=U32, before=ATTRS, after=ATTRS, count=U32, committed=st.integers(0, 2),
       verifier=st.binary(min_size=8, max_size=8))
def test_write_reply_matches_reference_and_table(compiled, xid, before, after, count,
                                                 committed, verifier):
    ref = quick.write_reply_py(xid, before, after, count, committed, verifier)
    assert compiled.write_reply(xid, before, after, count, committed, verifier) == ref
    table = nfs3.WRITE3RES.encode((nfs3.Stat.OK, {
        "file_wcc": {"before": before, "after": after}, "count": count,
        "committed": committed, "verf": verifier}))
    assert ref == b"".join(rpc.frame([rpc.accepted_header(xid) + table]))


@settings(max_examples=200, deadline=None)
@given(attr=ATTRS, bad=BAD_U64, field=st.sampled_from(["size", "used", "fsid", "fileid"]))
def test_out_of_range_attributes_are_refused_alike(compiled, attr, bad, field):
    setattr(attr, field, bad)
    for fn in (quick.read_reply_py, compiled.read_reply):
        with pytest.raises(struct.error):
            fn(1, attr, 0, False)
    for fn in (quick.write_reply_py, compiled.write_reply):
        with pytest.raises(struct.error):
            fn(1, attr, attr, 0, 0, b"12345678")
    with pytest.raises(ValueError):
        compiled.write_reply(1, attr, attr, 0, 0, b"short")


def _headers() -> st.SearchStrategy[bytes]:
    """Call headers, well-formed or cut short or with oversized auth lengths."""
    def build(words, blen, body, vlen, vbody, tail, cut):
        msg = struct.pack(">6I", *words) + struct.pack(">II", 1, blen) + body
        msg += struct.pack(">II", 0, vlen) + vbody + tail
        return msg[:cut] if cut is not None else msg
    lens = st.one_of(st.integers(0, 40), st.sampled_from([400, 401, 2**32 - 1]))
    return st.builds(build, st.lists(U32, min_size=6, max_size=6), lens,
                     st.binary(max_size=48), lens, st.binary(max_size=48),
                     st.binary(max_size=12), st.one_of(st.none(), st.integers(0, 120)))


@settings(max_examples=1000, deadline=None)
@given(msg=_headers())
def test_call_header_matches_reference(compiled, msg):
    assert compiled.parse_call_header(memoryview(msg)) == \
        rpc.parse_call_header_py(memoryview(msg))
