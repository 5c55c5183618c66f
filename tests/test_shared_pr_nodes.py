"""The cluster PR backend on in-process cluster nodes (real ZeroMQ, one event loop).

Three nodes each serve one LU over the same image file through
storaged.scsi.pr_cluster: a change through any node is applied by every
member before it returns, the LVB carries the change counter, a node that
was cut off catches up, and a node without quorum refuses PERSISTENT
RESERVE OUT with NOT READY 04h/0Ch instead of changing anything.
"""

from __future__ import annotations

import asyncio
import struct

from storaged.block.file import FileBlockDevice
from storaged.dlm.modes import Flag, Mode
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.pr_cluster import SharedPr, lock_name, unpack_lvb
from storaged.scsi.types import ScsiCommand, Status
from tests.test_cluster_nodes import config, start, stop
from tests.test_pr_backend import TP_A, nexus
from tests.test_scsi_pr import RESERVE, RIEK, WERO, WWN, clear_ua, prin, prout, read_keys
from tests.test_scsi_pr import run as execute

PR_OUT_CDB = struct.pack(">BBBxxIB", 0x5F, RIEK, 0, 24, 0)
TP = {1: TP_A, 2: "iqn.2024-01.test:tgt,t,0x0002", 3: "iqn.2024-01.test:tgt,t,0x0003"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def serve(tmp_path, n: int = 3):
    path = tmp_path / "shared.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    cfg = config(n)
    cfg.lockspaces = ["default"]
    nodes = await start(cfg)
    lus, services = {}, {}
    for node in nodes:
        lu = LogicalUnit(FileBlockDevice(str(path), block_size=512), name="lu0", serial="s",
                         wwn=WWN)
        services[node.node_id] = SharedPr(node, ack_timeout=5.0, query_timeout=2.0)
        services[node.node_id].attach(lu)
        lus[node.node_id] = lu
    for s in services.values():
        await s.sync_new()          # as the daemon does before it opens its portals
    return nodes, lus, services


async def close(nodes, lus, services) -> None:
    for s in services.values():
        s.close()
    await stop(nodes)
    for lu in lus.values():
        lu.device.close()


async def call(fn, *args, **kw):
    """PERSISTENT RESERVE OUT blocks on the cluster: run it off the loop, as the server does."""
    return await asyncio.to_thread(fn, *args, **kw)


def test_a_change_through_any_node_holds_on_every_node(tmp_path):
    async def main() -> None:
        nodes, lus, services = await serve(tmp_path)
        try:
            hosts = {i: nexus(i, TP[i]) for i in (1, 2, 3)}
            for i, n in hosts.items():
                clear_ua(lus[i], n)
                assert lus[i].may_block(ScsiCommand(cdb=PR_OUT_CDB, lun=0, nexus=n))
                r = await call(prout, lus[i], n, RIEK, sark=0x10 + i)
                assert r.status == Status.GOOD, r
            r = await call(prout, lus[2], hosts[2], RESERVE, key=0x12, ptype=WERO)
            assert r.status == Status.GOOD
            want = (3, [0x11, 0x12, 0x13])
            for lu in lus.values():
                assert (lu.pr.generation, sorted(k for k in read_keys(lu)[1])) == want
                assert lu.pr.seq == 4 and lu.pr.holder is not None
                assert lu.pr.holder.key == 0x12
            # The LVB carries (seq, generation) for whoever locks next.
            lk = await nodes[0].lockspace().lock(lock_name(WWN), Mode.PR, flags=Flag.VALBLK)
            assert lk.lvb_valid and unpack_lvb(lk.lvb) == (4, 3)
            await nodes[0].lockspace().unlock(lk)
            # Host 1 on node 1 may write (WE-RO registrant); a host on node 3 that is not
            # registered may not, and node 3 knows without being asked.
            other = nexus(7, TP[3])
            clear_ua(lus[3], other)
            write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
            assert execute(lus[3], other, write, bytes(512)).status == \
                Status.RESERVATION_CONFLICT
            assert execute(lus[1], hosts[1], write, bytes(512)).status == Status.GOOD
        finally:
            await close(nodes, lus, services)
    run(main())


def test_a_node_cut_off_refuses_and_catches_up_after(tmp_path):
    async def main() -> None:
        nodes, lus, services = await serve(tmp_path)
        for node in nodes:
            node.test_hooks = True
        try:
            h1, h3 = nexus(1, TP[1]), nexus(3, TP[3])
            clear_ua(lus[1], h1)
            clear_ua(lus[3], h3)
            assert (await call(prout, lus[1], h1, RIEK, sark=0x21)).status == Status.GOOD
            # Node 3 is partitioned from nodes 1 and 2: it loses quorum, they keep it.
            nodes[2].drop = {1, 2}
            nodes[0].drop = {3}
            nodes[1].drop = {3}
            for _ in range(200):
                if not nodes[2].quorate() and nodes[0].ready() and \
                        len(nodes[0].view.nodes) == 2:
                    break
                await asyncio.sleep(0.05)
            assert not nodes[2].quorate()
            r = await call(prout, lus[3], h3, RIEK, sark=0x23)
            assert r.status == Status.CHECK_CONDITION
            assert (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (0x2, 0x04, 0x0C)
            assert lus[3].pr.seq == 1                                   # nothing changed
            r = await call(prin, lus[3], h3, 0)                         # READ KEYS
            assert (r.status, r.sense[12], r.sense[13]) == (Status.CHECK_CONDITION, 4, 0x0C)
            # The majority goes on without it.
            assert (await call(prout, lus[1], h1, RESERVE, key=0x21, ptype=WERO)).status \
                == Status.GOOD
            assert lus[2].pr.seq == 2 and lus[3].pr.seq == 1
            # Healed: node 3 rejoins and catches up before long (view change catch-up).
            for node in nodes:
                node.drop = set()
            for _ in range(400):
                if lus[3].pr.seq == 2:
                    break
                await asyncio.sleep(0.05)
            assert lus[3].pr.to_dict() == lus[1].pr.to_dict()
            assert lus[3].pr.type == WERO
            for _ in range(100):
                if (await call(prin, lus[3], h3, 0)).status == Status.GOOD:
                    break
                await asyncio.sleep(0.05)
            assert read_keys(lus[3]) == read_keys(lus[1]) == (1, [0x21])
        finally:
            await close(nodes, lus, services)
    run(main())


def test_the_lock_holder_dying_mid_change_leaves_no_split(tmp_path):
    """Node 1 holds the LU's lock and has sent its update to node 2 only when it
    dies: the lock comes back with an invalid LVB, and the next change (through
    node 3) first takes the newest state there is."""
    async def main() -> None:
        nodes, lus, services = await serve(tmp_path)
        try:
            h1, h3 = nexus(1, TP[1]), nexus(3, TP[3])
            clear_ua(lus[1], h1)
            clear_ua(lus[3], h3)
            lk = await services[1]._lock(WWN.lower())
            sent = []

            class HalfBroadcast:
                blocking = False

                def run(self, pr, change):  # noqa: ANN001
                    result, update = change()
                    sent.append(update)
                    return result

                def stale(self, pr):  # noqa: ANN001
                    return None

            backend = lus[1].pr.backend
            lus[1].pr.backend = HalfBroadcast()
            assert prout(lus[1], h1, RIEK, sark=0x31).status == Status.GOOD
            lus[1].pr.backend = backend
            assert lus[2].pr.apply_update(sent[0])          # node 2 got it, node 3 did not
            assert lus[3].pr.seq == 0 and lk.mode == Mode.EX
            services[1].close()
            await nodes[0].stop()                           # dies holding the lock
            r = await call(prout, lus[3], h3, RIEK, sark=0x33)
            assert r.status == Status.GOOD, r
            assert lus[3].pr.seq == lus[2].pr.seq == 2
            assert lus[3].pr.to_dict() == lus[2].pr.to_dict()
            assert sorted(reg.key for reg in lus[3].pr.regs.values()) == [0x31, 0x33]
        finally:
            await close(nodes[1:], lus, {k: v for k, v in services.items() if k != 1})
            await nodes[0].stop()
    run(main())
