"""Property-based fuzzing of the sans-IO RPC core and the programs behind it.

Hostile bytes never raise out of the core: they become RPC errors
(GARBAGE_ARGS, PROG_UNAVAIL, AUTH_ERROR ...) or a Close event, and every
reply is a well-framed record answering the caller's xid.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.nfs import mount, nfs3
from storaged.nfs.rpc import (
    Call,
    Close,
    RecordReader,
    RpcConnection,
    encode_authsys,
    encode_call,
    record,
    reply_accept,
)
from tests.test_nfs_core import make_server

pytestmark = pytest.mark.root

_SERVER = None


def server(tmp_path_factory):
    global _SERVER
    if _SERVER is None:
        _SERVER, root = make_server(tmp_path_factory.mktemp("fuzz"), squash="none")
        with open(os.path.join(root, "f"), "wb") as f:
            f.write(b"abc")
        os.mkdir(os.path.join(root, "d"))
    return _SERVER


def pump(srv, conn: RpcConnection) -> tuple[list[bytes], bool]:
    closed = False
    for ev in conn.next_events():
        if isinstance(ev, Close):
            closed = True
            continue
        assert isinstance(ev, Call)
        proc = srv.service.lookup(ev)
        if isinstance(proc, tuple):
            conn.send(reply_accept(ev.xid, *proc))
        else:
            conn.send(srv.service.run(ev, proc))
    out = b"".join(bytes(b) for b in conn.data_to_send())
    return RecordReader().feed(out), closed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_never_crash(tmp_path_factory, chunks):
    srv = server(tmp_path_factory)
    conn = RpcConnection(("127.0.0.1", 700), max_record=1 << 16)
    for chunk in chunks:
        conn.receive_data(chunk)
        replies, _closed = pump(srv, conn)
        for r in replies:
            assert struct.unpack_from(">I", r, 4)[0] == 1  # a REPLY


PROCS = [(nfs3.NFS_PROGRAM, 3, p) for p in nfs3.PROCEDURES] + \
    [(mount.MOUNT_PROGRAM, 3, p) for p in mount.PROCEDURES] + \
    [(100000, 2, 3), (100000, 4, 3), (100003, 4, 0), (100021, 4, 1), (100003, 3, 99)]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PROCS), st.binary(max_size=200), st.integers(0, 0xFFFFFFFF),
       st.booleans(), st.integers(1, 64))
def test_random_calls_get_answers(tmp_path_factory, target, args, xid, auth, frag):
    srv = server(tmp_path_factory)
    conn = RpcConnection(("127.0.0.1", 700))
    prog, vers, proc = target
    cred = encode_authsys(1000, 1000) if auth else None
    msg = encode_call(xid, prog, vers, proc, args, cred)
    conn.receive_data(record(msg, fragment=frag))
    replies, closed = pump(srv, conn)
    assert not closed
    assert len(replies) == 1
    rxid, mtype, stat = struct.unpack_from(">III", replies[0], 0)
    assert (rxid, mtype, stat) == (xid, 1, 0)  # MSG_ACCEPTED (maybe GARBAGE_ARGS etc.)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_valid_calls(tmp_path_factory, data):
    """Valid NFS calls with bytes flipped: still one answer or a clean close."""
    srv = server(tmp_path_factory)
    conn = RpcConnection(("127.0.0.1", 700))
    fh = srv.exports.by_id[0x1234].handle(srv.exports.by_id[0x1234].fs.root)
    name = data.draw(st.sampled_from([b"f", b"d", b"..", b"x"]))
    proc, args = data.draw(st.sampled_from([
        (3, nfs3.LOOKUP3ARGS.encode({"what": {"dir": fh, "name": name}})),
        (6, nfs3.READ3ARGS.encode({"file": fh, "offset": 0, "count": 100})),
        (17, nfs3.READDIRPLUS3ARGS.encode({"dir": fh, "cookie": 0, "cookieverf": bytes(8),
                                          "dircount": 512, "maxcount": 1024})),
        (4, nfs3.ACCESS3ARGS.encode({"object": fh, "access": 0x3F})),
    ]))
    msg = bytearray(encode_call(7, nfs3.NFS_PROGRAM, 3, proc, args, encode_authsys(0, 0)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    conn.receive_data(record(bytes(msg)))
    replies, closed = pump(srv, conn)
    assert closed or len(replies) == 1
