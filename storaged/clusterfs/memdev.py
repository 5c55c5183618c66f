"""An in-memory BlockDevice with crash simulation (for tests and tools' dry runs).

Writes land in ``data`` at once (every user of the device sees them, like a
shared LUN) and are also kept as "not yet durable" until the next flush.
:meth:`crash_image` returns what a power cut would leave: the durable state
plus a random prefix of the writes since the last flush (a torn tail).
``fail_after`` makes the N-th following write or flush raise, and every
later one too: a node stopped at that point.
"""

from __future__ import annotations

import random

from storaged.block.base import BlockDeviceError


class Crashed(BlockDeviceError):
    """The simulated node stopped here."""


class MemoryBlockDevice:
    """Byte-array block device; ``block_size`` 512 like the LUN default."""

    def __init__(self, size: int, block_size: int = 512, read_only: bool = False) -> None:
        self.block_size = block_size
        self.read_only = read_only
        self.data = bytearray(size)
        self.durable = bytearray(size)
        self.pending: list[tuple[int, bytes]] = []
        self.fail_after: int | None = None
        self.writes = 0
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def _tick(self) -> None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise Crashed("device stopped (simulated crash)")
            self.fail_after -= 1

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > len(self.data):
            raise BlockDeviceError(f"read {offset}+{length} beyond {len(self.data)}")
        return bytes(self.data[offset:offset + length])

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = len(buf)
        buf[:] = self.data[offset:offset + n]
        return n

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise BlockDeviceError("read-only device")
        if offset < 0 or offset + len(data) > len(self.data):
            raise BlockDeviceError(f"write {offset}+{len(data)} beyond {len(self.data)}")
        self._tick()
        raw = bytes(data)
        self.data[offset:offset + len(raw)] = raw
        self.pending.append((offset, raw))
        self.writes += 1
        if fua:
            self.flush()

    def flush(self) -> None:
        self._tick()
        for off, raw in self.pending:
            self.durable[off:off + len(raw)] = raw
        self.pending.clear()
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

    def close(self) -> None:
        pass

    def crash_image(self, rng: random.Random | None = None) -> MemoryBlockDevice:
        """A new device holding what survives a power cut now (durable + torn prefix)."""
        rng = rng or random.Random()
        out = MemoryBlockDevice(len(self.data), self.block_size)
        out.data[:] = self.durable
        keep = rng.randint(0, len(self.pending))
        for off, raw in self.pending[:keep]:
            if keep and (off, raw) == self.pending[keep - 1] and rng.random() < 0.5:
                cut = rng.randrange(0, len(raw) + 1, 512) if len(raw) >= 512 else 0
                raw = raw[:cut]  # the last write torn at a sector boundary
            out.data[off:off + len(raw)] = raw
        out.durable[:] = out.data
        return out
