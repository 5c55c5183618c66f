"""Persistent reservation state kept across restarts (APTPL, SPC-4 §5.14.5).

One :class:`PrRecord` per backstore (record kind ``pr``, key = backstore
name) holds what ``storaged.scsi.pr.PersistentReservations.to_dict`` gives:
PRgeneration, registrations (key, I_T nexus, TransportID), the reservation
(type, scope, holder) and the APTPL flag.  It exists only while the last
APTPL bit an initiator sent was one; the SCSI layer deletes it otherwise, so
a restart without APTPL forgets every registration, as a power loss would.

:class:`StatePrStore` is the small adapter the daemon hands to each
LogicalUnit (``pr_store=``): ``load()`` at start, ``save()`` synchronously
before a PERSISTENT RESERVE OUT completes.  The record also carries the
backstore's WWN, so a new backstore that reuses a deleted one's name does
not inherit its reservations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record, _collect
from storaged.state.store import Store
from storaged.state.validate import check_bool, check_int, normalize_name

PR_TYPES = (0, 1, 3, 5, 6, 7, 8)
_HEX_RE = re.compile(r"^([0-9a-f]{2})*$")


@dataclass
class PrRegistration(Record):
    """One registered I_T nexus (see storaged.scsi.pr.Registration)."""

    reservation_key: int
    initiator: str
    target_port: str = ""
    relative_port_id: int = 0
    transport_id: str = ""
    holder: bool = False

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_int, self.reservation_key, "reservation_key", 1, 2**64 - 1)
        if not isinstance(self.initiator, str) or not self.initiator or "\0" in self.initiator:
            errors.append(f"initiator must be a non-empty string, got {self.initiator!r}")
        if not isinstance(self.target_port, str) or "\0" in self.target_port:
            errors.append(f"target_port must be a string, got {self.target_port!r}")
        _collect(errors, check_int, self.relative_port_id, "relative_port_id", 0, 65535)
        if not isinstance(self.transport_id, str) or not _HEX_RE.match(self.transport_id):
            errors.append("transport_id must be lowercase hex")
        _collect(errors, check_bool, self.holder, "holder")
        return errors


@dataclass
class PrRecord(Record):
    """Saved persistent reservation state of one backstore (APTPL)."""

    RECORD_KIND: ClassVar[str] = "pr"

    backstore: str
    wwn: str = ""
    generation: int = 0
    aptpl: bool = True
    type: int = 0
    scope: int = 0
    registrations: list[PrRegistration] = field(default_factory=list)
    seq: int = 0
    """Change counter of a shared LU's PR state (storaged.scsi.pr_cluster): after a
    restart of every node the one with the highest ``seq`` has the newest state."""

    @property
    def key(self) -> str:
        return self.backstore

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, normalize_name, self.backstore, "backstore name")
        if not isinstance(self.wwn, str):
            errors.append("wwn must be a string")
        _collect(errors, check_int, self.generation, "generation", 0, 2**32 - 1)
        _collect(errors, check_bool, self.aptpl, "aptpl")
        _collect(errors, check_int, self.seq, "seq", 0, 2**63 - 1)
        if self.type not in PR_TYPES or isinstance(self.type, bool):
            errors.append(f"type must be one of {PR_TYPES}, got {self.type!r}")
        if self.scope != 0 or isinstance(self.scope, bool):
            errors.append(f"scope must be 0 (LU_SCOPE), got {self.scope!r}")
        if not isinstance(self.registrations, list):
            return errors + ["registrations must be a list"]
        for i, reg in enumerate(self.registrations):
            if not isinstance(reg, PrRegistration):
                errors.append(f"registration {i}: must be a PrRegistration")
                continue
            errors += [f"registration {i}: {m}" for m in reg.problems()]
        return errors

    @classmethod
    def _decode(cls, data: dict[str, Any], errors: list[str]) -> None:
        regs = data.get("registrations")
        if isinstance(regs, list):
            out: list[Any] = []
            for i, item in enumerate(regs):
                try:
                    out.append(PrRegistration.from_dict(item))
                except ValidationError as e:
                    errors.extend(f"registration {i}: {m}" for m in e.errors)
            data["registrations"] = out

    def state(self) -> dict[str, Any]:
        """The SCSI layer's form (``PersistentReservations.restore``)."""
        return {"generation": self.generation, "aptpl": self.aptpl, "type": self.type,
                "scope": self.scope, "seq": self.seq,
                "registrations": [{"key": r.reservation_key, "initiator": r.initiator,
                                   "target_port": r.target_port,
                                   "relative_port_id": r.relative_port_id,
                                   "transport_id": r.transport_id, "holder": r.holder}
                                  for r in self.registrations]}

    @classmethod
    def from_state(cls, backstore: str, wwn: str, state: dict[str, Any]) -> PrRecord:
        """Build from ``PersistentReservations.to_dict()``."""
        regs = [PrRegistration(reservation_key=r["key"], initiator=r["initiator"],
                               target_port=r.get("target_port", ""),
                               relative_port_id=r.get("relative_port_id", 0),
                               transport_id=r.get("transport_id", ""),
                               holder=bool(r.get("holder", False)))
                for r in state.get("registrations", [])]
        return cls(backstore=backstore, wwn=wwn, generation=state.get("generation", 0),
                   aptpl=bool(state.get("aptpl", True)), type=state.get("type", 0),
                   scope=state.get("scope", 0), registrations=regs,
                   seq=int(state.get("seq", 0)))


class StatePrStore:
    """``PrStore`` of one backstore in the LMDB store (see the module docstring)."""

    def __init__(self, store: Store, backstore: str, wwn: str) -> None:
        self.store = store
        self.backstore = backstore
        self.wwn = wwn

    def load(self) -> dict[str, Any] | None:
        with self.store.read() as txn:
            record = txn.get(PrRecord, self.backstore)
        if record is None or (record.wwn and record.wwn != self.wwn):
            return None
        return record.state()

    def save(self, data: dict[str, Any] | None) -> None:
        with self.store.write() as txn:
            if data is None:
                txn.delete(PrRecord, self.backstore)
            else:
                txn.put(PrRecord.from_state(self.backstore, self.wwn, data))
