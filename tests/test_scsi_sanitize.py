"""SANITIZE: overwrite, block erase, crypto erase refused, the sanitize-in-
progress state, failure mode and EXIT FAILURE MODE."""

from __future__ import annotations

import os
import struct
import time

import pytest

from storaged.block.base import BlockDeviceError
from storaged.scsi import sanitize, thin
from storaged.scsi.types import ScsiCommand
from tests.scsi_util import (
    BS,
    N1,
    N2,
    MiB,
    assert_check,
    good,
    inquiry_vpd,
    make_lu,
    parse_sense,
    read16,
    rsoc_all,
    run,
    write16,
)

SIZE = 2 * MiB
NBLOCKS = SIZE // BS


@pytest.fixture
def lu(tmp_path):
    unit = make_lu(str(tmp_path / "s.img"), SIZE)
    unit.sanitize_rate = 0
    yield unit
    op = sanitize.in_progress(unit)
    if op is not None:
        op.done.wait(30)
    unit.device.close()


def san(sa: int, plen: int = 0, immed: bool = False, ause: bool = False) -> list[int]:
    return [0x48, sa | (0x80 if immed else 0) | (0x20 if ause else 0), 0, 0, 0, 0, 0,
            plen >> 8, plen & 0xFF, 0]


def overwrite_params(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | count, 0)) + struct.pack(">H", len(pattern)) + pattern


def overwrite(lu, pattern: bytes, **kw):
    p = overwrite_params(pattern, **{k: v for k, v in kw.items() if k in ("count", "invert")})
    return run(lu, san(1, len(p), **{k: v for k, v in kw.items() if k in ("immed", "ause")}), p)


def wait_done(lu) -> None:
    op = sanitize.in_progress(lu)
    if op is not None:
        assert op.done.wait(30)


# ---------------------------------------------------------------- what is offered
def test_offered_service_actions(lu):
    ops = rsoc_all(lu)
    assert (0x48, 1) in ops and (0x48, 2) in ops and (0x48, 0x1F) in ops
    assert (0x48, 3) not in ops                                # no crypto erase
    b1 = inquiry_vpd(lu, 0xB1)
    assert b1[7] & 0xC0 == 0x40                                # WABEREQ 01b
    assert b1[7] & 0x30 == 0                                   # WACEREQ 0
    assert_check(run(lu, san(3)), 5, 0x24)                     # CRYPTOGRAPHIC ERASE refused
    for sa in (0, 4, 0x10, 0x1E):
        assert_check(run(lu, san(sa)), 5, 0x24)


def test_thick_lu_has_no_block_erase(tmp_path):
    lu = make_lu(str(tmp_path / "t.img"), SIZE, thin=False)
    assert (0x48, 2) not in rsoc_all(lu)
    assert inquiry_vpd(lu, 0xB1)[7] & 0xC0 == 0
    assert_check(run(lu, san(2)), 5, 0x24)
    lu.device.close()


# ---------------------------------------------------------------- overwrite
def test_overwrite_writes_the_pattern_everywhere(lu):
    good(write16(lu, 0, os.urandom(64 * BS)))
    good(overwrite(lu, b"\xaa\x55\x01"))
    block = (b"\xaa\x55\x01" * (BS // 3 + 1))[:BS]
    assert read16(lu, 0, 64) == block * 64
    assert read16(lu, NBLOCKS - 8, 8) == block * 8


def test_overwrite_invert_alternates_passes(lu):
    good(overwrite(lu, b"\x0f", count=2, invert=True))
    assert read16(lu, 0, 1) == b"\xf0" * BS                     # second pass inverted
    good(overwrite(lu, b"\x0f", count=3, invert=True))
    assert read16(lu, 0, 1) == b"\x0f" * BS


def test_overwrite_parameter_checks(lu):
    p = overwrite_params(b"\x11" * BS)
    for plen in range(5):
        assert_check(run(lu, san(1, plen), p[:plen]), 5, 0x24)
    assert_check(run(lu, san(1, BS + 5), p + b"\0"), 5, 0x24)
    assert_check(run(lu, san(1, len(p)), b"\x00" + p[1:]), 5, 0x26)       # OVERWRITE COUNT 0
    assert_check(run(lu, san(1, len(p)), p[:2] + b"\0\0" + p[4:]), 5, 0x26)  # pattern len 0
    too_long = p[:2] + struct.pack(">H", BS + 1) + p[4:]
    assert_check(run(lu, san(1, len(p)), too_long), 5, 0x26)
    assert_check(run(lu, san(1, len(p)), bytes((0x21,)) + p[1:]), 5, 0x26)  # TEST field
    assert_check(run(lu, san(1, len(p)), p[:10]), 5, 0x1A)                  # short Data-Out
    for byte in range(2, 7):                                   # reserved CDB bytes
        cdb = san(1, len(p))
        cdb[byte] = 1
        assert_check(run(lu, cdb, p), 5, 0x24)
    cdb = san(1, len(p))
    cdb[1] |= 0x40
    assert_check(run(lu, cdb, p), 5, 0x24)
    lu.read_only = True
    assert_check(run(lu, san(1, len(p)), p), 7, 0x27)
    assert_check(run(lu, san(2)), 7, 0x27)


# ---------------------------------------------------------------- block erase
def test_block_erase_deallocates_everything(lu):
    good(write16(lu, 0, os.urandom(SIZE)))
    assert os.fstat(lu.device.fd).st_blocks * 512 >= SIZE
    good(run(lu, san(2)))
    assert os.fstat(lu.device.fd).st_blocks == 0
    assert read16(lu, 0, 16) == bytes(16 * BS)
    assert thin.lba_status(lu, 0, 8) == [(0, NBLOCKS, thin.DEALLOCATED)]
    assert_check(run(lu, san(2, 8), bytes(8)), 5, 0x24)       # no parameter list allowed


# ---------------------------------------------------------------- in progress
def test_commands_during_a_sanitize(lu):
    lu.sanitize_rate = SIZE // 2                     # two seconds for one pass
    good(overwrite(lu, b"\x77", immed=True))
    r = run(lu, [0] * 6)
    s = assert_check(r, 2, 0x04, 0x1B)               # NOT READY, SANITIZE IN PROGRESS
    assert s["sks"][0] & 0x80                        # progress indication
    assert_check(run(lu, [0x88] + [0] * 13 + [1, 0]), 2, 0x04, 0x1B)
    assert_check(run(lu, [0x1B, 1, 0, 0, 1, 0]), 2, 0x04, 0x1B)
    assert_check(overwrite(lu, b"\x01"), 2, 0x04, 0x1B)   # no second sanitize
    good(run(lu, [0x12, 0, 0, 0, 96, 0]))            # INQUIRY
    good(run(lu, [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))   # REPORT LUNS
    # outranks the unit attention of a new I_T nexus; REQUEST SENSE reports progress
    assert_check(run(lu, [0] * 6, nexus=N2), 2, 0x04, 0x1B)
    rs = good(run(lu, [0x03, 0, 0, 0, 252, 0], nexus=N2))
    s = parse_sense(bytes(rs.data))
    assert (s["key"], s["asc"], s["ascq"]) == (2, 0x04, 0x1B) and s["sks"][0] & 0x80
    # resets do not stop it
    lu.reset()
    assert sanitize.in_progress(lu) is not None
    wait_done(lu)
    s = parse_sense(run(lu, [0] * 6, nexus=N2).sense)           # the UA was kept
    assert (s["key"], s["asc"]) == (6, 0x29)
    good(run(lu, [0] * 6, nexus=N2))
    assert_check(run(lu, [0] * 6), 6, 0x29, 0x03)              # N1 saw the reset
    assert read16(lu, 0, 4) == b"\x77" * (4 * BS)
    assert lu.gate is None


def test_immed_zero_waits_and_is_throttled(lu):
    lu.sanitize_rate = 4 * SIZE                       # a quarter of a second
    started = time.monotonic()
    good(overwrite(lu, b"\x01"))
    assert time.monotonic() - started >= 0.2
    assert sanitize.in_progress(lu) is None
    good(run(lu, [0] * 6))


def test_sanitize_runs_off_the_event_loop(lu):
    assert lu.may_block(ScsiCommand(bytes(san(2)), 0, N1))


# ---------------------------------------------------------------- failure mode
def test_failure_mode_and_exit(lu, monkeypatch):
    def broken(offset, data, fua=False):
        raise BlockDeviceError(5, "injected")

    real = lu.device.write
    monkeypatch.setattr(lu.device, "write", broken)
    assert_check(overwrite(lu, b"\x01"), 3, 0x31, 0x03)            # SANITIZE COMMAND FAILED
    assert_check(run(lu, [0x88] + [0] * 13 + [1, 0]), 3, 0x31, 0x03)
    good(run(lu, [0x12, 0, 0, 0, 96, 0]))
    rs = good(run(lu, [0x03, 0, 0, 0, 252, 0]))
    assert parse_sense(bytes(rs.data))["asc"] == 0x31
    assert_check(run(lu, san(0x1F)), 5, 0x24)                      # AUSE was 0
    # with AUSE=1 the failure mode may be left with EXIT FAILURE MODE
    assert_check(overwrite(lu, b"\x01", ause=True), 3, 0x31, 0x03)
    assert_check(run(lu, san(0x1F, 4), bytes(4)), 5, 0x24)         # no parameter list
    good(run(lu, san(0x1F)))
    good(run(lu, [0x88] + [0] * 13 + [1, 0]))
    good(run(lu, san(0x1F)))                                       # nothing to leave: GOOD
    # a successful sanitize also leaves failure mode
    assert_check(overwrite(lu, b"\x01"), 3, 0x31, 0x03)
    monkeypatch.setattr(lu.device, "write", real)
    good(overwrite(lu, b"\x02"))
    good(run(lu, [0x88] + [0] * 13 + [1, 0]))
