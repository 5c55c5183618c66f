"""Helpers for the in-memory SCSI tests of thin provisioning, atomic and
offload commands (test_scsi_thin/caw/xcopy/sanitize)."""

from __future__ import annotations

import struct

from storaged.block.file import FileBlockDevice
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

BS = 512
MiB = 1024 * 1024

N1 = Nexus("iqn.2024-01.test:init1,i,0x000000000001", "iqn.2024-01.test:tgt,t,0x0001",
           relative_port_id=1, initiator_name="iqn.2024-01.test:init1",
           target_name="iqn.2024-01.test:tgt")
N2 = Nexus("iqn.2024-01.test:init2,i,0x000000000002", "iqn.2024-01.test:tgt,t,0x0001",
           relative_port_id=1, initiator_name="iqn.2024-01.test:init2",
           target_name="iqn.2024-01.test:tgt")


def wwn(n: int) -> str:
    return "6001405" + f"{n:016x}" + "fedcba987"


def make_lu(path: str, size: int = 16 * MiB, *, bs: int = BS, n: int = 0,
            **kw) -> LogicalUnit:
    dev = FileBlockDevice(path, block_size=bs, create_size=size)
    kw.setdefault("physical_block_size", bs)
    lu = LogicalUnit(dev, name=f"lun{n}", serial=f"SN-{n:04d}", wwn=wwn(n), **kw)
    clear_ua(lu, N1)
    return lu


def run(lu: LogicalUnit, cdb, data=None, nexus: Nexus = N1, lun: int = 0) -> ScsiResult:
    return lu.execute(ScsiCommand(bytes(cdb), lun, nexus, data))


def clear_ua(lu: LogicalUnit, nexus: Nexus) -> None:
    for _ in range(20):
        if run(lu, [0] * 6, nexus=nexus).status == Status.GOOD:
            return
    raise AssertionError("unit attentions never cleared")


def parse_sense(raw: bytes) -> dict:
    code = raw[0] & 0x7F
    out: dict = {"code": code}
    if code in (0x70, 0x71):
        out.update(key=raw[2] & 0xF, asc=raw[12], ascq=raw[13], valid=bool(raw[0] & 0x80),
                   info=int.from_bytes(raw[3:7], "big"),
                   csi=int.from_bytes(raw[8:12], "big"))
        if raw[15] & 0x80:
            out["sks"] = raw[15:18]
    else:
        assert code in (0x72, 0x73)
        out.update(key=raw[1] & 0xF, asc=raw[2], ascq=raw[3], valid=False)
        pos = 8
        while pos < 8 + raw[7]:
            dtype, dlen = raw[pos], raw[pos + 1]
            if dtype == 0x00:
                out["valid"] = bool(raw[pos + 2] & 0x80)
                out["info"] = int.from_bytes(raw[pos + 4:pos + 12], "big")
            elif dtype == 0x02:
                out["sks"] = raw[pos + 4:pos + 7]
            pos += 2 + dlen
    return out


def assert_check(r: ScsiResult, key: int, asc: int, ascq: int = 0) -> dict:
    assert r.status == Status.CHECK_CONDITION, r
    s = parse_sense(r.sense)
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s
    return s


def good(r: ScsiResult) -> ScsiResult:
    assert r.status == Status.GOOD, (r, r.sense and parse_sense(r.sense))
    return r


# ---------------------------------------------------------------- CDB builders
def cdb10(op: int, lba: int, n: int, b1: int = 0) -> list[int]:
    return [op, b1] + list(struct.pack(">I", lba)) + [0] + list(struct.pack(">H", n)) + [0]


def cdb16(op: int, lba: int, n: int, b1: int = 0) -> list[int]:
    return [op, b1] + list(struct.pack(">QI", lba, n)) + [0, 0]


def read16(lu: LogicalUnit, lba: int, n: int) -> bytes:
    return bytes(good(run(lu, cdb16(0x88, lba, n))).data)


def write16(lu: LogicalUnit, lba: int, data: bytes, b1: int = 0) -> ScsiResult:
    return run(lu, cdb16(0x8A, lba, len(data) // lu.block_size, b1), data)


def inquiry_vpd(lu: LogicalUnit, page: int) -> bytes:
    return bytes(good(run(lu, [0x12, 1, page, 0x10, 0, 0])).data)


def rsoc_all(lu: LogicalUnit) -> set[tuple[int, int]]:
    """(opcode, service action) of every command REPORT SUPPORTED OPERATION CODES lists."""
    data = bytes(good(run(lu, [0xA3, 0x0C, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])).data)
    out = set()
    n = int.from_bytes(data[0:4], "big")
    for at in range(4, 4 + n, 8):
        out.add((data[at], int.from_bytes(data[at + 2:at + 4], "big")))
    return out
