"""Where a logical unit's persistent reservation changes are made to hold.

The PERSISTENT RESERVE OUT logic in :mod:`storaged.scsi.pr` is sans-IO: it
changes one :class:`~storaged.scsi.pr.PersistentReservations` object in
memory and records what the change means for I_T nexuses elsewhere (unit
attentions, tasks to abort) as an :class:`Update`.  A *PR state backend*
decides what else has to happen before the command may complete:

* :class:`LocalPrBackend` (the default): nothing.  The LU is served by this
  daemon only; its in-memory state (plus the APTPL record) is the whole truth.
* the cluster backend (:mod:`storaged.scsi.pr_cluster`): the LU is served
  by several storage nodes over the same backing storage.  The change is
  made under a cluster-wide lock and every node applies the :class:`Update`
  before GOOD is returned (SPC-4 §5.14: one LU, one reservation state,
  whichever target port a command arrives through).

The seam is deliberately narrow: a backend gets a ``change`` callable that
runs the command logic under the LU's PR lock and returns the SCSI result
plus the update (None when nothing changed), and wraps it with whatever
locking and publishing it needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from storaged.scsi.types import ScsiResult

if TYPE_CHECKING:
    from storaged.scsi.pr import PersistentReservations


@dataclass(slots=True)
class Update:
    """One PR change as other nodes serving the LU must apply it.

    ``seq`` counts every change of the LU's PR state (registrations, the
    reservation, APTPL), unlike PRgeneration which RESERVE and RELEASE leave
    alone (SPC-4 §6.15.2); nodes compare it to see who is behind.  ``state``
    is :meth:`PersistentReservations.to_dict`.  ``effects`` are what the
    change did to nexuses, so a node applies them to *its* nexuses:
    ``["ua", [[initiator, target_port], ...], asc, ascq, skip]`` (unit
    attention for the nexuses those registrations cover, except the
    ``skip`` = ``[initiator_port, target_port]`` nexus) and
    ``["abort", [[initiator, target_port], ...], skip]`` (PREEMPT AND ABORT:
    abort their tasks, SPC-4 §5.14.11.5)."""

    seq: int
    state: dict[str, Any]
    effects: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "state": self.state, "fx": self.effects}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Update:
        return cls(int(data["seq"]), dict(data["state"]), list(data.get("fx") or []))


Change = Callable[[], tuple[ScsiResult, "Update | None"]]
"""Runs one PR change under the LU's lock: (SCSI result, update or None)."""


class PrBackend(Protocol):
    """How PERSISTENT RESERVE OUT changes of one LU are made to hold."""

    blocking: bool
    """True if :meth:`run` may wait (cluster locks, peers): the transport then
    runs PERSISTENT RESERVE OUT off its event loop (``LogicalUnit.may_block``)."""

    def run(self, pr: PersistentReservations, change: Change) -> ScsiResult:
        """Run ``change`` (a PERSISTENT RESERVE OUT) and return its result once
        it holds everywhere it must.  Called from a worker thread when
        ``blocking``, else from the transport's thread."""

    def arun(self, pr: PersistentReservations, change: Change) -> Awaitable[ScsiResult]:
        """:meth:`run` for callers on the daemon's event loop (``storaged pr clear``)."""

    def stale(self, pr: PersistentReservations) -> ScsiResult | None:
        """The result PERSISTENT RESERVE IN gets while this node's copy of the
        state may be out of date (None: answer from it)."""


class LocalPrBackend:
    """The LU is this daemon's alone: a change holds once made in memory."""

    blocking = False

    def run(self, pr: PersistentReservations, change: Change) -> ScsiResult:
        return change()[0]

    async def arun(self, pr: PersistentReservations, change: Change) -> ScsiResult:
        return change()[0]

    def stale(self, pr: PersistentReservations) -> ScsiResult | None:
        return None


LOCAL = LocalPrBackend()
"""The shared default backend (stateless)."""

__all__ = ["LOCAL", "Change", "LocalPrBackend", "PrBackend", "Update"]
