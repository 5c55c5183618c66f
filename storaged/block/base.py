"""The BlockDevice protocol every block store implements (files, RAID, remote).

Offsets and lengths are in bytes; callers (the SCSI layer) keep them aligned
to ``block_size``.  Methods are synchronous: a page-cache read or write is
cheaper inline than a thread hop, and callers that need to keep an event loop
responsive during slow work (flush, O_DIRECT) run them in an executor.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class BlockDeviceError(OSError):
    """An I/O error from the backing store (maps to MEDIUM ERROR upstream)."""


@runtime_checkable
class BlockDevice(Protocol):
    """What every block store offers: fixed size, block-addressed byte I/O."""

    block_size: int
    read_only: bool

    @property
    def size(self) -> int:
        """Capacity in bytes (a multiple of ``block_size``)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``; holes read as zeros."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; return the number of bytes read."""
        ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on return.

        ``data`` may be a view of a transport's receive buffer that is
        reused once this returns: keep a copy, never the view."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros afterwards."""
        ...

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Split a range into (offset, length, mapped) extents (for GET LBA STATUS)."""
        ...

    def close(self) -> None:
        """Release the backing store."""
        ...
