"""Reservations: SCSI-3 persistent reservations and SPC-2 RESERVE/RELEASE.

Persistent reservations (SPC-4 §5.14; PERSISTENT RESERVE IN §6.15, OUT
§6.16) live in one :class:`PersistentReservations` object per logical unit
(``lu.pr``):

* **registrations** are per I_T nexus: the iSCSI initiator port name
  (``<iqn>,i,0x<ISID>``) plus the target port name (``<iqn>,t,0x<TPGT>``).
  A registration made with ALL_TG_PTS=1 covers the initiator port through
  every target port, and one made from an iSCSI TransportID without ISID
  (format 00b, SPEC_I_PT or REGISTER AND MOVE) covers every initiator port
  of that initiator name.  Registrations survive the loss of the nexus
  (logout, dropped connection, LUN/target reset); only PERSISTENT RESERVE
  OUT, ``storaged pr clear`` or a daemon restart without APTPL remove them.
* **the reservation**: type (all six of SPC-4 table 5.14.2), scope (only
  LU_SCOPE) and holder.  For the all-registrants types every registered
  nexus is a holder (§5.14.10); otherwise the holder is the registration
  that reserved (or received the reservation by PREEMPT / REGISTER AND MOVE).
* **PRgeneration** counts successful REGISTER, REGISTER AND IGNORE EXISTING
  KEY, CLEAR, PREEMPT, PREEMPT AND ABORT and REGISTER AND MOVE (§6.15.2).
* **APTPL**: with the last APTPL bit received set, every change is saved
  through the LU's ``pr_store`` before the command completes and restored
  when the daemon opens the backstore again (§5.14.5); with APTPL clear the
  saved state is deleted, so a restart forgets it (like a power loss).

The SPC-2 RESERVE(6)/(10) reservation (``lu.pr.spc2``) belongs to one I_T
nexus and is released by RELEASE, a logical unit reset, a target reset and
the loss of that nexus (logout, dropped connection).  How RESERVE/RELEASE
meet persistent reservations is SPC-4 §5.14.3 (we report CRH=1): GOOD
without effect for the reservation holder and for registrants of a
registrants-only / all-registrants reservation, RESERVATION CONFLICT for
everyone else while any registration exists; PERSISTENT RESERVE IN/OUT
conflict while an SPC-2 reservation exists (§6.15.1, §6.16.1).

Enforcement plugs into :attr:`LogicalUnit.access_check`, and only while a
reservation exists: with none the dispatcher's single ``is not None`` test
is all READ/WRITE pay.  The check maps the command's
:class:`~storaged.scsi.commands.Access` class and the reservation type to
allowed / RESERVATION CONFLICT following SPC-4 table 5.14.1 (SBC-3
table 13 for block commands):

===============  =====  =====  ================  ================
class            WE     EA     WE-RO / WE-AR     EA-RO / EA-AR
===============  =====  =====  ================  ================
ALLOWED          yes    yes    yes               yes
READ             yes    no     yes               registered only
WRITE, CONFLICT  no     no     registered only   registered only
===============  =====  =====  ================  ================

(the holder is always allowed; PERSISTENT and RESERVE commands decide for
themselves).

PREEMPT AND ABORT aborts the tasks of every preempted nexus before it
completes by calling ``lu.abort_hooks`` (``ScsiTarget`` forwards them to its
``on_abort_nexus`` callback, which the iSCSI layer wires to its sessions).

Every PERSISTENT RESERVE OUT goes through the LU's *PR state backend*
(``pr.backend``, :mod:`storaged.scsi.pr_backend`): the command logic here
stays sans-IO and records what a change did to nexuses (unit attentions,
aborts) in an :class:`~storaged.scsi.pr_backend.Update`; the default local
backend has nothing more to do, the cluster one (an LU served by several
storage nodes) makes every node apply the update (:meth:`apply_update`)
before the command completes.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storaged.scsi.commands import Access, CommandSet, CommandSpec
from storaged.scsi.pr_backend import LOCAL, PrBackend, Update
from storaged.scsi.sense import Key
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

COMMANDS = CommandSet("pr")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

log = logging.getLogger("storaged.scsi.pr")

C = 0x04  # CONTROL byte usage (NACA)

PR_IN = 0x5E
PR_OUT = 0x5F

# PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1, table 163)
READ_KEYS = 0x00
READ_RESERVATION = 0x01
REPORT_CAPABILITIES = 0x02
READ_FULL_STATUS = 0x03

# PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2, table 176)
REGISTER = 0x00
RESERVE = 0x01
RELEASE = 0x02
CLEAR = 0x03
PREEMPT = 0x04
PREEMPT_AND_ABORT = 0x05
REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
REGISTER_AND_MOVE = 0x07

SA_NAMES = {
    REGISTER: "REGISTER", RESERVE: "RESERVE", RELEASE: "RELEASE", CLEAR: "CLEAR",
    PREEMPT: "PREEMPT", PREEMPT_AND_ABORT: "PREEMPT AND ABORT",
    REGISTER_AND_IGNORE_EXISTING_KEY: "REGISTER AND IGNORE EXISTING KEY",
    REGISTER_AND_MOVE: "REGISTER AND MOVE",
}


class PrType(enum.IntEnum):
    """Persistent reservation types (SPC-4 §6.16.2, table 178)."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


TYPE_NAMES = {
    1: "Write Exclusive",
    3: "Exclusive Access",
    5: "Write Exclusive - Registrants Only",
    6: "Exclusive Access - Registrants Only",
    7: "Write Exclusive - All Registrants",
    8: "Exclusive Access - All Registrants",
}
VALID_TYPES = frozenset(TYPE_NAMES)
ALL_REGISTRANTS = frozenset({7, 8})
REGISTRANTS_TYPES = frozenset({5, 6, 7, 8})     # registrants only or all registrants
READ_SHARED = frozenset({1, 5, 7})              # write exclusive: anyone may read
LU_SCOPE = 0

UA_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
UA_RESERVATIONS_RELEASED = (0x2A, 0x04)
UA_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)

ISCSI_PROTOCOL_ID = 5
BASIC_PARAM_LEN = 24

_ISID_SEP = ",i,0x"


class PrStore(Protocol):
    """Where a logical unit's APTPL state is kept (the daemon's LMDB adapter)."""

    def load(self) -> dict[str, Any] | None:
        """The saved state (:meth:`PersistentReservations.to_dict` form), or None."""

    def save(self, data: dict[str, Any] | None) -> None:
        """Durably save the state; None deletes it."""


# ---------------------------------------------------------------- TransportIDs
def _be16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def _be32(b: bytes | bytearray | memoryview, off: int) -> int:
    return int.from_bytes(bytes(b[off:off + 4]), "big")


def _be64(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 8], "big")


def normalize_port(name: str) -> str:
    """Canonical form of an iSCSI initiator port or device name for matching.

    iSCSI names compare case-insensitively (RFC 3722 stringprep folds case)
    and the ISID is printed as 12 lowercase hex digits."""
    name = name.strip().lower()
    head, sep, isid = name.partition(_ISID_SEP)
    if sep:
        try:
            return f"{head}{_ISID_SEP}{int(isid, 16):012x}"
        except ValueError:
            return name
    return name


def initiator_ids(nexus: Nexus) -> tuple[str, str, str]:
    """(initiator port, initiator device name, target port) of a nexus, normalized."""
    port = normalize_port(nexus.initiator_port)
    name = nexus.initiator_name.lower() if nexus.initiator_name else port.partition(",")[0]
    return port, name, nexus.target_port.lower()


def encode_transport_id(initiator: str) -> bytes:
    """iSCSI TransportID (SPC-4 §7.6.4.6) for an initiator port or device name.

    ``iqn...,i,0x<ISID>`` gives FORMAT CODE 01b (initiator port), a bare
    name FORMAT CODE 00b (initiator device).  The name is NUL-terminated
    and padded to a multiple of four bytes, at least 20 (ADDITIONAL LENGTH).
    """
    fmt = 1 if _ISID_SEP in initiator else 0
    name = initiator.encode("utf-8") + b"\0"
    name += b"\0" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\0" * (20 - len(name))
    return bytes((fmt << 6 | ISCSI_PROTOCOL_ID, 0)) + len(name).to_bytes(2, "big") + name


def nexus_transport_id(nexus: Nexus) -> bytes:
    """The TransportID of a nexus's initiator port: the transport's own, if
    it filled ``Nexus.transport_id``, else built from the port name."""
    return nexus.transport_id or encode_transport_id(nexus.initiator_port)


def decode_transport_id(data: bytes, offset: int = 0) -> tuple[str, int] | None:
    """Parse one iSCSI TransportID at ``offset``: (normalized initiator, its length).

    None if it is not a valid iSCSI TransportID (other protocols, bad
    format code, truncated, or a format 01b name without a proper ISID)."""
    if len(data) - offset < 4:
        return None
    b0 = data[offset]
    if b0 & 0x0F != ISCSI_PROTOCOL_ID:
        return None
    fmt = b0 >> 6
    if fmt not in (0, 1):
        return None
    addl = _be16(data, offset + 2)
    end = offset + 4 + addl
    if addl < 4 or end > len(data):
        return None
    raw = data[offset + 4:end].split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or any(c.isspace() for c in text):
        return None
    if fmt == 1:
        head, sep, isid = text.lower().partition(_ISID_SEP)
        if not sep or not head or not isid:
            return None
        try:
            value = int(isid, 16)
        except ValueError:
            return None
        if value >> 48:
            return None
        return f"{head}{_ISID_SEP}{value:012x}", 4 + addl
    if _ISID_SEP in text.lower():
        return None
    return text.lower(), 4 + addl


# ---------------------------------------------------------------- state
@dataclass(slots=True, eq=False)
class Registration:
    """One registered I_T nexus (or a set of them, see the module docstring).

    ``initiator`` is the normalized initiator port name (or device name for
    a name-only registration); ``target_port`` the normalized target port
    name, "" for all target ports (ALL_TG_PTS=1)."""

    key: int
    initiator: str
    target_port: str
    relative_port_id: int
    transport_id: bytes

    @property
    def all_tg_pts(self) -> bool:
        return not self.target_port

    def matches(self, port: str, name: str, target_port: str) -> bool:
        return self.initiator in (port, name) and self.target_port in (target_port, "")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "initiator": self.initiator, "target_port": self.target_port,
                "relative_port_id": self.relative_port_id,
                "transport_id": self.transport_id.hex()}


def conflict() -> ScsiResult:
    """RESERVATION CONFLICT status (no sense data, SAM-5 §5.3.1)."""
    return ScsiResult(status=Status.RESERVATION_CONFLICT)


_MISSING = object()


class PersistentReservations:
    """Persistent reservation and SPC-2 reservation state of one logical unit.

    Created by :class:`~storaged.scsi.lu.LogicalUnit`; restores the APTPL
    state from ``store`` if one is given.  Mutations happen under ``lock``;
    the access check reads without it (attribute reads are atomic and the
    nexus -> registration cache is invalidated after every change)."""

    def __init__(self, lu: LogicalUnit, store: PrStore | None = None) -> None:
        self.lu = lu
        self.store = store
        self.lock = threading.RLock()
        self.generation = 0
        self.regs: dict[tuple[str, str], Registration] = {}
        self.type = 0
        self.scope = LU_SCOPE
        self.holder: Registration | None = None
        self.aptpl = False
        self.spc2: tuple[str, str] | None = None
        """The SPC-2 RESERVE holder: (initiator port, target port) as in the Nexus."""
        self._cache: dict[tuple[str, str], Registration | None] = {}
        self._saved = False
        self.backend: PrBackend = LOCAL
        """Where PERSISTENT RESERVE OUT changes are made to hold (storaged.scsi.pr_backend)."""
        self.seq = 0
        """Counts every change of the state (PRgeneration does not count RESERVE and
        RELEASE); nodes serving one LU compare it to find the newest state."""
        self.effects: list[list[Any]] | None = None
        self._dirty = False
        lu.reset_hooks.append(self._on_reset)
        lu.nexus_lost_hooks.append(self._on_nexus_lost)
        if store is not None:
            try:
                data = store.load()
            except Exception:  # noqa: BLE001 - a broken record must not stop the LU
                log.exception("%s: cannot load persistent reservations", lu.name)
                data = None
            if data:
                self.restore(data)

    # ------------------------------------------------------------ lookups
    def find(self, nexus: Nexus) -> Registration | None:
        """The registration covering this I_T nexus, or None (cached)."""
        cache = self._cache
        k = (nexus.initiator_port, nexus.target_port)
        reg = cache.get(k, _MISSING)
        if reg is _MISSING:
            reg = cache[k] = self._find_ids(*initiator_ids(nexus))
        return reg  # type: ignore[return-value]

    def _find_ids(self, port: str, name: str, tp: str) -> Registration | None:
        regs = self.regs
        return regs.get((port, tp)) or regs.get((port, "")) or regs.get((name, tp)) \
            or regs.get((name, ""))

    def is_holder(self, reg: Registration | None) -> bool:
        """Does this registration hold the reservation (SPC-4 §5.14.10)?"""
        if reg is None or not self.type:
            return False
        return self.type in ALL_REGISTRANTS or reg is self.holder

    def _nexuses(self, regs: Iterable[Registration]) -> list[Nexus]:
        """Live nexuses of the LU covered by any of ``regs``."""
        regs = list(regs)
        out = []
        for n in self.lu.nexuses():
            ids = initiator_ids(n)
            if any(r.matches(*ids) for r in regs):
                out.append(n)
        return out

    @staticmethod
    def _same(a: Nexus, b: Nexus) -> bool:
        return a.initiator_port == b.initiator_port and a.target_port == b.target_port

    def _ua(self, regs: Iterable[Registration], asc_ascq: tuple[int, int],
            skip: Nexus | None) -> None:
        """Unit attention for every live nexus covered by ``regs`` except ``skip``
        (recorded for the other nodes too while a change is being made)."""
        regs = list(regs)
        for n in self._nexuses(regs):
            if skip is None or not self._same(n, skip):
                self.lu.add_unit_attention(*asc_ascq, only_nexus=n)
        if self.effects is not None and regs:
            self.effects.append(["ua", _pairs(regs), asc_ascq[0], asc_ascq[1], _skip(skip)])

    def _record_abort(self, regs: Iterable[Registration], skip: Nexus | None) -> None:
        """Note for the other nodes that the tasks of ``regs``' nexuses were aborted."""
        if self.effects is not None:
            self.effects.append(["abort", _pairs(regs), _skip(skip)])

    def _nexuses_of(self, pairs: Iterable[list[str]], skip: list[str] | None) -> list[Nexus]:
        """Live local nexuses covered by ``[initiator, target_port]`` pairs of an
        :class:`Update` effect, except the ``skip`` nexus."""
        regs = [Registration(0, str(i), str(t), 0, b"") for i, t in pairs]
        out = []
        for n in self._nexuses(regs):
            if skip and [n.initiator_port, n.target_port] == list(skip):
                continue
            out.append(n)
        return out

    # ------------------------------------------------------------ changes as a unit
    def change(self, fn: Callable[[], ScsiResult]) -> tuple[ScsiResult, Update | None]:
        """Run one change under the lock: its result, and the :class:`Update`
        other nodes must apply (None if the state did not change)."""
        with self.lock:
            self.effects = []
            self._dirty = False
            try:
                result = fn()
                if not self._dirty:
                    return result, None
                return result, Update(self.seq, self.to_dict(), self.effects)
            finally:
                self.effects = None
                self._dirty = False

    def apply_update(self, update: Update) -> bool:
        """Apply a change another node serving this LU made: take its state,
        raise its unit attentions and abort its preempted tasks on this node's
        nexuses, and save the state here too if APTPL.  SPC-2 reservations
        stay local.  False (and nothing done) if this node already has it."""
        aborts: list[Nexus] = []
        with self.lock:
            if update.seq <= self.seq:
                return False
            was_saved = self._saved
            self.restore(update.state)
            self.seq = update.seq
            self._saved = was_saved
            for fx in update.effects:
                try:
                    if fx[0] == "ua":
                        for n in self._nexuses_of(fx[1], fx[4]):
                            self.lu.add_unit_attention(int(fx[2]), int(fx[3]), only_nexus=n)
                    elif fx[0] == "abort":
                        aborts += self._nexuses_of(fx[1], fx[2])
                except (IndexError, TypeError, ValueError):
                    log.warning("%s: bad PR update effect %r ignored", self.lu.name, fx)
            self._persist()
        _run_abort_hooks(self.lu, aborts)
        return True

    # ------------------------------------------------------------ state changes
    def _changed(self) -> ScsiResult | None:
        """After any PR change: drop the cache, (un)install the access check
        and save the state if APTPL.  Returns an error result if saving failed."""
        self._cache = {}
        self.seq += 1
        self._dirty = True
        self.sync_access_check()
        return self._persist()

    def _persist(self) -> ScsiResult | None:
        """Save the state if APTPL (delete a saved one if no longer); an error
        result if that failed."""
        store = self.store
        if store is None or not (self.aptpl or self._saved):
            return None
        try:
            store.save(self.to_dict() if self.aptpl else None)
        except Exception:  # noqa: BLE001 - report, never crash the session
            log.exception("%s: cannot save persistent reservations", self.lu.name)
            return self.lu.check(Key.HARDWARE_ERROR, 0x44, 0x00)   # INTERNAL TARGET FAILURE
        self._saved = self.aptpl
        return None

    def sync_access_check(self) -> None:
        """Install the access check while a reservation exists, remove it after."""
        lu = self.lu
        want = bool(self.type) or self.spc2 is not None
        cur = lu.access_check
        if want and cur is None:
            lu.access_check = access_check
        elif not want and cur is access_check:
            lu.access_check = None

    def _bump(self) -> None:
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def _release(self) -> None:
        self.type = 0
        self.scope = LU_SCOPE
        self.holder = None

    def _remove(self, regs: Iterable[Registration]) -> bool:
        """Remove registrations; release the reservation when its holder (or,
        for all-registrants types, the last registrant) goes.  Returns True
        if that released the reservation."""
        gone = {id(r) for r in regs}
        if not gone:
            return False
        self.regs = {k: r for k, r in self.regs.items() if id(r) not in gone}
        self._cache = {}
        if not self.type:
            return False
        if self.type in ALL_REGISTRANTS:
            if not self.regs:
                self._release()
                return True
            if self.holder is not None and id(self.holder) in gone:
                self.holder = next(iter(self.regs.values()))
            return False
        if self.holder is not None and id(self.holder) in gone:
            self._release()
            return True
        return False

    def _add(self, key: int, initiator: str, target_port: str, relative_port_id: int,
             transport_id: bytes) -> Registration:
        reg = Registration(key, initiator, target_port, relative_port_id, transport_id)
        self.regs[(initiator, target_port)] = reg
        self._cache = {}
        return reg

    def clear_all(self) -> None:
        """Drop every registration and the reservation (no UA, no save)."""
        self.regs = {}
        self._release()
        self._cache = {}

    def admin_clear(self) -> dict[str, Any]:
        """``storaged pr clear``: remove all registrations, the persistent and
        the SPC-2 reservation and the saved APTPL state.  Registered nexuses
        get RESERVATIONS PREEMPTED, as after a CLEAR.  This node only: see
        :meth:`admin_clear_everywhere` for an LU with a cluster backend."""
        with self.lock:
            before = self.describe()
            if self._admin_clear() is not None:
                raise RuntimeError("registrations cleared, but the saved APTPL state "
                                   "could not be deleted")
            return before

    def _admin_clear(self) -> ScsiResult | None:
        self._ua(self.regs.values(), UA_RESERVATIONS_PREEMPTED, None)
        if self.regs:
            self._bump()
        self.clear_all()
        self.spc2 = None
        self.aptpl = False
        return self._changed()

    async def admin_clear_everywhere(self) -> dict[str, Any]:
        """:meth:`admin_clear` through the PR backend, so every node serving the
        LU clears it before this returns (call from the daemon's event loop)."""
        before: dict[str, Any] = {}

        def fn() -> ScsiResult:
            before.update(self.describe())
            return self._admin_clear() or ScsiResult()

        result = await self.backend.arun(self, lambda: self.change(fn))
        if result.status != Status.GOOD:
            raise RuntimeError("the reservations could not be cleared everywhere: "
                               f"{_result_text(result)}")
        return before

    def admin_preempt(self, initiators: Iterable[str], keys: Iterable[int]) -> dict[str, Any]:
        """SAN-level fencing: remove the registrations of a fenced host as a
        PREEMPT AND ABORT from another registrant would (SPC-4 §5.14.11.5).

        Registrations whose initiator device name (or port name) is one of
        ``initiators``, or whose key is one of ``keys``, are removed; their
        live nexuses get REGISTRATIONS PREEMPTED and their tasks are aborted
        (``abort_hooks``).  If that removes the reservation holder, the
        reservation is released and, as for a release of a registrants-only
        or all-registrants reservation (SPC-4 §5.14.11.2.2), the remaining
        registrants get RESERVATIONS RELEASED.  Returns what was removed."""
        with self.lock:
            out, nexuses = self._admin_preempt(initiators, keys)
        _run_abort_hooks(self.lu, nexuses)
        return out

    def _admin_preempt(self, initiators: Iterable[str], keys: Iterable[int]
                       ) -> tuple[dict[str, Any], list[Nexus]]:
        """The change of :meth:`admin_preempt` (under the lock): what was removed,
        and the live nexuses whose tasks must be aborted."""
        names = {normalize_port(i) for i in initiators}
        key_set = set(keys)
        removed = [r for r in self.regs.values()
                   if r.initiator.partition(",")[0] in names or r.initiator in names
                   or r.key in key_set]
        if not removed:
            return {"registrations": 0, "released": False}, []
        nexuses = self._nexuses(removed)
        old_type = self.type
        released = self._remove(removed)
        self._ua(removed, UA_REGISTRATIONS_PREEMPTED, None)
        if released and old_type in REGISTRANTS_TYPES:
            self._ua(self.regs.values(), UA_RESERVATIONS_RELEASED, None)
        self._record_abort(removed, None)
        self._bump()
        self._changed()
        return {"registrations": len(removed), "released": released}, nexuses

    async def admin_preempt_everywhere(self, initiators: Iterable[str],
                                       keys: Iterable[int]) -> dict[str, Any]:
        """:meth:`admin_preempt` through the PR backend: on an LU several nodes
        serve, every node removes the registrations and aborts the tasks
        before this returns (call from the daemon's event loop)."""
        out: dict[str, Any] = {"registrations": 0, "released": False}
        nexuses: list[Nexus] = []

        def fn() -> ScsiResult:
            got, live = self._admin_preempt(initiators, keys)
            out.update(got)
            nexuses.extend(live)
            return ScsiResult()

        await self.backend.arun(self, lambda: self.change(fn))
        _run_abort_hooks(self.lu, nexuses)
        return out

    # ------------------------------------------------------------ resets, nexus loss
    def _on_reset(self, lu: LogicalUnit, asc: int, ascq: int) -> None:
        # LUN reset / target reset release SPC-2 reservations (SPC-2 §5.5.1);
        # persistent reservations are not affected (SPC-4 §5.14.1).
        if self.spc2 is not None:
            with self.lock:
                self.spc2 = None
                self.sync_access_check()

    def _on_nexus_lost(self, lu: LogicalUnit, nexus: Nexus) -> None:
        # Nexus loss releases the SPC-2 reservation it held; registrations stay.
        if self.spc2 == (nexus.initiator_port, nexus.target_port):
            with self.lock:
                self.spc2 = None
                self.sync_access_check()

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state, as saved for APTPL (storaged.state.pr.PrRecord)."""
        regs = []
        for r in self.regs.values():
            d = r.to_dict()
            d["holder"] = r is self.holder
            regs.append(d)
        return {"generation": self.generation, "aptpl": self.aptpl, "type": self.type,
                "scope": self.scope, "registrations": regs, "seq": self.seq}

    def restore(self, data: dict[str, Any]) -> None:
        """Load a saved state (APTPL restart); inconsistent parts are dropped."""
        with self.lock:
            self.clear_all()
            self.generation = int(data.get("generation", 0)) & 0xFFFFFFFF
            self.seq = max(0, int(data.get("seq", 0)))
            self.aptpl = bool(data.get("aptpl", False))
            holder = None
            for d in data.get("registrations", []):
                try:
                    reg = self._add(int(d["key"]), normalize_port(str(d["initiator"])),
                                    str(d.get("target_port", "")).lower(),
                                    int(d.get("relative_port_id", 0)),
                                    bytes.fromhex(d.get("transport_id", "")))
                except (KeyError, TypeError, ValueError):
                    log.warning("%s: skipping bad saved registration %r", self.lu.name, d)
                    continue
                if not reg.transport_id:
                    reg.transport_id = encode_transport_id(reg.initiator)
                if d.get("holder"):
                    holder = reg
            ptype = int(data.get("type", 0))
            if ptype in VALID_TYPES and self.regs and (holder or ptype in ALL_REGISTRANTS):
                self.type = ptype
                self.scope = LU_SCOPE
                self.holder = holder or next(iter(self.regs.values()))
            self._saved = self.aptpl
            self._cache = {}
            self.sync_access_check()

    def describe(self) -> dict[str, Any]:
        """Registrations and reservations for ``storaged pr ls`` (live)."""
        with self.lock:
            out = describe_state(self.to_dict())
            out["seq"] = self.seq
            out["spc2_reservation"] = None if self.spc2 is None else \
                {"initiator": self.spc2[0], "target_port": self.spc2[1]}
            return out


def _pairs(regs: Iterable[Registration]) -> list[list[str]]:
    return [[r.initiator, r.target_port] for r in regs]


def _skip(nexus: Nexus | None) -> list[str] | None:
    return None if nexus is None else [nexus.initiator_port, nexus.target_port]


def _result_text(result: ScsiResult) -> str:
    if result.status == Status.CHECK_CONDITION and result.sense and len(result.sense) > 13:
        s = result.sense
        return f"sense key {s[2] & 0x0F:#x}, ASC/ASCQ {s[12]:02x}h/{s[13]:02x}h"
    return f"status {int(result.status):#04x}"


def _run_abort_hooks(lu: LogicalUnit, nexuses: Iterable[Nexus]) -> None:
    """Abort every task of these nexuses on ``lu`` (PREEMPT AND ABORT, fencing)."""
    for n in nexuses:
        for hook in list(lu.abort_hooks):
            try:
                hook(lu, n)
            except Exception:  # noqa: BLE001 - the preempt itself must complete
                log.exception("%s: aborting tasks of %s failed", lu.name, n.initiator_port)


def describe_state(state: dict[str, Any]) -> dict[str, Any]:
    """Display form of a :meth:`PersistentReservations.to_dict` state (live or
    saved): keys in hex, "*" for all target ports, holders marked."""
    ptype = int(state.get("type", 0))
    all_reg = ptype in ALL_REGISTRANTS
    regs = []
    holder = None
    for r in state.get("registrations", []):
        is_holder = bool(ptype) and (all_reg or bool(r.get("holder")))
        if r.get("holder"):
            holder = r
        regs.append({"key": f"0x{int(r['key']):016x}", "initiator": r["initiator"],
                     "target_port": r.get("target_port") or "*",
                     "all_tg_pts": not r.get("target_port"),
                     "relative_port_id": r.get("relative_port_id", 0), "holder": is_holder})
    reservation = None
    if ptype in VALID_TYPES:
        single = not all_reg and holder is not None
        reservation = {
            "type": ptype, "type_name": TYPE_NAMES[ptype], "scope": state.get("scope", 0),
            "key": f"0x{int(holder['key']) if single else 0:016x}",   # type: ignore[index]
            "holder": {"initiator": holder["initiator"],              # type: ignore[index]
                       "target_port": holder.get("target_port") or "*"}  # type: ignore
            if single else None,
        }
    return {"generation": int(state.get("generation", 0)), "aptpl": bool(state.get("aptpl")),
            "registrations": regs, "reservation": reservation, "spc2_reservation": None}


# ---------------------------------------------------------------- access check
# Plain ints: IntEnum compares at C speed, but hashes in Python (no set lookups here).
_ALLOWED = int(Access.ALLOWED)
_READ = int(Access.READ)
_PERSISTENT = int(Access.PERSISTENT)
_RESERVE = int(Access.RESERVE)
_EA = int(PrType.EXCLUSIVE_ACCESS)


def access_check(lu: LogicalUnit, cmd: ScsiCommand, spec: CommandSpec) -> ScsiResult | None:
    """RESERVATION CONFLICT, or None to run the command (see the module docstring).

    Installed as ``lu.access_check`` only while a persistent or SPC-2
    reservation exists.  With fence_scsi's Write Exclusive - Registrants
    Only reservation in place for the cluster's lifetime this runs for every
    command, so reads return before any lookup and writes cost one dict hit."""
    st: PersistentReservations = lu.pr
    acc = spec.access
    spc2 = st.spc2
    if spc2 is not None:
        nexus = cmd.nexus
        if (nexus.initiator_port, nexus.target_port) == spc2:
            # PERSISTENT RESERVE IN/OUT conflict while an SPC-2 reservation
            # exists, whoever sends them (SPC-4 §6.15.1, §6.16.1).
            return conflict() if acc == _PERSISTENT else None
        # Other nexuses: only INQUIRY, REPORT LUNS, REQUEST SENSE and
        # RESERVE/RELEASE (which decide themselves) get through (SPC-2 §5.5.1).
        if spec.ua_exempt or acc == _RESERVE:
            return None
        return conflict()
    ptype = st.type
    if not ptype or acc == _ALLOWED or acc == _PERSISTENT or acc == _RESERVE:
        return None
    if acc == _READ and ptype in READ_SHARED:
        return None
    reg = st.find(cmd.nexus)
    if reg is not None and (reg is st.holder or ptype in ALL_REGISTRANTS):
        return None
    if acc == _READ:
        # Exclusive Access: holder only; EA - RO / AR: registrants too.
        return None if reg is not None and ptype != _EA else conflict()
    # WRITE and CONFLICT classes: registrants of RO / AR types, else the holder only.
    return None if reg is not None and ptype in REGISTRANTS_TYPES else conflict()


# ---------------------------------------------------------------- PERSISTENT RESERVE IN
def _prin_usage(sa: int) -> list[int]:
    # CDB usage data carries the service action itself (SPC-4 §6.35.3).
    return [PR_IN, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]


def _prin(lu: LogicalUnit, cmd: ScsiCommand, build: Callable[[PersistentReservations],
                                                              bytes]) -> ScsiResult:
    alloc = _be16(cmd.cdb, 7)
    st = lu.pr
    refused = st.backend.stale(st)
    if refused is not None:
        return refused
    with st.lock:
        data = build(st)
    return ScsiResult(data=data[:alloc])


def _read_keys(st: PersistentReservations) -> bytes:
    keys = b"".join(r.key.to_bytes(8, "big") for r in st.regs.values())
    return st.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys


def _read_reservation(st: PersistentReservations) -> bytes:
    body = b""
    if st.type:
        # All-registrants reservations report key zero (SPC-4 §6.15.3.2).
        key = 0 if st.type in ALL_REGISTRANTS or st.holder is None else st.holder.key
        body = key.to_bytes(8, "big") + bytes(5) + bytes(((st.scope << 4) | st.type,)) \
            + bytes(2)
    return st.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def _report_capabilities(st: PersistentReservations) -> bytes:
    d = bytearray(8)
    d[1] = 8                                        # LENGTH
    d[2] = 0x10 | 0x08 | 0x04 | 0x01                # CRH, SIP_C, ATP_C, PTPL_C
    d[3] = 0x80 | (1 << 4) | (0x01 if st.aptpl else 0)   # TMV, ALLOW COMMANDS 001b, PTPL_A
    d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02         # WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
    d[5] = 0x01                                     # EX_AC_AR
    return bytes(d)


def _read_full_status(st: PersistentReservations) -> bytes:
    out = bytearray()
    for r in st.regs.values():
        holder = st.is_holder(r)
        tid = r.transport_id
        d = bytearray(24)
        d[0:8] = r.key.to_bytes(8, "big")
        d[12] = (0x02 if r.all_tg_pts else 0) | (0x01 if holder else 0)
        d[13] = ((st.scope << 4) | st.type) if holder else 0
        d[18:20] = (r.relative_port_id & 0xFFFF).to_bytes(2, "big")
        d[20:24] = len(tid).to_bytes(4, "big")
        out += d + tid
    return st.generation.to_bytes(4, "big") + len(out).to_bytes(4, "big") + bytes(out)


@COMMANDS.register(PR_IN, "PERSISTENT RESERVE IN", 10, _prin_usage(READ_KEYS),
                   sa=READ_KEYS, access=Access.PERSISTENT, medium=False)
def prin_read_keys(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _prin(lu, cmd, _read_keys)


@COMMANDS.register(PR_IN, "PERSISTENT RESERVE IN", 10, _prin_usage(READ_RESERVATION),
                   sa=READ_RESERVATION, access=Access.PERSISTENT, medium=False)
def prin_read_reservation(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _prin(lu, cmd, _read_reservation)


@COMMANDS.register(PR_IN, "PERSISTENT RESERVE IN", 10, _prin_usage(REPORT_CAPABILITIES),
                   sa=REPORT_CAPABILITIES, access=Access.PERSISTENT, medium=False)
def prin_report_capabilities(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _prin(lu, cmd, _report_capabilities)


@COMMANDS.register(PR_IN, "PERSISTENT RESERVE IN", 10, _prin_usage(READ_FULL_STATUS),
                   sa=READ_FULL_STATUS, access=Access.PERSISTENT, medium=False)
def prin_read_full_status(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _prin(lu, cmd, _read_full_status)


# ---------------------------------------------------------------- PERSISTENT RESERVE OUT


@dataclass(slots=True)
class _Params:
    """A decoded PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3)."""

    key: int              # RESERVATION KEY
    sa_key: int           # SERVICE ACTION RESERVATION KEY
    spec_i_pt: bool
    all_tg_pts: bool
    aptpl: bool
    data: bytes
    scope: int
    type: int


class _Out:
    """One PERSISTENT RESERVE OUT command being processed."""

    __slots__ = ("lu", "st", "cmd", "nexus", "p")

    def __init__(self, lu: LogicalUnit, cmd: ScsiCommand, p: _Params) -> None:
        self.lu = lu
        self.st: PersistentReservations = lu.pr
        self.cmd = cmd
        self.nexus = cmd.nexus
        self.p = p

    def done(self, plen: int) -> ScsiResult:
        error = self.st._changed()
        if error is not None:
            return error
        return ScsiResult(transfer_length=plen)

    def caller(self) -> Registration | None:
        return self.st.find(self.nexus)

    def keyed_caller(self) -> Registration | ScsiResult:
        """The caller's registration if RESERVATION KEY matches it, else CONFLICT."""
        reg = self.caller()
        if reg is None or reg.key != self.p.key:
            return conflict()
        return reg

    def check_scope_type(self) -> ScsiResult | None:
        if self.p.scope != LU_SCOPE:
            return self.lu.invalid_cdb(2, 7)
        if self.p.type not in VALID_TYPES:
            return self.lu.invalid_cdb(2, 3)
        return None


def _parse_tids(lu: LogicalUnit, data: bytes, start: int, length: int
                ) -> list[str] | ScsiResult:
    """TransportIDs of a SPEC_I_PT parameter list."""
    out: list[str] = []
    pos = start
    end = start + length
    while pos < end:
        got = decode_transport_id(data[:end], pos)
        if got is None:
            return lu.invalid_param(pos)
        out.append(got[0])
        pos += got[1]
    return out


def _register(o: _Out, plen: int, ignore: bool) -> ScsiResult:
    """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.14.7, table 60)."""
    st, p, lu = o.st, o.p, o.lu
    reg = o.caller()
    if reg is not None:
        if not ignore and reg.key != p.key:
            return conflict()
        if p.spec_i_pt:                 # only an unregistered nexus may use it
            return lu.invalid_param(20, 3)
        if plen != BASIC_PARAM_LEN:
            return lu.param_list_length_error()
        st.aptpl = p.aptpl
        st._bump()
        if p.sa_key == 0:
            # Unregister.  A registrants-only reservation held by this nexus
            # goes with it and the others hear RESERVATIONS RELEASED
            # (SPC-4 §5.14.11.2.2); all-registrants ones live on until the
            # last registrant leaves.
            was = st.type
            others = [r for r in st.regs.values() if r is not reg]
            if st._remove([reg]) and was in (5, 6):
                st._ua(others, UA_RESERVATIONS_RELEASED, o.nexus)
        else:
            reg.key = p.sa_key
        return o.done(plen)
    # Not registered.
    if not ignore and p.key != 0:
        return conflict()
    tids: list[str] = []
    if p.spec_i_pt:
        if plen < BASIC_PARAM_LEN + 4:
            return lu.param_list_length_error()
        tpdl = _be32(p.data, 24)
        if BASIC_PARAM_LEN + 4 + tpdl != plen:
            return lu.param_list_length_error()
        got = _parse_tids(lu, p.data, 28, tpdl)
        if isinstance(got, ScsiResult):
            return got
        tids = got
    elif plen != BASIC_PARAM_LEN:
        return lu.param_list_length_error()
    if p.sa_key == 0:
        return ScsiResult(transfer_length=plen)    # nothing to do (table 60)
    port, _name, tp = initiator_ids(o.nexus)
    target = "" if p.all_tg_pts else tp
    rel = o.nexus.relative_port_id
    st._add(p.sa_key, port, target, rel, nexus_transport_id(o.nexus))
    for ini in tids:
        # Already registered I_T nexuses keep their registration.
        name = ini.partition(",")[0]
        if st._find_ids(ini, name, tp) is None:
            st._add(p.sa_key, ini, target, rel, encode_transport_id(ini))
    st.aptpl = p.aptpl
    st._bump()
    return o.done(plen)


def _reserve(o: _Out, plen: int) -> ScsiResult:
    """RESERVE (SPC-4 §5.14.9)."""
    bad = o.check_scope_type()
    if bad is not None:
        return bad
    reg = o.keyed_caller()
    if isinstance(reg, ScsiResult):
        return reg
    st = o.st
    if st.type:
        # The holder may repeat the same reservation; changing its type or
        # scope, or anyone else reserving, conflicts.
        if st.is_holder(reg) and st.type == o.p.type and st.scope == o.p.scope:
            return ScsiResult(transfer_length=plen)
        return conflict()
    st.type = o.p.type
    st.scope = o.p.scope
    st.holder = reg
    return o.done(plen)


def _release(o: _Out, plen: int) -> ScsiResult:
    """RELEASE (SPC-4 §5.14.11.2)."""
    reg = o.keyed_caller()
    if isinstance(reg, ScsiResult):
        return reg
    st, p = o.st, o.p
    if not st.type or not st.is_holder(reg):
        return ScsiResult(transfer_length=plen)     # nothing of ours to release
    if p.scope != st.scope or p.type != st.type:
        return o.lu.check(Key.ILLEGAL_REQUEST, 0x26, 0x04)  # INVALID RELEASE OF PR
    was = st.type
    st._release()
    if was in REGISTRANTS_TYPES:
        st._ua(st.regs.values(), UA_RESERVATIONS_RELEASED, o.nexus)
    return o.done(plen)


def _clear(o: _Out, plen: int) -> ScsiResult:
    """CLEAR (SPC-4 §5.14.11.6)."""
    reg = o.keyed_caller()
    if isinstance(reg, ScsiResult):
        return reg
    st = o.st
    st._ua(st.regs.values(), UA_RESERVATIONS_PREEMPTED, o.nexus)
    st.clear_all()
    st._bump()
    return o.done(plen)


def _preempt(o: _Out, plen: int, abort: bool) -> ScsiResult:
    """PREEMPT and PREEMPT AND ABORT (SPC-4 §5.14.11.4, §5.14.11.5)."""
    reg = o.keyed_caller()
    if isinstance(reg, ScsiResult):
        return reg
    st, p = o.st, o.p
    sark = p.sa_key
    all_reg = st.type in ALL_REGISTRANTS
    holder_key = None if not st.type or all_reg or st.holder is None else st.holder.key
    if (all_reg and sark == 0) or (holder_key is not None and sark == holder_key):
        # Preempt the reservation: every registration with that key (all
        # others, for all-registrants with key zero) goes, except the
        # caller's; the caller then holds a reservation of the new type.
        bad = o.check_scope_type()
        if bad is not None:
            return bad
        removed = [r for r in st.regs.values()
                   if r is not reg and (all_reg or r.key == sark)]
        old_type, old_scope, old_holder = st.type, st.scope, st.holder
        st._remove(removed)
        st.type, st.scope, st.holder = p.type, p.scope, reg
        lost = list(removed)
        if old_holder is not None and old_holder is not reg and old_holder not in lost:
            lost.append(old_holder)
        st._ua(lost, UA_REGISTRATIONS_PREEMPTED, o.nexus)
        if (old_type, old_scope) != (p.type, p.scope):
            st._ua(st.regs.values(), UA_RESERVATIONS_RELEASED, o.nexus)
    else:
        # Only remove registrations (SPC-4 §5.14.11.4.4); type and scope
        # are ignored and the reservation, if any, stays.
        if sark == 0:
            return o.lu.invalid_param(8)
        removed = [r for r in st.regs.values() if r.key == sark]
        if not removed:
            return conflict()
        st._remove(removed)
        st._ua(removed, UA_REGISTRATIONS_PREEMPTED, o.nexus)
    if abort and removed:
        _abort_tasks(o.lu, st._nexuses(removed), o.nexus)
        st._record_abort(removed, o.nexus)
    st._bump()
    return o.done(plen)


def _abort_tasks(lu: LogicalUnit, nexuses: list[Nexus], caller: Nexus) -> None:
    """PREEMPT AND ABORT: abort the preempted nexuses' tasks (SPC-4 §5.14.11.5),
    never the caller's (its own PREEMPT AND ABORT is still running)."""
    _run_abort_hooks(lu, [n for n in nexuses if not PersistentReservations._same(n, caller)])


def _register_and_move(o: _Out, plen: int) -> ScsiResult:
    """REGISTER AND MOVE (SPC-4 §5.14.8)."""
    lu, st, p = o.lu, o.st, o.p
    data = p.data
    if plen < BASIC_PARAM_LEN:
        return lu.param_list_length_error()
    tpdl = _be32(data, 20)
    if BASIC_PARAM_LEN + tpdl != plen:
        return lu.param_list_length_error()
    reg = o.keyed_caller()
    if isinstance(reg, ScsiResult):
        return reg
    if not st.type or st.type in ALL_REGISTRANTS or reg is not st.holder:
        return conflict()
    if p.sa_key == 0:
        return lu.invalid_param(8)
    got = decode_transport_id(data[:BASIC_PARAM_LEN + tpdl], BASIC_PARAM_LEN)
    if got is None:
        return lu.invalid_param(BASIC_PARAM_LEN)
    dest_ini = got[0]
    rel = _be16(data, 18)
    port, name, tp = initiator_ids(o.nexus)
    if rel == o.nexus.relative_port_id:
        dest_tp = tp
    else:
        ports = {n.target_port.lower() for n in lu.nexuses() if n.relative_port_id == rel}
        ports |= {r.target_port for r in st.regs.values()
                  if r.relative_port_id == rel and r.target_port}
        if len(ports) != 1:
            return lu.invalid_param(18)
        dest_tp = ports.pop()
    dest_name = dest_ini.partition(",")[0]
    if dest_tp == tp and dest_ini in (port, name):
        return lu.invalid_param(BASIC_PARAM_LEN)    # moving to ourselves
    unreg = bool(data[17] & 0x02)
    dest = st._find_ids(dest_ini, dest_name, dest_tp)
    if dest is None:
        dest = st._add(p.sa_key, dest_ini, dest_tp, rel, encode_transport_id(dest_ini))
    else:
        dest.key = p.sa_key
    st.holder = dest
    if unreg:
        st._remove([reg])
    st.aptpl = bool(data[17] & 0x01)
    st._bump()
    return o.done(plen)


def _prout(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    sa = cdb[1] & 0x1F
    plen = _be32(cdb, 5)
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    if plen < BASIC_PARAM_LEN or len(data) < plen:
        return lu.param_list_length_error()
    flags = data[20]
    p = _Params(_be64(data, 0), _be64(data, 8), bool(flags & 0x08), bool(flags & 0x04),
                bool(flags & 0x01), data, cdb[2] >> 4, cdb[2] & 0x0F)
    if sa == REGISTER_AND_MOVE:
        p.spec_i_pt = p.all_tg_pts = False      # byte 20 is the TransportID length there
    elif p.spec_i_pt and sa != REGISTER:
        return lu.invalid_param(20, 3)
    elif sa not in (REGISTER, REGISTER_AND_MOVE) and plen != BASIC_PARAM_LEN:
        return lu.param_list_length_error()
    o = _Out(lu, cmd, p)
    st = o.st
    return st.backend.run(st, lambda: st.change(lambda: _dispatch_out(o, sa, plen)))


def _dispatch_out(o: _Out, sa: int, plen: int) -> ScsiResult:
    """Run one PERSISTENT RESERVE OUT service action (under the PR lock)."""
    if sa == REGISTER:
        return _register(o, plen, False)
    if sa == REGISTER_AND_IGNORE_EXISTING_KEY:
        return _register(o, plen, True)
    if sa == RESERVE:
        return _reserve(o, plen)
    if sa == RELEASE:
        return _release(o, plen)
    if sa == CLEAR:
        return _clear(o, plen)
    if sa == PREEMPT:
        return _preempt(o, plen, False)
    if sa == PREEMPT_AND_ABORT:
        return _preempt(o, plen, True)
    return _register_and_move(o, plen)


for _sa in SA_NAMES:
    COMMANDS.register(PR_OUT, "PERSISTENT RESERVE OUT", 10,
                      [PR_OUT, _sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C], sa=_sa,
                      access=Access.PERSISTENT, medium=False)(_prout)


# ---------------------------------------------------------------- SPC-2 RESERVE / RELEASE
def _spc2_exempt(st: PersistentReservations, nexus: Nexus) -> bool:
    """SPC-4 §5.14.3: RESERVE/RELEASE from the persistent reservation holder,
    or from a registrant of a registrants-only / all-registrants reservation,
    complete with GOOD and change nothing."""
    reg = st.find(nexus)
    if reg is None or not st.type:
        return False
    return st.is_holder(reg) or st.type in REGISTRANTS_TYPES


def _spc2(lu: LogicalUnit, cmd: ScsiCommand, reserve: bool, ten: bool) -> ScsiResult:
    cdb = cmd.cdb
    if ten and cdb[1] & 0x10:          # 3RDPTY: third-party reservations are not supported
        return lu.invalid_cdb(1, 4)
    if ten and cdb[1] & 0x02:          # LONGID without 3RDPTY
        return lu.invalid_cdb(1, 1)
    st: PersistentReservations = lu.pr
    nexus = cmd.nexus
    me = (nexus.initiator_port, nexus.target_port)
    with st.lock:
        if st.regs:
            # While any registration exists RESERVE and RELEASE conflict
            # (SPC-2 §5.5.1), except for the §5.14.3 cases.
            return ScsiResult(transfer_length=0) if _spc2_exempt(st, nexus) else conflict()
        if reserve:
            if st.spc2 is not None and st.spc2 != me:
                return conflict()
            st.spc2 = me
        elif st.spc2 == me:
            st.spc2 = None
        # RELEASE from a nexus that holds nothing completes with GOOD (SPC-2 §7.17).
        st.sync_access_check()
    return ScsiResult(transfer_length=0)


RESERVE6_USAGE = [0x16, 0, 0, 0, 0, C]
RELEASE6_USAGE = [0x17, 0, 0, 0, 0, C]
RESERVE10_USAGE = [0x56, 0x12, 0, 0, 0, 0, 0, 0, 0, C]
RELEASE10_USAGE = [0x57, 0x12, 0, 0, 0, 0, 0, 0, 0, C]


@COMMANDS.register(0x16, "RESERVE(6)", 6, RESERVE6_USAGE, access=Access.RESERVE, medium=False)
def reserve6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _spc2(lu, cmd, True, False)


@COMMANDS.register(0x17, "RELEASE(6)", 6, RELEASE6_USAGE, access=Access.RESERVE, medium=False)
def release6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _spc2(lu, cmd, False, False)


@COMMANDS.register(0x56, "RESERVE(10)", 10, RESERVE10_USAGE, access=Access.RESERVE, medium=False)
def reserve10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _spc2(lu, cmd, True, True)


@COMMANDS.register(0x57, "RELEASE(10)", 10, RELEASE10_USAGE, access=Access.RESERVE, medium=False)
def release10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _spc2(lu, cmd, False, True)


__all__ = [
    "ALL_REGISTRANTS", "PersistentReservations", "PrStore", "PrType", "Registration",
    "TYPE_NAMES", "access_check", "conflict", "decode_transport_id", "describe_state",
    "encode_transport_id",
    "initiator_ids", "nexus_transport_id", "normalize_port",
]
