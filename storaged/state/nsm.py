"""NSM (status monitor) state kept across restarts: our state number and monitored hosts.

Network Status Monitor semantics (XNFS ch. 11, statd(8)): every host has a
*state number* that is odd while it is up and grows on every restart; a
restarted server tells every client that held locks (the hosts it
*monitors*) with SM_NOTIFY, and the clients then reclaim their locks during
the grace period.  Two record kinds carry what must survive a crash:

* ``nsm_state`` (key ``local``): our current state number;
* ``nsm_monitor`` (key = the client's name as it gave it in ``caller_name``):
  the address to notify and whether a notification is still owed.

A monitor record is written (and committed) before the first lock of a host
is granted, so a host that could hold a lock at crash time is always known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from storaged.state.records import Record, _collect
from storaged.state.store import Store
from storaged.state.validate import check_bool, check_int

MAX_NAME = 1024


@dataclass
class NsmState(Record):
    """Our NSM state number (odd while up)."""

    RECORD_KIND: ClassVar[str] = "nsm_state"
    KEY: ClassVar[str] = "local"

    state: int = 0

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_int, self.state, "state", 0, 0x7FFFFFFF)
        return errors


@dataclass
class NsmMonitor(Record):
    """A client host we monitor because it held (or may hold) locks."""

    RECORD_KIND: ClassVar[str] = "nsm_monitor"

    host: str
    address: str
    notify_pending: bool = False

    @property
    def key(self) -> str:
        return self.host

    def problems(self) -> list[str]:
        errors: list[str] = []
        for name in ("host", "address"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > MAX_NAME or "\0" in v:
                errors.append(f"{name} must be a non-empty string, got {v!r}")
        _collect(errors, check_bool, self.notify_pending, "notify_pending")
        return errors


class NsmStore:
    """What the NSM/NLM runtime reads and writes in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def restart(self) -> tuple[int, list[NsmMonitor]]:
        """Bump the state number to the next odd value and mark every monitored host
        as owed a notification; returns ``(state, hosts to notify)``.  One transaction."""
        with self.store.write() as txn:
            rec = txn.get(NsmState, NsmState.KEY) or NsmState()
            rec.state = rec.state + 1 if rec.state % 2 == 0 else rec.state + 2
            if rec.state > 0x7FFFFFFF:
                rec.state = 1
            txn.put(rec)
            hosts = txn.list(NsmMonitor)
            for h in hosts:
                h.notify_pending = True
                txn.put(h)
            return rec.state, hosts

    def monitor(self, host: str, address: str) -> None:
        """Remember ``host`` (committed before returning)."""
        with self.store.write() as txn:
            cur = txn.get(NsmMonitor, host)
            if cur is None or cur.address != address:
                txn.put(NsmMonitor(host, address, cur.notify_pending if cur else False))

    def forget(self, host: str) -> None:
        """Stop monitoring ``host`` (it has no locks left and is owed nothing)."""
        with self.store.write() as txn:
            txn.delete(NsmMonitor, host)

    def notified(self, host: str, keep: bool) -> None:
        """A notification reached ``host``: clear the flag, or drop the record unless ``keep``."""
        with self.store.write() as txn:
            cur = txn.get(NsmMonitor, host)
            if cur is None:
                return
            if keep:
                cur.notify_pending = False
                txn.put(cur)
            else:
                txn.delete(NsmMonitor, host)

    def monitored(self) -> list[NsmMonitor]:
        with self.store.read() as txn:
            return txn.list(NsmMonitor)


class MemoryNsmStore:
    """The same interface without persistence (``python -m storaged.nfs``, unit tests)."""

    def __init__(self) -> None:
        self.state = 0
        self.hosts: dict[str, NsmMonitor] = {}

    def restart(self) -> tuple[int, list[NsmMonitor]]:
        self.state = self.state + 1 if self.state % 2 == 0 else self.state + 2
        for h in self.hosts.values():
            h.notify_pending = True
        return self.state, list(self.hosts.values())

    def monitor(self, host: str, address: str) -> None:
        cur = self.hosts.get(host)
        self.hosts[host] = NsmMonitor(host, address, cur.notify_pending if cur else False)

    def forget(self, host: str) -> None:
        self.hosts.pop(host, None)

    def notified(self, host: str, keep: bool) -> None:
        if keep and host in self.hosts:
            self.hosts[host].notify_pending = False
        else:
            self.hosts.pop(host, None)

    def monitored(self) -> list[NsmMonitor]:
        return list(self.hosts.values())
