"""NSM, the Network Status Monitor (program 100024 version 1), server side, sans-IO.

Wire format from the Open Group XNFS specification chapter 11 (``sm_inter.x``).
storaged is its own status monitor for the locks it serves:

* it keeps the NSM *state number* (odd while up, bumped on every start,
  persisted through ``storaged.state.nsm``) and answers SM_STAT with it;
* it remembers every client host that holds locks (``NsmStore.monitor``,
  called by NLM before the first lock is granted);
* after a restart it owes each of those hosts an SM_NOTIFY
  (``notify_args``), which the shell (storaged.nfs.lockd) sends to the
  client's statd, retrying until it is delivered or it gives up;
* an SM_NOTIFY *to* us means a client rebooted: its locks are dropped
  (FREE_ALL semantics, via ``on_reboot``).

SM_MON / SM_UNMON / SM_UNMON_ALL are answered for local callers (loopback)
with in-memory bookkeeping: no local program relies on us to forward
notifications, so nothing is forwarded.  SM_SIMU_CRASH is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from storaged.nfs.rpc import Call, Procedure, Program
from storaged.nfs.xdr import INT32, VOID, Enum, FixedOpaque, String, Struct

log = logging.getLogger("storaged.nfs.nsm")

SM_PROGRAM = 100024
SM_VERS = 1
SM_MAXSTRLEN = 1024
STAT_SUCC, STAT_FAIL = 0, 1

SM_NAME = Struct("sm_name", ("mon_name", String(SM_MAXSTRLEN)))
MY_ID = Struct("my_id", ("my_name", String(SM_MAXSTRLEN)), ("my_prog", INT32),
               ("my_vers", INT32), ("my_proc", INT32))
MON_ID = Struct("mon_id", ("mon_name", String(SM_MAXSTRLEN)), ("my_id", MY_ID))
MON = Struct("mon", ("mon_id", MON_ID), ("priv", FixedOpaque(16)))
STAT_CHGE = Struct("stat_chge", ("mon_name", String(SM_MAXSTRLEN)), ("state", INT32))
SM_STAT = Struct("sm_stat", ("state", INT32))
SM_STAT_RES = Struct("sm_stat_res", ("res_stat", Enum("res", (STAT_SUCC, STAT_FAIL))),
                     ("state", INT32))

PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("STAT", SM_NAME, SM_STAT_RES),
    2: ("MON", MON, SM_STAT_RES),
    3: ("UNMON", MON_ID, SM_STAT),
    4: ("UNMON_ALL", MY_ID, SM_STAT),
    5: ("SIMU_CRASH", VOID, VOID),
    6: ("NOTIFY", STAT_CHGE, VOID),
}
SM_NOTIFY_PROC = 6


def _local(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1", "")


class Nsm:
    """Program 100024 v1 with our state number; ``on_reboot(name)`` frees a host's locks."""

    def __init__(self, state: int, name: str, on_reboot: Callable[[str], None]) -> None:
        self.state = state
        self.name = name
        self.on_reboot = on_reboot
        self.watch: set[tuple[bytes, bytes]] = set()  # (mon_name, my_name) from SM_MON

    def program(self) -> Program:
        prog = Program(SM_PROGRAM, SM_VERS)
        for num, (name, args, res) in PROCEDURES.items():
            prog.procs[num] = Procedure(name, args, res, getattr(self, name.lower()))
        return prog

    def notify_args(self) -> bytes:
        """The SM_NOTIFY arguments announcing our (new) state."""
        return STAT_CHGE.encode({"mon_name": self.name.encode(), "state": self.state})

    def null(self, call: Call, args: Any) -> None:
        return None

    def stat(self, call: Call, a: dict[str, Any]) -> dict[str, int]:
        return {"res_stat": STAT_SUCC, "state": self.state}

    def mon(self, call: Call, a: dict[str, Any]) -> dict[str, int]:
        if not _local(call.peer[0]):
            return {"res_stat": STAT_FAIL, "state": self.state}
        mid = a["mon_id"]
        self.watch.add((mid["mon_name"], mid["my_id"]["my_name"]))
        return {"res_stat": STAT_SUCC, "state": self.state}

    def unmon(self, call: Call, a: dict[str, Any]) -> dict[str, int]:
        if _local(call.peer[0]):
            self.watch.discard((a["mon_name"], a["my_id"]["my_name"]))
        return {"state": self.state}

    def unmon_all(self, call: Call, a: dict[str, Any]) -> dict[str, int]:
        if _local(call.peer[0]):
            self.watch = {w for w in self.watch if w[1] != a["my_name"]}
        return {"state": self.state}

    def simu_crash(self, call: Call, args: Any) -> None:
        return None

    def notify(self, call: Call, a: dict[str, Any]) -> None:
        name = a["mon_name"].decode("utf-8", "surrogateescape")
        log.info("SM_NOTIFY from %s (%s): state %d; dropping its locks", name,
                 call.peer[0], a["state"])
        self.on_reboot(name)
        return None
