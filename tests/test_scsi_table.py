"""The command table is built from the listed command sets, whatever was imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from storaged.scsi.commands import CommandSet
from storaged.scsi.table import COMMAND_SETS, DEFAULT_TABLE, THICK_TABLE, build_table


def test_fresh_interpreter_lu_knows_every_command_set():
    # Only the LU module imported: the table holds every listed set, not just the
    # modules that some import chain happened to load.
    code = ("from storaged.scsi.lu import LogicalUnit\n"
            "from storaged.scsi.table import DEFAULT_TABLE as t\n"
            "print(sorted({(s.opcode, s.sa) for s in t.all()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    expected = sorted({(s.opcode, s.sa) for cs in COMMAND_SETS for s in cs.specs})
    assert out.strip() == str(expected)
    for opcode, sa in ((0x5E, 0x00), (0x5F, 0x01), (0xA3, 0x0A), (0x83, 0x00), (0x89, None)):
        assert (opcode, sa) in expected  # PR IN/OUT, REPORT TPGS, EXTENDED COPY, CAW


def test_table_is_the_union_of_the_sets_and_thick_drops_unmap():
    assert len(DEFAULT_TABLE.all()) == sum(len(cs.specs) for cs in COMMAND_SETS)
    assert DEFAULT_TABLE.find(0x42) is not None and THICK_TABLE.find(0x42) is None
    assert THICK_TABLE.find(0x48, 0x02) is None and THICK_TABLE.find(0x9E, 0x12) is not None


def test_a_command_declared_twice_is_refused():
    a, b = CommandSet("a"), CommandSet("b")
    for cs in (a, b):
        cs.register(0x00, "TEST UNIT READY", 6, [0x00, 0, 0, 0, 0, 0x04])(lambda lu, cmd: None)
    with pytest.raises(ValueError, match="declared by both a and b"):
        build_table((a, b))
