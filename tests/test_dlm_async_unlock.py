"""Asynchronous unlock, message batching and the wire format (real ZeroMQ nodes on 127.0.0.x).

``Lockspace.unlock`` returns once the unlock is on its way (like ``dlm_unlock``,
whose completion comes by AST); these tests prove the orderings that makes
safe: a later request from the same node reaches the master after the
unlock, other nodes are granted only once the master processed it, the LVB
written by an asynchronous unlock is what the next holder reads, and
``wait=True`` still reports the master's completion.
"""

from __future__ import annotations

import asyncio

import pytest

from storaged.cluster.node import MAX_BATCH
from storaged.cluster.wire import decode, encode_batch
from storaged.dlm.api import LockError
from storaged.dlm.modes import Flag, Mode, Status
from tests.test_cluster_nodes import config, run, start, stop


def test_wire_batch_round_trip_and_bad_input():
    msgs = [{"t": "req", "ls": "default", "r": "a\u00ff", "id": 1, "m": 5, "f": 0, "lvb": None},
            {"t": "unl", "ls": "default", "r": "b", "id": 2, "f": 8, "lvb": "x" * 32}]
    assert decode(encode_batch(3, 1234567, msgs)) == (3, 1234567, msgs)
    assert decode(b'{"t":"cfgreq","id":4}') == (None, None, [{"t": "cfgreq", "id": 4}])
    assert decode(b'{"t":"hb","n":2,"i":9}') == (2, 9, [{"t": "hb", "n": 2, "i": 9}])
    assert decode(b'[1,2,{"t":"a"},7,"x",{"t":"b"}]') == (1, 2, [{"t": "a"}, {"t": "b"}])
    for bad in (b"", b"[1]", b'["1",2]', b"42", b"\xff\xfe", b"[1,2"):
        with pytest.raises(ValueError):
            decode(bad)


def test_unlock_returns_before_the_master_completes_and_orders_requests():
    async def main() -> None:
        nodes = await start(config(2))
        try:
            a, b = nodes[0].lockspace(), nodes[1].lockspace()
            await b.unlock(await b.lock("r", "EX"), wait=True)   # node 2 masters "r"
            lk = await a.lock("r", "EX")
            assert a.core.masters[b"r"] == 2
            await a.unlock(lk)
            # Returned before the master answered: the handle still shows the unlock.
            assert lk.op == "unlock" and a.core.locks.get(lk.lkid) is lk
            # The next request from this node is queued behind the unlock on the FIFO
            # channel, so it is granted (it would wait forever if it overtook the unlock).
            again = await asyncio.wait_for(a.lock("r", "EX", flags=Flag.NOQUEUE), 5)
            assert again.mode == Mode.EX and lk.lkid not in a.core.locks
            # Node 2 cannot get it while node 1 holds it, and gets it right after the
            # asynchronous unlock reaches the master.
            with pytest.raises(LockError) as e:
                await b.lock("r", "PR", flags=Flag.NOQUEUE)
            assert e.value.status == Status.EAGAIN
            waiter = asyncio.ensure_future(b.lock("r", "PR"))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            await a.unlock(again)
            got = await asyncio.wait_for(waiter, 5)
            assert got.mode == Mode.PR
            await b.unlock(got, wait=True)
            assert not b.core.rsbs[b"r"].locks
        finally:
            await stop(nodes)
    run(main())


def test_async_unlock_writes_the_lvb_the_next_holder_reads():
    async def main() -> None:
        nodes = await start(config(2))
        try:
            a, b = nodes[0].lockspace(), nodes[1].lockspace()
            await b.unlock(await b.lock("v", "NL"), wait=True)
            for i in range(20):
                lk = await a.lock("v", "EX", flags=Flag.VALBLK)
                assert lk.lvb.rstrip(b"\0") == (b"" if i == 0 else b"n=%d" % (i - 1))
                await a.unlock(lk, lvb=b"n=%d" % i, flags=Flag.VALBLK)
            got = await b.lock("v", "PR", flags=Flag.VALBLK)
            assert got.lvb.rstrip(b"\0") == b"n=19" and got.lvb_valid
        finally:
            await stop(nodes)
    run(main())


def test_unlock_wait_reports_the_completion():
    async def main() -> None:
        nodes = await start(config(2))
        try:
            a, b = nodes[0].lockspace(), nodes[1].lockspace()
            await b.unlock(await b.lock("w", "EX"), wait=True)
            lk = await a.lock("w", "EX")
            await a.unlock(lk, wait=True)
            assert lk.op is None and lk.status == Status.EUNLOCK
            assert lk.lkid not in a.core.locks and not b.core.rsbs[b"w"].locks
            with pytest.raises(LockError) as e:
                await a.unlock(lk)
            assert e.value.status == Status.ENOENT
        finally:
            await stop(nodes)
    run(main())


def test_many_clients_batch_into_few_frames():
    async def main() -> None:
        nodes = await start(config(2))
        try:
            a, b = nodes[0].lockspace(), nodes[1].lockspace()
            names = [f"m{i}" for i in range(8)]
            for n in names:
                await b.unlock(await b.lock(n, "NL"), wait=True)
            sent: list[int] = []
            node = nodes[0]
            orig = node._flush_peer

            def counting(dst: int, msgs: list) -> None:
                sent.append(len(msgs))
                orig(dst, msgs)
            node._flush_peer = counting  # type: ignore[method-assign]

            async def client(name: str) -> None:
                for _ in range(50):
                    await a.unlock(await a.lock(name, "EX"))
            await asyncio.gather(*(client(n) for n in names))
            node._flush_peer = orig  # type: ignore[method-assign]
            msgs = sum(sent)
            assert msgs >= 8 * 50 * 2  # every lock and unlock went out...
            assert len(sent) < msgs / 3, (len(sent), msgs)  # ...several per frame...
            assert max(sent) <= MAX_BATCH  # ...and no more than MAX_BATCH in one
        finally:
            await stop(nodes)
    run(main())
