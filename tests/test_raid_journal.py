"""RAID-4/5/6 write hole: a torn stripe update followed by a member loss.

A fault-injecting member wrapper lets only the first ``k`` member writes of
one array write land (the daemon "dies" there), the array is dropped
without cleanup, and it is assembled again with one member (two for
RAID-6) missing: the dirty-degraded case where parity is needed before any
resync could fix it.  Every block written before the torn write must read
back exactly; inside the torn write every sector must be old or new.
Without the journal the same sweep must find corruption, which shows the
test can fail.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

from storaged.raid import assemble, create
from storaged.raid import journal as jrnl

FAST = 10**9
CHUNK = 16 * 1024


class Budget:
    """How many more member writes may land before the simulated crash."""

    def __init__(self) -> None:
        self.left: int | None = None
        self.dropped = 0


class TornDevice:
    """Passes writes through until the shared budget runs out, then drops them."""

    def __init__(self, dev, budget: Budget) -> None:  # noqa: ANN001
        self.dev = dev
        self.budget = budget

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.dev, name)

    def write(self, offset: int, data, fua: bool = False) -> None:  # noqa: ANN001
        b = self.budget
        if b.left is not None:
            if b.left <= 0:
                b.dropped += 1
                return
            b.left -= 1
        self.dev.write(offset, data, fua)

    def flush(self) -> None:
        if self.budget.left is None or self.budget.left > 0:
            self.dev.flush()


def torn_case(tmp, level: int, n: int, journal, k: int, lost: tuple[int, ...],  # noqa: ANN001
              off: int, length: int, prefill: int = 0) -> tuple[bool, bool]:
    """Run one torn write; (acknowledged data intact, torn region sectors old-or-new)."""
    paths = [os.path.join(tmp, f"d{i}") for i in range(n)]
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
    arr = create("wh", paths, level, chunk=CHUNK, size=(1 << 20) + 4 * CHUNK, start_worker=False,
                 journal=journal, bitmap_chunk=64 * 1024)
    rnd = random.Random(k * 131 + sum(lost))
    old = bytearray(rnd.randbytes(arr.size))
    arr.write(0, bytes(old))
    for _ in range(prefill):          # fill the ring with records of odd sizes first
        n = rnd.choice([512, 1536, 4096, 5120, 3 * CHUNK])
        o = rnd.randrange((arr.size - n) // 512) * 512
        blob = rnd.randbytes(n)
        arr.write(o, blob)
        old[o:o + n] = blob
    old = bytes(old)
    budget = Budget()
    for m in arr.members:
        m.dev = TornDevice(m.dev, budget)
    new = rnd.randbytes(length)
    budget.left = k
    arr.write(off, new)
    arr.abandon()
    keep = [p for i, p in enumerate(paths) if i not in lost]
    arr = assemble(keep, start_worker=False, force=not journal)
    arr.speed_limit_min = arr.speed_limit_max = FAST
    got = arr.read(0, arr.size)
    intact = got[:off] == old[:off] and got[off + length:] == old[off + length:]
    mixed = all(got[s:s + 512] in (old[s:s + 512], new[s - off:s - off + 512])
                for s in range(off, off + length, 512))
    arr.run_pending()
    arr.abandon()
    return intact, mixed


@pytest.mark.parametrize("level,n,journal", [(5, 4, "async"), (5, 3, "sync"), (4, 4, "async"),
                                             (6, 5, "async"), (6, 4, "sync")])
def test_torn_stripe_then_member_loss(tmp_path, level: int, n: int, journal: str) -> None:
    losses = [(i,) for i in range(n)]
    if level == 6:
        losses += list(itertools.combinations(range(n), 2))
    # A 6 KiB write inside one chunk, and one that spans two data chunks of a stripe.
    shapes = [(CHUNK + 1024, 6144), (CHUNK - 2048, 4096)]
    checked = 0
    for off, length in shapes:
        for k in range(0, 12):
            # every loss pattern comes up, spread over the crash points
            for lost in (losses[k % len(losses)], losses[(k * 7 + 3) % len(losses)]):
                intact, mixed = torn_case(str(tmp_path), level, n, journal, k, lost, off,
                                          length)
                assert intact, f"acknowledged data lost: k={k} lost={lost} off={off}"
                assert mixed, f"torn region not old-or-new: k={k} lost={lost} off={off}"
                checked += 1
    assert checked == 48


def test_without_journal_the_hole_is_real(tmp_path) -> None:
    """The same sweep without the journal corrupts acknowledged data (md without PPL)."""
    bad = 0
    for k in range(0, 8):
        for lost in [(i,) for i in range(4)]:
            intact, _ = torn_case(str(tmp_path), 5, 4, False, k, lost, CHUNK + 1024, 6144)
            bad += not intact
    assert bad > 0


def test_replay_counts_and_ring_wrap(tmp_path) -> None:
    """Many updates wrap the ring; a crash right after still replays only the newest."""
    paths = [str(tmp_path / f"d{i}") for i in range(4)]
    arr = create("wh", paths, 5, chunk=CHUNK, size=4 << 20, start_worker=False)
    start, end = arr.journal
    data = bytearray(arr.size)
    rnd = random.Random(5)
    for _ in range(400):              # several rings of records of every size
        n = rnd.choice([512, 4096, 5120, 3 * CHUNK])
        off = rnd.randrange((arr.size - n) // 512) * 512
        blob = rnd.randbytes(n)
        arr.write(off, blob)
        data[off:off + n] = blob
    assert arr._jseq > (end - start) // (2 * jrnl.HEADER)
    arr.abandon()
    arr = assemble(paths[1:], start_worker=False)     # and a member is gone
    assert 0 < arr.journal_replayed <= (end - start) // jrnl.HEADER
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()
    # Torn writes behind a ring full of odd-sized records still replay.
    for k in range(10):
        intact, mixed = torn_case(str(tmp_path), 5, 4, True, k, (k % 4,), CHUNK + 1024,
                                  6144, prefill=60)
        assert intact and mixed, f"k={k}"


def test_record_codec_rejects_damage() -> None:
    uuid = bytes(16)
    rec = jrnl.Record(9, 3, 7, 512, 2, (0, 2, 3), b"x" * 1024)
    raw = bytearray(rec.encode(uuid))
    (off, back), = jrnl.parse_ring(bytes(raw) + bytes(4096), uuid)
    assert off == 0 and back == rec
    raw[5000] ^= 1
    assert jrnl.parse_ring(bytes(raw), uuid) == []
    assert jrnl.parse_ring(rec.encode(bytes([1] * 16)), uuid) == []
