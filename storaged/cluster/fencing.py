"""Fencers: cut a failed node off before anyone recovers its resources.

A quorate view's coordinator calls ``await fencer.fence(node, incarnation)``
for every node that left uncleanly and recovery waits until it returns True
(a False answer is retried).  Shipped fencers:

* :class:`ManualFencer`: waits for an operator to run
  ``storaged cluster fence-ack NODE`` after making sure the node is down
  (like ``fence_ack_manual``);
* :class:`TestFencer`: confirms after a fixed delay and records the calls;
* :class:`CommandFencer`: runs a fence-agent-like command with the node id
  as its last argument; exit status 0 means fenced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod

log = logging.getLogger("storaged.cluster.fencing")


class Fencer(ABC):
    """Pluggable fencing interface."""

    name = "fencer"

    @abstractmethod
    async def fence(self, node: int, incarnation: int) -> bool:
        """Fence ``node``; True once it is confirmed cut off from shared storage."""

    def acknowledge(self, node: int) -> None:
        """An operator confirmed ``node`` is fenced (only the manual fencer cares)."""
        _ = node


class TestFencer(Fencer):
    """Confirms every request after ``delay`` seconds; ``calls`` records (node, inc, time)."""

    name = "test"
    __test__ = False  # not a pytest class

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[int, int, float]] = []

    async def fence(self, node: int, incarnation: int) -> bool:
        self.calls.append((node, incarnation, time.time()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return True


class ManualFencer(Fencer):
    """Waits until ``acknowledge(node)`` (``storaged cluster fence-ack NODE``)."""

    name = "manual"

    def __init__(self) -> None:
        self._acked: set[int] = set()
        self._waiters: dict[int, asyncio.Event] = {}

    async def fence(self, node: int, incarnation: int) -> bool:
        if node in self._acked:
            self._acked.discard(node)
            return True
        log.warning("node %d must be fenced: make sure it is powered off or cut off from "
                    "shared storage, then run: storaged cluster fence-ack %d", node, node)
        event = self._waiters.setdefault(node, asyncio.Event())
        await event.wait()
        self._waiters.pop(node, None)
        self._acked.discard(node)
        return True

    def acknowledge(self, node: int) -> None:
        event = self._waiters.get(node)
        if event is not None:
            event.set()
        else:
            self._acked.add(node)


class CommandFencer(Fencer):
    """Runs ``argv + [str(node)]``; exit status 0 means the node is fenced."""

    name = "command"

    def __init__(self, argv: list[str], timeout: float = 60.0) -> None:
        if not argv:
            raise ValueError("CommandFencer needs a command")
        self.argv = list(argv)
        self.timeout = timeout

    async def fence(self, node: int, incarnation: int) -> bool:
        proc = await asyncio.create_subprocess_exec(*self.argv, str(node))
        try:
            rc = await asyncio.wait_for(proc.wait(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("fence command for node %d timed out", node)
            return False
        if rc != 0:
            log.error("fence command for node %d exited with %d", node, rc)
        return rc == 0


def make_fencer(kind: str, command: list[str] | None = None, delay: float = 0.0) -> Fencer:
    """The fencer named by the cluster config."""
    if kind == "manual":
        return ManualFencer()
    if kind == "test":
        return TestFencer(delay)
    if kind == "command":
        return CommandFencer(command or [])
    raise ValueError(f"unknown fencer {kind!r}")
