"""Asynchronous disk I/O for O_DIRECT LUNs, for the iSCSI shell.

Page-cache READs and WRITEs run inline on the event loop: they cost a memory
copy.  On an O_DIRECT LU every transfer waits for the disk, so running them
inline keeps one request at the disk and stalls the loop (no other command
is read, no status goes out) while it lasts.  Here the disk accesses of
concurrent READ(10/16) and WRITE(10/16) commands are submitted as
asynchronous I/O (storaged.block.aio: Linux native AIO, completions on an
eventfd the loop watches), and the loop goes on reading commands and
sending statuses meanwhile.  The SCSI layer still
runs every command on the loop thread, with all its checks (reservations,
ALUA, ranges): a READ once its data has been read
(``FileBlockDevice.use_prefetched``), a WRITE before its data is written (the
device queues it: ``defer_writes``/``take_deferred``); the WRITE's status goes
out only once its data is in the file, so nothing is acknowledged early.

While disk accesses of an LU are in flight, every other command for it
(COMPARE AND WRITE, PERSISTENT RESERVE OUT, SYNCHRONIZE CACHE, UNMAP, ...)
waits until they are done, and so does everything that arrives for the LU
after it (no starvation, FIFO): such commands see a quiet medium, as with
inline I/O.  That keeps COMPARE AND WRITE atomic against the queued writes
(SBC-3 §5.2) and makes PREEMPT AND ABORT complete after the writes the
preempted nexus had sent (SPC-4 §5.14.11.2.4).  A single command on an idle
LU still runs inline: at queue depth 1 the round trip through the eventfd
only adds latency.

Plain READ/WRITE(10/16) commands that the iSCSI core hands to the daemon's
quick path (``IscsiServer.quick_command``, checked by
``storaged.scsi.sbc.quick_check``) use the same context and the same busy
counts, and their status goes out when their disk access completes.
Operations of either kind are queued as they come and go to the context
together once the loop gets to its callbacks, i.e. after the pass over the
received bytes (one wake-up of its submitter thread for all of them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from storaged.block import aio

log = logging.getLogger("storaged.iscsi")

IoOp = tuple[int, int, int, Any]
"""(storaged.block.aio.READ or WRITE, fd, offset, buffer)"""


class _Batch:
    __slots__ = ("dev", "results", "left", "done")

    def __init__(self, dev: object, n: int, done: Callable[[list[int]], None]) -> None:
        self.dev = dev
        self.results = [0] * n
        self.left = n
        self.done = done


class _One:
    """The tag of a lone operation (the quick path's case): no batch to count."""

    __slots__ = ("dev", "finish")

    def __init__(self, dev: object, finish: Callable[[int], None]) -> None:
        self.dev = dev
        self.finish = finish


class DirectIO:
    """Per-server bookkeeping: the AIO context, the devices with disk
    accesses in flight and the commands waiting for those to finish."""

    DEPTH = 256
    """AIO slots; more operations wait in the context for a free one."""

    def __init__(self) -> None:
        self._aio: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.busy: dict[object, int] = {}
        """device -> batches of disk accesses in flight."""
        self.waiting: dict[object, deque[Callable[[], None]]] = {}
        """device -> commands held back until ``busy`` drops to zero."""
        self._reaping = False
        self._after: list[Callable[[], None]] = []
        self._queued: list[tuple] = []

    def after_completions(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the completions being delivered now are all
        delivered (one send for a burst of statuses, without waiting for the
        next loop iteration); outside a delivery, on the next iteration."""
        if self._reaping:
            self._after.append(fn)
        else:
            asyncio.get_running_loop().call_soon(fn)

    def _context(self) -> Any:
        if self._aio is None:
            self._aio = aio.Aio(self.DEPTH)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._aio.fileno(), self._reap)
        return self._aio

    def shutdown(self) -> None:
        """Wait for the disk accesses in flight and free the context."""
        self._submit_queued()
        if self._aio is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._aio.fileno())
            self._aio.close()
            self._aio = None

    def hold(self, dev: object, resume: Callable[[], None]) -> None:
        """Run ``resume`` once ``dev`` has nothing in flight (after the
        commands held before it)."""
        self.waiting.setdefault(dev, deque()).append(resume)

    def submit(self, dev: object, ops: list[IoOp],
               done: Callable[[list[int]], None]) -> None:
        """Start ``ops``; once all are finished, ``done(results)`` runs on
        the loop (a result is the bytes transferred or ``-errno``).  ``dev``
        counts as busy until ``done`` returns."""
        self.busy[dev] = self.busy.get(dev, 0) + 1
        batch = _Batch(dev, len(ops), done)
        if not ops:
            asyncio.get_running_loop().call_soon(self._finish, batch)
            return
        self._queue([(op, fd, off, buf, (batch, i)) for i, (op, fd, off, buf) in enumerate(ops)])

    def read(self, dev: Any, offset: int, length: int,
             done: Callable[[bytes | None], None]) -> None:
        """Read ``length`` bytes at ``offset`` of O_DIRECT ``dev``; ``done``
        gets the data, or None if the read failed."""
        op = dev.aio_read(offset, length)
        self._submit_one(dev, op, lambda res: done(dev.aio_read_result(op, res)))

    def _submit_one(self, dev: object, op: IoOp, finish: Callable[[int], None]) -> None:
        """``submit`` of one operation: ``finish(result)`` runs on the loop."""
        self.busy[dev] = self.busy.get(dev, 0) + 1
        self._queue([(*op, _One(dev, finish))])

    def _queue(self, entries: list[tuple]) -> None:
        """Hand ``entries`` to the context together with the others queued before
        the loop gets to its callbacks (the commands of one received burst):
        waking the submitter thread costs about as much as the rest of a
        command's Python work, once per submission."""
        queued = self._queued
        if not queued:
            self._context()
            self._loop.call_soon(self._submit_queued)  # type: ignore[union-attr]
        queued.extend(entries)

    def _submit_queued(self) -> None:
        queued, self._queued = self._queued, []
        if queued:
            self._context().submit(queued)

    def write(self, dev: Any, offset: int, data: bytes | memoryview,
              done: Callable[[bool], None]) -> None:
        """Write a copy of ``data`` (it may be a view of a receive buffer) at
        ``offset`` of O_DIRECT ``dev``; ``done(True)`` once it is in the
        file, ``done(False)`` if it failed, also when retried.  Raises
        BlockDeviceError, with nothing submitted, if it cannot be queued."""
        op = dev.aio_write(offset, data)

        def written(res: int) -> None:
            error = dev.aio_write_done(op, res)
            if error is not None:
                log.error("O_DIRECT write failed: %s", error)
            done(error is None)

        self._submit_one(dev, op, written)

    def _reap(self) -> None:
        self._reaping = True
        try:
            self._deliver(self._aio.reap())
        finally:
            self._reaping = False
            after, self._after = self._after, []
            for fn in after:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one connection must not stop the others
                    log.exception("sending after O_DIRECT completions failed")

    def _deliver(self, done: list[tuple[Any, int]]) -> None:
        for tag, res in done:
            if type(tag) is _One:
                try:
                    tag.finish(res)
                except Exception:  # noqa: BLE001 - the device must not stay busy
                    log.exception("completing O_DIRECT I/O failed")
                finally:
                    self._release(tag.dev)
                continue
            batch, i = tag
            batch.results[i] = res
            batch.left -= 1
            if not batch.left:
                self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        try:
            batch.done(batch.results)
        except Exception:  # noqa: BLE001 - the device must not stay busy
            log.exception("completing O_DIRECT I/O failed")
        finally:
            self._release(batch.dev)

    def _release(self, dev: object) -> None:
        n = self.busy[dev] - 1
        if n:
            self.busy[dev] = n
            return
        del self.busy[dev]
        queue = self.waiting.get(dev)
        # Held commands run in arrival order; none of them makes the device
        # busy again (they run inline or in the executor, never through here).
        while queue and dev not in self.busy:
            resume = queue.popleft()
            try:
                resume()
            except Exception:  # noqa: BLE001 - one command must not strand the rest
                log.exception("held command failed")
        if queue is not None and not queue:
            self.waiting.pop(dev, None)
