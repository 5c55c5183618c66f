"""Asynchronous file I/O with completions on an eventfd (for O_DIRECT LUNs).

``Aio`` is the compiled ``_fastio._aio.Aio`` (Linux native AIO: io_submit /
io_getevents, the eventfd signalled by the kernel) when it is built and not
disabled by ``STORAGED_NO_EXTENSIONS``; otherwise :class:`ThreadAio`, the
pure-Python reference with the same API and results, whose worker threads do
the ``preadv``/``pwritev`` and signal the eventfd.  The compiled one needs no
thread and no GIL hand-over per I/O, which is what made a thread pool cost
more CPU per 4 KiB command than the disk wait it overlapped.

API (both):

* ``submit([(op, fd, offset, buffer, tag), ...])``: ``op`` is :data:`READ`
  (into a writable buffer) or :data:`WRITE`; never raises for I/O errors;
* ``reap() -> [(tag, result), ...]``: finished operations, ``result`` the
  bytes transferred or ``-errno``;
* ``fileno()``: an eventfd that is readable while there is something to reap;
* ``pending``: operations not reaped yet; ``close()`` waits for them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storaged.fastio import extensions_disabled

READ = 0
WRITE = 1

Op = tuple[int, int, int, Any, Any]


class ThreadAio:
    """The reference: ``workers`` threads run the operations."""

    def __init__(self, depth: int = 256, workers: int = 16) -> None:
        if depth < 1:
            raise ValueError(f"depth out of range: {depth!r}")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="aio")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._done: list[tuple[Any, int]] = []
        self._pending = 0

    def fileno(self) -> int:
        return self._efd

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, ops: Iterable[Op]) -> None:
        for op in ops:
            if op[0] == READ and memoryview(op[3]).readonly:
                raise BufferError("Object is not writable.")
            self._pending += 1
            self._pool.submit(self._run, *op)

    def _run(self, op: int, fd: int, offset: int, buf: Any, tag: Any) -> None:
        try:
            with memoryview(buf) as view:
                if op == READ:
                    res = os.preadv(fd, [view], offset)
                else:
                    res = os.pwritev(fd, [view], offset)
        except OSError as e:
            res = -(e.errno or 5)
        with self._lock:
            self._done.append((tag, res))
        os.eventfd_write(self._efd, 1)

    def reap(self) -> list[tuple[Any, int]]:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            out, self._done = self._done, []
        self._pending -= len(out)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


Aio: type = ThreadAio
IMPLEMENTATION = "pure"
if not extensions_disabled():
    try:
        from _fastio._aio import Aio  # type: ignore[no-redef]  # noqa: F401

        IMPLEMENTATION = "compiled"
    except ImportError:
        pass
