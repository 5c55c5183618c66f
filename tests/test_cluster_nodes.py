"""Cluster nodes over real ZeroMQ sockets on 127.0.0.x (several nodes in one event loop)."""

from __future__ import annotations

import asyncio
import time

import pytest

from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.cluster.fencing import ManualFencer, TestFencer
from storaged.cluster.node import ClusterNode
from storaged.dlm.api import LockError, SyncLockspace
from storaged.dlm.modes import Flag, Mode, Status
from tests.test_cluster_safety import free_ports

TOKEN_MS = 300


def config(n: int, **kw) -> ClusterConfig:
    ports = free_ports(n)
    kw.setdefault("token_ms", TOKEN_MS)
    return ClusterConfig(name="t", nodes={i + 1: NodeEntry(f"127.0.0.{i + 1}:{ports[i]}")
                                          for i in range(n)}, **kw)


async def start(cfg: ClusterConfig, fencers=None) -> list[ClusterNode]:
    nodes = [ClusterNode(cfg, n, fencer=(fencers or {}).get(n, TestFencer()))
             for n in cfg.nodes]
    for node in nodes:
        await node.start()
    for node in nodes:
        await node.wait_ready(len(nodes), timeout=10)
    return nodes


async def stop(nodes: list[ClusterNode]) -> None:
    for node in nodes:
        await node.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_lvb_and_blocking_callback():
    async def main() -> None:
        nodes = await start(config(3))
        try:
            a, b = nodes[0].lockspace(), nodes[1].lockspace()
            basts: list = []
            lk = await a.lock("res", "EX", flags=Flag.VALBLK,
                              bast=lambda lock, mode: basts.append(mode))
            assert lk.lvb == bytes(32) and lk.lvb_valid
            waiter = asyncio.ensure_future(b.lock("res", "PR", flags=Flag.VALBLK))
            await asyncio.sleep(0.05)
            assert basts == [Mode.PR] and not waiter.done()
            await a.unlock(lk, lvb=b"version=7")
            got = await waiter
            assert got.lvb.rstrip(b"\0") == b"version=7" and got.lvb_valid
            # NOQUEUE against a PR holder fails at once; a cancel ends a wait.
            with pytest.raises(LockError) as e:
                await a.lock("res", "EX", flags=Flag.NOQUEUE)
            assert e.value.status == Status.EAGAIN
            lk2, fut = a.request("res", "EX")
            a.cancel(lk2)
            assert await fut == Status.ECANCEL
            # Up-conversion returns the LVB, down-conversion from EX writes it.
            await b.convert(got, "EX", flags=Flag.VALBLK)
            await b.convert(got, "NL", flags=Flag.VALBLK, lvb=b"version=8")
            lk3 = await a.lock("res", "CR", flags=Flag.VALBLK)
            assert lk3.lvb.rstrip(b"\0") == b"version=8"
        finally:
            await stop(nodes)
    run(main())


def test_liveness_and_lvb_invalidation_after_node_death():
    async def main() -> None:
        cfg = config(3, fence_delay_ms=200)
        nodes = await start(cfg)
        try:
            one, three = nodes[0].lockspace(), nodes[2].lockspace()
            # Master the resource on node 1, then node 3 holds it in PW with an LVB.
            lk = await one.lock("vol", "NL", flags=Flag.VALBLK)
            held = await three.lock("vol", "PW", flags=Flag.VALBLK)
            assert held.mode == Mode.PW
            waiter = asyncio.ensure_future(one.lock("vol2", "EX"))
            await waiter
            await one.unlock(waiter.result())
            w = asyncio.ensure_future(one.convert(lk, "EX", flags=Flag.VALBLK))
            await asyncio.sleep(0.05)
            assert not w.done()
            t0 = time.monotonic()
            await nodes[2].stop()             # node 3 dies holding PW
            await w
            took = time.monotonic() - t0
            budget = cfg.token + cfg.consensus + cfg.fence_delay_ms / 1000 + 0.5
            assert took < budget, (took, budget)
            assert not lk.lvb_valid           # a PW holder died: LVB invalid (Linux rules)
            assert [n for n, _ in nodes[0].view.members] == [1, 2]
        finally:
            await stop(nodes[:2])
    run(main())


def test_waiting_request_survives_recovery_of_its_master():
    async def main() -> None:
        nodes = await start(config(3))
        try:
            three, two = nodes[2].lockspace(), nodes[1].lockspace()
            held = await three.lock("m3", "PR")          # node 3 masters "m3"
            other = await two.lock("m3", "PR")
            waiter = asyncio.ensure_future(two.lock("m3", "EX"))
            await asyncio.sleep(0.05)
            await two.unlock(other)
            assert not waiter.done() and held.mode == Mode.PR
            await nodes[2].stop()                        # master and holder die
            got = await asyncio.wait_for(waiter, 5)
            assert got.mode == Mode.EX
        finally:
            await stop(nodes[:2])
    run(main())


def test_manual_fencer_blocks_recovery_until_acknowledged():
    async def main() -> None:
        manual = {n: ManualFencer() for n in (1, 2, 3)}
        nodes = await start(config(3), fencers=manual)
        try:
            held = await nodes[2].lockspace().lock("f", "EX")
            assert held.mode == Mode.EX
            waiter = asyncio.ensure_future(nodes[0].lockspace().lock("f", "EX"))
            await nodes[2].stop()
            await asyncio.sleep(1.0)
            assert not waiter.done()
            assert nodes[1].status()["pending_fence"] == [3]
            nodes[1].fence_ack(3)                        # any node may relay the ack
            await asyncio.wait_for(waiter, 3)
        finally:
            await stop(nodes[:2])
    run(main())


def test_minority_stops_granting():
    async def main() -> None:
        nodes = await start(config(3))
        try:
            ls3 = nodes[2].lockspace()
            lost: list = []
            ls3.on_lost = lost.append
            held = await ls3.lock("p", "EX")
            nodes[2].drop = {1, 2}
            for n in nodes[:2]:
                n.drop = {3}
            await asyncio.sleep(TOKEN_MS / 1000 * 3)
            assert not nodes[2].quorate() and lost == [held]
            with pytest.raises(LockError) as e:
                await ls3.lock("q", "NL")
            assert e.value.status == Status.ENOLCK
            got = await asyncio.wait_for(nodes[0].lockspace().lock("p", "EX"), 3)
            assert got.mode == Mode.EX
        finally:
            await stop(nodes)
    run(main())


def test_sync_api_from_threads():
    async def main() -> None:
        nodes = await start(config(2))
        try:
            loop = asyncio.get_running_loop()
            sync = SyncLockspace(nodes[1].lockspace(), loop)
            counter = {"n": 0}

            def work() -> None:
                for _ in range(20):
                    lk = sync.lock("ctr", "EX")
                    v = counter["n"]
                    time.sleep(0.0005)
                    counter["n"] = v + 1
                    sync.unlock(lk)
            threads = [loop.run_in_executor(None, work) for _ in range(4)]
            await asyncio.gather(*threads)
            assert counter["n"] == 80
        finally:
            await stop(nodes)
    run(main())
