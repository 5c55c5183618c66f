"""The SCSI command tables: every command set, listed once, put together.

Which commands a logical unit understands is decided here and nowhere else:
the modules of each command set only declare their specs
(:class:`storaged.scsi.commands.CommandSet`).
"""

from __future__ import annotations

from storaged.scsi import alua, atomic, pr, sanitize, sbc, spc, thin, xcopy
from storaged.scsi.commands import CommandSet, CommandTable

#: Every command set a storaged LU implements.
COMMAND_SETS: tuple[CommandSet, ...] = (
    spc.COMMANDS,       # SPC-4 primary commands: INQUIRY, REPORT LUNS, MODE SENSE, ...
    sbc.COMMANDS,       # SBC-3 block commands: READ/WRITE, VERIFY, SYNCHRONIZE CACHE, ...
    thin.COMMANDS,      # SBC-3 §4.7 thin provisioning: UNMAP, WRITE SAME, GET LBA STATUS
    atomic.COMMANDS,    # COMPARE AND WRITE, ORWRITE, WRITE ATOMIC
    pr.COMMANDS,        # SPC-4 §5.14 reservations: PERSISTENT RESERVE IN/OUT, RESERVE/RELEASE
    alua.COMMANDS,      # SPC-4 §5.16 ALUA: REPORT/SET TARGET PORT GROUPS
    sanitize.COMMANDS,  # SBC-3 §4.11 SANITIZE
    xcopy.COMMANDS,     # SPC-4 §6.4 EXTENDED COPY (LID1) and RECEIVE COPY RESULTS
)


def build_table(sets: tuple[CommandSet, ...] = COMMAND_SETS) -> CommandTable:
    """A table of every spec of ``sets``; two sets claiming one command is a bug."""
    table = CommandTable()
    owner: dict[tuple[int, int | None], str] = {}
    for cset in sets:
        for spec in cset.specs:
            key = (spec.opcode, spec.sa)
            if key in owner:
                raise ValueError(f"{spec.name} is declared by both {owner[key]} and {cset.name}")
            owner[key] = cset.name
            table.register(spec)
    return table


DEFAULT_TABLE = build_table()
"""The table of a thin-provisioned LU: every command."""

THICK_TABLE = DEFAULT_TABLE.copy()
"""A fully provisioned LU's table: without UNMAP and SANITIZE BLOCK ERASE, so
REPORT SUPPORTED OPERATION CODES does not offer what SBC-3 only allows with
LBPME=1; GET LBA STATUS stays and reports every LBA mapped."""
THICK_TABLE.unregister(thin.UNMAP_OPCODE)
THICK_TABLE.unregister(*thin.BLOCK_ERASE)


def command_table(thin_provisioned: bool) -> CommandTable:
    """The table for a thin LU (everything) or a fully provisioned one."""
    return DEFAULT_TABLE if thin_provisioned else THICK_TABLE
