"""Health checks of real servers: is a node's portal accepting connections?

The asyncio shell around :class:`storaged.lb.director.Director`: every
``interval`` seconds each real server's portal gets a TCP connect (closed at
once, like keepalived's ``TCP_CHECK``); a portal that refuses or does not
answer within ``timeout`` is down and the director stops choosing it until a
later check succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from storaged.lb.director import Director, portal_text

log = logging.getLogger("storaged.lb")

#: Seconds between two rounds of checks and to wait for one connect.
CHECK_INTERVAL = 2.0
CHECK_TIMEOUT = 1.0


async def probe(address: tuple[str, int], timeout: float = CHECK_TIMEOUT) -> bool:
    """True if a TCP connection to ``address`` opens within ``timeout``."""
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address[0], address[1]), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class HealthChecker:
    """Runs the checks while the director has real servers."""

    def __init__(self, director: Director, interval: float = CHECK_INTERVAL,
                 timeout: float = CHECK_TIMEOUT,
                 check: Callable[[tuple[str, int], float], Awaitable[bool]] = probe) -> None:
        self.director = director
        self.interval = interval
        self.timeout = timeout
        self.check = check
        self._task: asyncio.Task | None = None

    def reconcile(self) -> None:
        """Start the checks when there is something to check, stop them otherwise."""
        if self.director.real_addresses():
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._task is not None:
            self._task.cancel()
            self._task = None

    async def check_once(self) -> None:
        """One round: probe every real server at once and record the results."""
        addresses = sorted(self.director.real_addresses())
        results = await asyncio.gather(*(self.check(a, self.timeout) for a in addresses))
        for address, ok in zip(addresses, results, strict=True):
            if self.director.set_health(address, bool(ok)):
                log.warning("lb: real server %s is %s", portal_text(address),
                            "up" if ok else "down (connection refused or timed out)")

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
