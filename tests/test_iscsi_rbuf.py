"""The connection's receive buffer: small for idle sessions, larger when busy."""

from __future__ import annotations

from storaged.iscsi import framing as c
from storaged.iscsi.connection import Connection
from storaged.iscsi.target import Registry


def _conn() -> Connection:
    return Connection(Registry(), ("127.0.0.1", 3260), ("127.0.0.1", 40000))


def test_idle_connection_keeps_a_small_buffer():
    conn = _conn()
    for _ in range(20):
        view = conn.get_buffer(-1)
        assert len(view) <= c._RBUF_START      # 16 KiB, not 1 MiB, per idle session
        view.release()
        conn.buffer_updated(0)                  # reads that do not fill it: no growth
    assert len(conn._rbuf) == c._RBUF_START


def test_a_full_read_doubles_the_next_offer():
    conn = _conn()
    view = conn.get_buffer(-1)
    n = len(view)
    view[:n] = bytes(n)
    view.release()
    # The socket filled all it was offered: offer twice as much next time.
    # (NUL bytes are no valid login PDU; the connection drops after sizing.)
    conn.buffer_updated(n)
    assert conn._rwant == 2 * c._RBUF_START
    view = conn.get_buffer(-1)
    assert len(conn._rbuf) >= 2 * c._RBUF_START
    view.release()
    assert c._RBUF_BUSY == 1 << 20 and c._RBUF_START < c._RBUF_BUSY
