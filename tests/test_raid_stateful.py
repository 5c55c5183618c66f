"""Stateful property test: RAID arrays of every level against a bytearray model.

Hypothesis drives random writes and reads, member failures within the
level's redundancy, read errors (repaired by reconstruct-and-rewrite), hot
replacement of live members, removal and re-add of failed members (recovery
onto them; with the write-intent bitmap a member that comes back into its
own slot recovers only the dirty regions), scrubs (which must find no
mismatch), clean stops and crashes (the array is dropped without being
marked clean, then assembled again and resynced from the bitmap), and torn
stripe writes: a crash where only the first k member writes of one array
write landed, optionally followed by the loss of a member before assembly
(the RAID-5/6 write hole, closed by the stripe journal).  Every read must
match the model; inside a torn write each sector must be the old or the
new data.  Background work runs in the test's thread (``start_worker=False``
+ ``run_pending``) so runs are deterministic.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from storaged.block.base import BlockDeviceError
from storaged.raid import RaidError, assemble, create
from storaged.raid.manage import open_member
from storaged.raid.members import FAULTY, IN_SYNC

MEMBER = 4 << 20
CHUNK = 16 * 1024
SHAPES = {0: (3, 0), 1: (2, 1), 4: (4, 1), 5: (4, 1), 6: (5, 2), 10: (4, 1)}
FAST = 10**9  # KiB/s: no throttling in tests
BITMAP_CHUNK = 64 * 1024


class TornDevice:
    """A member wrapper whose writes stop landing once a shared budget is spent (a crash)."""

    def __init__(self, dev, budget: list[int]) -> None:  # noqa: ANN001
        self.dev = dev
        self.budget = budget

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.dev, name)

    def write(self, offset: int, data, fua: bool = False) -> None:  # noqa: ANN001
        if self.budget[0] <= 0:
            return
        self.budget[0] -= 1
        self.dev.write(offset, data, fua)

    def flush(self) -> None:
        if self.budget[0] > 0:
            self.dev.flush()


class FlakyDevice:
    """A member wrapper that fails reads of chosen offsets once (a bad sector)."""

    def __init__(self, dev) -> None:  # noqa: ANN001
        self.dev = dev
        self.bad: set[int] = set()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.dev, name)

    def read(self, offset: int, length: int) -> bytes:
        for b in list(self.bad):
            if offset <= b < offset + length:
                self.bad.discard(b)
                raise BlockDeviceError(errno.EIO, "injected read error")
        return self.dev.read(offset, length)

    def write(self, offset: int, data, fua: bool = False) -> None:  # noqa: ANN001
        self.dev.write(offset, data, fua)


def machine_for(level: int) -> type[RuleBasedStateMachine]:
    n, spares = SHAPES[level]

    class RaidMachine(RuleBasedStateMachine):
        @initialize(layout=st.sampled_from(["left-symmetric", "right-asymmetric",
                                            "left-asymmetric", "right-symmetric"])
                    if level in (5, 6) else st.just(None))
        def setup(self, layout: str | None) -> None:
            self.dir = tempfile.mkdtemp(prefix=f"raid{level}-")
            self.paths = [os.path.join(self.dir, f"m{i}") for i in range(n + spares)]
            self.arr = create("t", self.paths, level, chunk=CHUNK, layout=layout,
                              spares=spares, size=MEMBER, start_worker=False,
                              bitmap_chunk=BITMAP_CHUNK if level else None)
            self._fast()
            self.model = bytearray(self.arr.size)
            self.rnd = random.Random(0)

        def _fast(self) -> None:
            self.arr.speed_limit_min = self.arr.speed_limit_max = FAST

        def teardown(self) -> None:
            if hasattr(self, "arr"):
                try:
                    self.check_all()
                finally:
                    self.arr.abandon()
                    shutil.rmtree(self.dir, ignore_errors=True)

        def check_all(self) -> None:
            assert self.arr.read(0, self.arr.size) == bytes(self.model)

        # ------------------------------------------------------------ I/O
        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            size = self.arr.size // 512
            start = data.draw(st.integers(0, size - 1))
            count = data.draw(st.integers(1, min(size - start, 3 * CHUNK // 512)))
            payload = self.rnd.randbytes(count * 512)
            self.arr.write(start * 512, payload)
            self.model[start * 512:(start + count) * 512] = payload

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            size = self.arr.size // 512
            start = data.draw(st.integers(0, size - 1))
            count = data.draw(st.integers(1, min(size - start, 4 * CHUNK // 512)))
            got = self.arr.read(start * 512, count * 512)
            assert got == bytes(self.model[start * 512:(start + count) * 512])

        # ------------------------------------------------------------ failures
        @precondition(lambda self: level != 0)
        @rule(i=st.integers(0, n + spares - 1))
        def fail_member(self, i: int) -> None:
            m = [m for m in self.arr.members if m.path == self.paths[i]]
            if not m or m[0].state == FAULTY:
                return
            try:
                self.arr.fail(self.paths[i])
            except RaidError:
                return  # beyond redundancy: refused, as mdadm would
            self.arr.run_pending()

        @precondition(lambda self: level != 0)
        @rule(i=st.integers(0, n + spares - 1), where=st.integers(0, MEMBER // 2))
        def bad_sector(self, i: int, where: int) -> None:
            """A read error while redundant: a scrub meets it, rebuilds and rewrites it."""
            if self.arr.degraded() or self.arr.sync is not None or self.arr._want:
                return
            m = [m for m in self.arr.members if m.path == self.paths[i] and m.state == IN_SYNC]
            if not m:
                return
            if not isinstance(m[0].dev, FlakyDevice):
                m[0].dev = FlakyDevice(m[0].dev)
            m[0].dev.bad.add(m[0].data_offset + where - where % 512)
            before = m[0].corrected
            self.arr.start_sync("check")
            self.arr.run_pending()
            assert not m[0].dev.bad
            assert m[0].corrected == before + 1 and m[0].state == IN_SYNC
            assert self.arr.mismatch_cnt == 0

        @precondition(lambda self: level != 0)
        @rule(i=st.integers(0, n + spares - 1))
        def readd(self, i: int) -> None:
            path = self.paths[i]
            m = [m for m in self.arr.members if m.path == path]
            if m and m[0].state != FAULTY:
                return
            if m:
                self.arr.remove(path)
            dirty = len(self.arr.bitmap.bits)
            self.arr.last_sync = None
            self.arr.add(open_member(path), path)
            self.arr.run_pending()
            last = self.arr.last_sync
            if last is not None and last["action"] == "recover" and last["by_bitmap"]:
                assert last["bytes"] <= dirty * BITMAP_CHUNK   # only the dirty regions

        @precondition(lambda self: level != 0)
        @rule(i=st.integers(0, n + spares - 1), data=st.data())
        def short_absence(self, i: int, data: st.DataObject) -> None:
            """A member drops out, writes go on, it comes back: only dirty regions recover."""
            path = self.paths[i]
            m = [m for m in self.arr.members if m.path == path and m.state == IN_SYNC]
            if not m or self.arr.degraded() or self.arr._want or \
                    any(x.state == "spare" for x in self.arr.members):
                return
            self.arr.fail(path)
            self.write(data)
            self.arr.remove(path)
            dirty = len(self.arr.bitmap.bits)
            self.arr.last_sync = None
            self.arr.add(open_member(path), path)
            self.arr.run_pending()
            last = self.arr.last_sync
            assert last is not None and last["action"] == "recover" and last["by_bitmap"], last
            assert last["bytes"] <= dirty * BITMAP_CHUNK
            assert self.arr.degraded() == 0

        @precondition(lambda self: level != 0)
        @rule(i=st.integers(0, n + spares - 1), data=st.data())
        def hot_replace(self, i: int, data: st.DataObject) -> None:
            """Copy a live member onto a new file while it serves; writes land on both."""
            old = self.paths[i]
            m = [m for m in self.arr.members if m.path == old and m.state == IN_SYNC]
            if not m or self.arr.degraded() or self.arr._want:
                return
            new = f"{old}.r{len(os.listdir(self.dir))}"
            self.arr.replace(old, open_member(new, create_size=MEMBER), new)
            self.write(data)
            self.arr.run_pending()
            assert [x.state for x in self.arr.members if x.path == old] == [FAULTY]
            self.arr.remove(old)
            os.unlink(old)
            self.paths[i] = new

        @precondition(lambda self: level != 0)
        @rule()
        def settle_bitmap(self) -> None:
            """The bitmap daemon clears settled bits (never while degraded)."""
            degraded = self.arr.degraded() or self.arr._want
            cleared = self.arr.settle_bitmap(force=True)
            if degraded:
                assert cleared == 0
            else:
                assert not self.arr.bitmap.bits

        @precondition(lambda self: level != 0)
        @rule(repair=st.booleans())
        def scrub(self, repair: bool) -> None:
            try:
                self.arr.start_sync("repair" if repair else "check")
            except RaidError:
                return  # degraded or busy
            self.arr.run_pending()
            assert self.arr.mismatch_cnt == 0

        # ------------------------------------------------------------ restarts
        @rule()
        def clean_restart(self) -> None:
            self.arr.close()
            self.arr = assemble(self.paths, start_worker=False)
            self._fast()
            assert self.arr.clean
            self.arr.run_pending()

        @rule()
        def crash(self) -> None:
            self.arr.abandon()
            self.arr = assemble(self.paths, force=True, start_worker=False)
            self._fast()
            self.arr.run_pending()
            self.check_all()
            if level != 0 and not self.arr.degraded():
                self.arr.start_sync("check")
                self.arr.run_pending()
                assert self.arr.mismatch_cnt == 0

        @rule(data=st.data(), k=st.integers(0, 14), lose=st.booleans())
        def torn_write(self, data: st.DataObject, k: int, lose: bool) -> None:
            """Crash after the first k member writes of one write; maybe lose a member too."""
            size = self.arr.size // 512
            start = data.draw(st.integers(0, size - 1))
            count = data.draw(st.integers(1, min(size - start, 2 * CHUNK // 512)))
            off, length = start * 512, count * 512
            new = self.rnd.randbytes(length)
            budget = [k]
            for m in self.arr.members:
                if m.dev is not None:
                    m.dev = TornDevice(m.dev, budget)
            self.arr.write(off, new)
            keep = list(self.paths)
            red = {0: 0, 1: 1, 4: 1, 5: 1, 6: 2, 10: 1}[level]
            if lose and self.arr.degraded() < red and not self.arr._want:
                live = [m.path for m in self.arr.members if m.state == IN_SYNC]
                keep.remove(live[k % len(live)])
            self.arr.abandon()
            self.arr = assemble(keep, force=level in (1, 10), start_worker=False)
            self._fast()
            got = self.arr.read(off, length)
            for s in range(0, length, 512):
                assert got[s:s + 512] in (bytes(self.model[off + s:off + s + 512]),
                                          new[s:s + 512]), f"sector {off + s} is neither"
            self.model[off:off + length] = got
            self.check_all()                     # every acknowledged block, degraded
            self.arr.run_pending()
            self.check_all()

        @invariant()
        def alive(self) -> None:
            if hasattr(self, "arr"):
                assert not self.arr.failed

    RaidMachine.__name__ = f"Raid{level}Machine"
    return RaidMachine


@pytest.mark.slow
@pytest.mark.parametrize("level", sorted(SHAPES))
def test_raid_stateful(level: int) -> None:
    machine = machine_for(level)
    machine.TestCase.settings = settings(max_examples=30, stateful_step_count=25,
                                         deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
