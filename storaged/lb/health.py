"""Health checks of real servers: does a node's portal take an iSCSI login?

The asyncio shell around :class:`storaged.lb.director.Director`.  Every
``interval`` seconds each real server's portal gets a discovery login (the
``negotiate`` check of ldirectord, for iSCSI) by storaged's initiator core,
then a Text Request for the vendor keys ``X-org.storaged.sessions`` and
``X-org.storaged.logins`` (:mod:`storaged.iscsi.redirect`), and a Logout.
The answers are the sessions the node holds on that portal (the ActiveConn
of the real server, cluster-wide) and how many logins it has had there
(each new one ends a pending redirect).  A portal that refuses the connection, fails the
login or does not answer within ``timeout`` is down and the director stops
choosing it until a later check succeeds.  A target that is not storaged
answers the key with NotUnderstood: it is up, its count unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from storaged.initiator import session as s
from storaged.iscsi.redirect import HEALTH_INITIATOR, LOGINS_KEY, SESSIONS_KEY
from storaged.lb.director import Director, portal_text

log = logging.getLogger("storaged.lb")

#: Seconds between two rounds of checks, and for one check at most.
CHECK_INTERVAL = 2.0
CHECK_TIMEOUT = 1.5


class Down(Exception):
    """The check failed (the message says how)."""


async def _exchange(core: s.InitiatorConnection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, want: type) -> s.Event:
    while True:
        writer.writelines(core.data_to_send())
        await writer.drain()
        for ev in core.next_events():
            if isinstance(ev, want):
                return ev
            if isinstance(ev, (s.LoginFailed, s.Dropped, s.Redirected)):
                raise Down(str(ev))
        data = await reader.read(65536)
        if not data:
            raise Down("connection closed")
        core.receive_data(data)


def _count(pairs: list[tuple[str, str]], key: str) -> int | None:
    value = dict(pairs).get(key, "")
    return int(value) if value.isdigit() else None


async def _check(address: tuple[str, int]) -> tuple[int | None, int | None]:
    reader, writer = await asyncio.open_connection(address[0], address[1])
    try:
        core = s.InitiatorConnection(s.LoginOptions(initiator_name=HEALTH_INITIATOR))
        core.start()
        await _exchange(core, reader, writer, s.LoginDone)
        core.text_request([(SESSIONS_KEY, "?"), (LOGINS_KEY, "?")])
        ev = await _exchange(core, reader, writer, s.TextDone)
        core.logout()
        with contextlib.suppress(Down, OSError):
            await _exchange(core, reader, writer, s.LoggedOut)
        return _count(ev.pairs, SESSIONS_KEY), _count(ev.pairs, LOGINS_KEY)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def probe(address: tuple[str, int], timeout: float = CHECK_TIMEOUT) -> Health:
    """(up, sessions at the portal, logins there): None where the target does not say."""
    try:
        return (True, *await asyncio.wait_for(_check(address), timeout))
    except (OSError, TimeoutError, Down, s.InitiatorError) as e:
        log.debug("lb: health check of %s: %s", portal_text(address), e)
        return False, None, None


Health = tuple[bool, int | None, int | None]
Check = Callable[[tuple[str, int], float], Awaitable[Health]]


class HealthChecker:
    """Runs the checks while the director has real servers."""

    def __init__(self, director: Director, interval: float = CHECK_INTERVAL,
                 timeout: float = CHECK_TIMEOUT, check: Check = probe) -> None:
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
        """One round: check every real server at once and record the results."""
        addresses = sorted(self.director.real_addresses())
        results = await asyncio.gather(*(self.check(a, self.timeout) for a in addresses))
        for address, (up, sessions, logins) in zip(addresses, results, strict=True):
            if self.director.set_health(address, up, sessions, logins):
                log.warning("lb: real server %s is %s", portal_text(address),
                            "up" if up else "down (no iSCSI login within "
                            f"{self.timeout:g} s)")

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug here must not end the checks for good
                log.exception("lb: health checks failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
