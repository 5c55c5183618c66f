"""A cluster node process running a randomized DLM workload (for the safety tests).

Usage: python tests/cluster_worker.py CONFIG.json NODE_ID RUNDIR SEED SECONDS

Runs a real :class:`ClusterNode` (its local endpoint at RUNDIR/node-N.sock
with test hooks, so the test can cut the network) plus W tasks that lock,
convert, cancel and unlock a few names in random modes.  Every grant and
release is appended to RUNDIR/log-N.jsonl with a CLOCK_MONOTONIC stamp (the
clock is shared by all processes of the host):

* ``acq``: logged after the grant arrived (so later than the real grant);
* ``chg``: a mode change: logged at request time for a down-conversion and
  at grant time for an up-conversion;
* ``rel``: logged before the unlock is sent (earlier than the real release),
  or when the node reports the lock lost.

Logged intervals are therefore inside the real ones, and the checker can
compare them across processes.  Also logged: views (with quorum).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storaged.cluster.config import ClusterConfig  # noqa: E402
from storaged.cluster.node import ClusterNode  # noqa: E402
from storaged.dlm.api import LockError  # noqa: E402
from storaged.dlm.modes import Flag, Mode, Status  # noqa: E402

NAMES = [b"alpha", b"beta", b"gamma"]
MODES = [Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX]
TASKS = 4


class Worker:
    def __init__(self, node: ClusterNode, rundir: str, seed: int) -> None:
        self.node = node
        self.ls = node.lockspace()
        self.rng = random.Random(seed)
        self.log = open(os.path.join(rundir, f"log-{node.node_id}.jsonl"), "a",  # noqa: SIM115
                        buffering=1)
        self.held: dict[int, tuple[str, int]] = {}  # lkid -> (key, mode)
        self.seq = 0
        self.ls.on_lost = self._lost
        self.grants = 0

    def emit(self, **ev: object) -> None:
        ev["t"] = time.monotonic_ns()
        ev["node"] = self.node.node_id
        self.log.write(json.dumps(ev) + "\n")

    def _lost(self, lk) -> None:  # noqa: ANN001
        if lk.lkid in self.held:
            key, _ = self.held.pop(lk.lkid)
            self.emit(ev="rel", key=key, name=lk.name.decode(), why="lost")

    def live(self, lk) -> bool:  # noqa: ANN001
        return self.ls.core.locks.get(lk.lkid) is lk and lk.grmode != Mode.IV

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self.task(i, deadline) for i in range(TASKS)))

    async def task(self, i: int, deadline: float) -> None:
        rng = self.rng
        while time.monotonic() < deadline:
            name = rng.choice(NAMES)
            mode = rng.choice(MODES)
            flags = Flag.NOQUEUE if rng.random() < 0.2 else 0
            self.seq += 1
            key = f"{self.node.node_id}:{i}:{self.seq}"
            try:
                lk, fut = self.ls.request(name, mode, flags=flags)
                if rng.random() < 0.1:
                    await asyncio.sleep(rng.random() * 0.01)
                    if not fut.done():
                        self.ls.cancel(lk)
                status = await fut
            except LockError:
                status = None
            if status != Status.OK:
                await asyncio.sleep(0.005)
                continue
            if not self.live(lk):
                continue
            self.grants += 1
            self.held[lk.lkid] = (key, lk.grmode)
            self.emit(ev="acq", key=key, name=name.decode(), mode=lk.grmode,
                      master=self.ls.core.masters.get(name))
            await asyncio.sleep(rng.random() * 0.01)
            if rng.random() < 0.4 and self.live(lk):
                await self.convert(lk, key)
            if lk.lkid in self.held and self.live(lk):
                del self.held[lk.lkid]
                self.emit(ev="rel", key=key, name=name.decode())
                try:
                    await self.ls.unlock(lk)
                except LockError:
                    pass

    async def convert(self, lk, key: str) -> None:  # noqa: ANN001
        rng = self.rng
        new = rng.choice(MODES)
        flags = 0
        r = rng.random()
        if r < 0.2:
            flags |= Flag.NOQUEUE
        elif r < 0.3:
            flags |= Flag.CONVDEADLK
        elif r < 0.4 and (lk.grmode, int(new)) in {(0, 1), (1, 3), (3, 5), (0, 5), (1, 5)}:
            flags |= Flag.QUECVT
        down = new < lk.grmode and not (lk.grmode == Mode.PR and new == Mode.CW)
        sideways = {int(lk.grmode), int(new)} == {Mode.CW, Mode.PR}
        if down or sideways or flags & Flag.CONVDEADLK:
            # From now on this holder only relies on what both modes allow: the master may
            # switch modes (or demote to NL) before the completion reaches us.
            logged = Mode.NL if flags & Flag.CONVDEADLK else Mode.CR if sideways else new
            self.held[lk.lkid] = (key, logged)
            self.emit(ev="chg", key=key, name=lk.name.decode(), mode=int(logged))
        try:
            await self.ls.convert(lk, new, flags=flags, timeout=0.5)
        except (LockError, TimeoutError):
            pass
        if lk.lkid in self.held and self.live(lk):
            self.held[lk.lkid] = (key, lk.grmode)
            self.emit(ev="chg", key=key, name=lk.name.decode(), mode=lk.grmode)
        await asyncio.sleep(rng.random() * 0.005)


async def main() -> None:
    cfg_path, node_id, rundir, seed, seconds = sys.argv[1:6]
    with open(cfg_path) as f:
        cfg = ClusterConfig.from_dict(json.load(f))
    nid = int(node_id)
    with open(os.path.join(rundir, f"pid-{nid}"), "w") as f:
        f.write(str(os.getpid()))
    node = ClusterNode(cfg, nid, control_path=os.path.join(rundir, f"node-{nid}.sock"),
                       test_hooks=True)
    await node.start()
    w = Worker(node, rundir, int(seed))
    orig = node._on_view

    def on_view(view) -> None:  # noqa: ANN001
        orig(view)
        w.emit(ev="view", id=list(view.id), members=list(view.nodes), quorate=view.quorate)
    node._on_view = on_view  # type: ignore[method-assign]
    await node.wait_ready(len(cfg.nodes), timeout=20)
    w.emit(ev="ready")
    # Start together: the test writes RUNDIR/go once every node is ready.
    while not os.path.exists(os.path.join(rundir, "go")):
        await asyncio.sleep(0.01)
    await w.run(float(seconds))
    w.emit(ev="done", grants=w.grants)
    await node.stop()


if __name__ == "__main__":
    asyncio.run(main())
