"""The command table: opcode (and service action) -> handler plus metadata.

Every SCSI command the logical unit understands is one :class:`CommandSpec`
registered in a :class:`CommandTable`.  The spec carries everything the
generic dispatcher and REPORT SUPPORTED OPERATION CODES need:

* ``cdb_len`` and ``usage``: the CDB length and the CDB usage bitmap
  (SPC-4 §6.35.3): byte 0 is the opcode, the service action sits where the
  CDB carries it, every other bit is 1 when the device server looks at it;
* ``access``: the command's class for reservation checks (see
  :class:`Access`) - the reservation module plugs a check in front of the
  handler through :attr:`LogicalUnit.access_check`;
* ``medium``: needs the medium (NOT READY while the LU is offline);
* ``ua_exempt``: neither reports nor clears unit attentions (INQUIRY,
  REPORT LUNS, REQUEST SENSE; SPC-4 §5.14 / SAM-5 §5.14);
* ``write``: changes the medium (DATA PROTECT on a write-protected LU is the
  handler's job; this flag picks WRITE ERROR over UNRECOVERED READ ERROR for
  device failures and tells the transport the command may block on the disk);
* ``slow``: may block on the disk for long (flushes): run off the event loop.

Each command set (SPC, SBC, thin provisioning, PERSISTENT RESERVE, ALUA,
SANITIZE, EXTENDED COPY, ...) declares its specs in its own module with a
:class:`CommandSet`; :mod:`storaged.scsi.table` lists the sets and builds
the tables LUs use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit
    from storaged.scsi.types import ScsiCommand, ScsiResult

Handler = Callable[["LogicalUnit", "ScsiCommand"], "ScsiResult"]


class Access(enum.IntEnum):
    """How a command interacts with reservations (SPC-4 §5.13.1, table 45).

    The reservation check (next issue) maps (access class, reservation type,
    registered/holder) to allowed or RESERVATION CONFLICT.
    """

    ALLOWED = 0       # allowed under any reservation (INQUIRY, REPORT LUNS, ...)
    READ = 1          # reads the medium: conflicts only for exclusive-access types
    WRITE = 2         # writes the medium: conflicts for write- and exclusive types
    CONFLICT = 3      # conflicts for every non-holder (MODE SELECT, START STOP, ...)
    PERSISTENT = 4    # PERSISTENT RESERVE IN/OUT: the command checks itself
    RESERVE = 5       # RESERVE/RELEASE(6/10): SPC-2 reservation commands


# Service-action field locations for the opcodes that carry one.
def _sa_byte1(cdb: bytes) -> int:
    return cdb[1] & 0x1F if len(cdb) >= 2 else -1


def _sa_var(cdb: bytes) -> int:  # 0x7F variable length CDB: bytes 8-9
    return (cdb[8] << 8) | cdb[9] if len(cdb) >= 10 else -1


SA_LOCATORS: dict[int, Callable[[bytes], int]] = {
    0x7F: _sa_var,
    0x9E: _sa_byte1,   # SERVICE ACTION IN(16)
    0x9F: _sa_byte1,   # SERVICE ACTION OUT(16)
    0xA3: _sa_byte1,   # MAINTENANCE IN
    0xA4: _sa_byte1,   # MAINTENANCE OUT
    0x5E: _sa_byte1,   # PERSISTENT RESERVE IN
    0x5F: _sa_byte1,   # PERSISTENT RESERVE OUT
    0x83: _sa_byte1,   # EXTENDED COPY / third-party copy OUT
    0x84: _sa_byte1,   # RECEIVE COPY RESULTS / third-party copy IN
    0x48: _sa_byte1,   # SANITIZE
}
"""Opcodes whose commands are told apart by a service action (SERVACTV=1).
PERSISTENT RESERVE IN/OUT and SANITIZE are listed with a service action in
REPORT SUPPORTED OPERATION CODES too."""

# Where the service action field starts, for the INVALID FIELD IN CDB pointer.
SA_FIELD: dict[int, tuple[int, int]] = {0x7F: (8, 7)}
DEFAULT_SA_FIELD = (1, 4)


@dataclass(slots=True, frozen=True)
class CommandSpec:
    opcode: int
    name: str
    handler: Handler
    cdb_len: int
    usage: bytes
    sa: int | None = None
    access: Access = Access.ALLOWED
    medium: bool = True
    ua_exempt: bool = False
    write: bool = False
    slow: bool = False
    nominal_timeout: int = 0      # seconds, for RCTD timeouts descriptors
    recommended_timeout: int = 30

    def __post_init__(self) -> None:
        if len(self.usage) != self.cdb_len:
            raise ValueError(f"{self.name}: usage map has {len(self.usage)} bytes, "
                             f"CDB has {self.cdb_len}")
        if self.usage[0] != self.opcode:
            raise ValueError(f"{self.name}: usage map must start with the opcode")


class CommandTable:
    """Opcode -> spec, or opcode -> {service action -> spec}."""

    def __init__(self) -> None:
        self.plain: list[CommandSpec | None] = [None] * 256
        self.by_sa: dict[int, dict[int, CommandSpec]] = {}

    def register(self, spec: CommandSpec) -> CommandSpec:
        op = spec.opcode
        if op in SA_LOCATORS:
            if spec.sa is None:
                raise ValueError(f"{spec.name}: opcode {op:#04x} needs a service action")
            self.by_sa.setdefault(op, {})[spec.sa] = spec
        else:
            if spec.sa is not None:
                raise ValueError(f"{spec.name}: opcode {op:#04x} has no service actions")
            self.plain[op] = spec
        return spec

    def unregister(self, opcode: int, sa: int | None = None) -> None:
        if sa is None:
            self.plain[opcode] = None
        else:
            self.by_sa.get(opcode, {}).pop(sa, None)

    def copy(self) -> CommandTable:
        other = CommandTable()
        other.plain = list(self.plain)
        other.by_sa = {op: dict(sas) for op, sas in self.by_sa.items()}
        return other

    def has_service_actions(self, opcode: int) -> bool:
        return opcode in SA_LOCATORS

    def find(self, opcode: int, sa: int | None = None) -> CommandSpec | None:
        if opcode in SA_LOCATORS:
            if sa is None:
                return None
            return self.by_sa.get(opcode, {}).get(sa)
        return self.plain[opcode]

    def known_opcode(self, opcode: int) -> bool:
        return self.plain[opcode] is not None or bool(self.by_sa.get(opcode))

    def all(self) -> list[CommandSpec]:
        """Every supported command, ordered by (opcode, service action)."""
        out = [s for s in self.plain if s is not None]
        for sas in self.by_sa.values():
            out.extend(sas.values())
        out.sort(key=lambda s: (s.opcode, s.sa or 0))
        return out


class CommandSet:
    """The commands one module implements (``COMMANDS = CommandSet("sbc")``).

    Handlers are declared with ``@COMMANDS.register(...)``.  Nothing enters a
    table until :func:`storaged.scsi.table.build_table` puts the sets that
    :data:`storaged.scsi.table.COMMAND_SETS` lists together, so which commands
    an LU knows never depends on which modules happened to be imported.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.specs: list[CommandSpec] = []

    def register(self, opcode: int, name: str, cdb_len: int, usage: bytes | list[int], *,
                 sa: int | None = None, access: Access = Access.ALLOWED, medium: bool = True,
                 ua_exempt: bool = False, write: bool = False, slow: bool = False,
                 nominal_timeout: int = 0, recommended_timeout: int = 30
                 ) -> Callable[[Handler], Handler]:
        """Decorator: declare ``handler(lu, cmd) -> ScsiResult`` for a command."""

        def deco(fn: Handler) -> Handler:
            self.specs.append(CommandSpec(
                opcode, name, fn, cdb_len, bytes(usage), sa, access, medium, ua_exempt,
                write, slow, nominal_timeout, recommended_timeout))
            return fn

        return deco
