"""Record-marking receive buffer (storaged.nfs.rpc.RecordReader): zero-copy records that
stay intact while referenced, through the BufferedProtocol and ``feed`` entry points."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from storaged.nfs.rpc import MIN_READ, RecordReader, record


def _pump(reader: RecordReader, stream: bytes, chunks: list[int]) -> list[memoryview]:
    """Deliver ``stream`` as a socket would: into ``get_buffer``, ``chunks`` at a time."""
    out, pos, i = [], 0, 0
    while pos < len(stream):
        buf = reader.get_buffer(-1)
        assert len(buf) >= MIN_READ
        k = min(len(buf), len(stream) - pos, chunks[i % len(chunks)])
        buf[:k] = stream[pos:pos + k]
        buf.release()
        pos += k
        i += 1
        out += reader.buffer_updated(k)
    return out


@pytest.mark.parametrize("chunks", [[1], [7, 3], [4096], [100_000, 5], [1 << 20]])
def test_records_survive_later_reads(chunks):
    rng = random.Random(len(chunks))
    sizes = [0, 1, 40, 5000] + ([300_000, 1 << 20] if chunks[0] > 100 else [])
    msgs = [rng.randbytes(rng.choice(sizes)) for _ in range(12)]
    stream = b"".join(record(m, fragment=(1000 if i % 5 == 4 else None))
                      for i, m in enumerate(msgs))
    reader = RecordReader()
    got = _pump(reader, stream, chunks)
    # Every record view is still intact after all later reads landed.
    assert [bytes(r) for r in got] == msgs


def test_buffer_reused_in_place_when_no_views_remain():
    reader = RecordReader()
    msg = b"x" * 1000
    first = reader.buffer_updated(0)
    assert first == []
    for _ in range(1000):
        recs = reader.feed(record(msg))
        assert [bytes(r) for r in recs] == [msg]
        del recs
    # 1 MB went through without the buffer ever growing.
    assert len(reader.buf) == MIN_READ


def test_large_record_lands_contiguously_and_limit_is_enforced():
    reader = RecordReader(max_record=3 << 20)
    big = bytes(range(256)) * (8 << 10)  # 2 MiB
    recs = _pump(reader, record(big), [65536])
    assert len(recs) == 1 and recs[0] == big
    with pytest.raises(ValueError):
        RecordReader(max_record=1000).feed(record(b"y" * 1001))


@pytest.mark.root
def test_reads_over_tcp_with_sendfile(tmp_path):
    """READs of >= 256 KiB go out by sendfile (FileRange); the bytes, counts, eof and XDR
    padding on the wire must be exactly those of the copying path, also when many
    replies are queued at once and the socket fills up."""
    from storaged.nas.exports import Export, LiveExport
    from storaged.nas.hostfs import HostFs
    from storaged.nfs.server import NfsServer
    from tests.nfs_client import TcpClient

    root = tmp_path / "export"
    root.mkdir()
    data = random.Random(5).randbytes((3 << 20) + 4097)
    (root / "f").write_bytes(data)
    rec = Export(path="/export", directory=str(root), export_id=0x1234, handle_key="11" * 16,
                 squash="none")
    rec.validate()
    server = NfsServer(write_verifier=b"VERIFIER")
    server.exports.set([LiveExport(rec, HostFs(str(root), fsid=rec.export_id))])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sent = []
    real_sendfile = os.sendfile

    def counting_sendfile(*a):
        n = real_sendfile(*a)
        sent.append(n)
        return n

    try:
        asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0, "off"), loop).result(10)
        port = server.address[1]
        c = TcpClient("127.0.0.1", port)
        fh = c.lookup(c.mnt("/export"), b"f")
        os.sendfile = counting_sendfile
        cases = [(0, 1 << 20), (12345, 262145), (len(data) - 270_000, 1 << 20),
                 (len(data), 1 << 20), (len(data) + 5, 300_000), (1, 4096)]
        for offset, count in cases:
            status, res = c.read(fh, offset, count)
            assert status == 0
            want = data[offset:offset + count]
            assert bytes(res["data"]) == want and res["count"] == len(want)
            assert res["eof"] == (offset + count >= len(data))
        assert sum(sent) >= (1 << 20) + 262145 + 270_000
        # Pipelined: 24 READs in one send, answered in order.
        from storaged.nfs.nfs3 import NFS_PROGRAM, NFS_V3, READ3ARGS, READ3RES
        from storaged.nfs.rpc import decode_reply, encode_call
        reads = [(i * 131072, 262144 if i % 2 else 131072) for i in range(24)]
        c.send_raw(b"".join(record(encode_call(
            1000 + i, NFS_PROGRAM, NFS_V3, 6,
            READ3ARGS.encode({"file": fh, "offset": o, "count": n}), c.cred))
            for i, (o, n) in enumerate(reads)))
        for i, (o, n) in enumerate(reads):
            xid, _stat, body = decode_reply(c.recv_record())
            assert xid == 1000 + i
            status, res = READ3RES.decode(body)
            assert status == 0 and bytes(res["data"]) == data[o:o + n]
    finally:
        os.sendfile = real_sendfile
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_inline_calls_keep_their_order_behind_queued_ones():
    """With ``inline`` set, a call runs at once only when nothing is queued
    ahead of it; a blocking one, and everything after it in the same read,
    go out as events in order."""
    from storaged.nfs.rpc import (
        Call,
        Procedure,
        Program,
        RpcConnection,
        RpcService,
        decode_reply,
        encode_call,
    )
    from storaged.nfs.xdr import VOID

    ran: list[int] = []

    def handler(call: Call, _args) -> bytes:
        ran.append(call.xid)
        return call.xid.to_bytes(4, "big")

    service = RpcService()
    prog = Program(400001, 1)
    prog.procs[1] = Procedure("FAST", VOID, VOID, handler)
    prog.procs[2] = Procedure("SLOW", VOID, VOID, handler, blocking=True)
    service.add(prog)
    conn = RpcConnection(("127.0.0.1", 700))
    conn.inline = service.run_inline
    calls = [(1, 1), (2, 2), (3, 1), (4, 1)]
    conn.receive_data(b"".join(record(encode_call(x, 400001, 1, p)) for x, p in calls[:1]))
    assert ran == [1]
    conn.receive_data(b"".join(record(encode_call(x, 400001, 1, p)) for x, p in calls[1:]))
    assert ran == [1]                                   # 2 blocks: 3 and 4 queue behind it
    assert [e.xid for e in conn.next_events()] == [2, 3, 4]
    out = b"".join(bytes(p) for p in conn.data_to_send())
    xid, _stat, body = decode_reply(out[4:])
    assert xid == 1 and bytes(body) == (1).to_bytes(4, "big")
    conn.receive_data(record(encode_call(9, 400002, 1, 0)))      # unknown program
    assert ran == [1] and not conn.next_events()
    assert decode_reply(b"".join(bytes(p) for p in conn.data_to_send())[4:])[0] == 9
