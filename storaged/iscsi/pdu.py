"""iSCSI PDU basics (RFC 7143 §11): opcodes, the Basic Header Segment, framing.

Every PDU shares the 48-byte Basic Header Segment.  The generic codec in
``storaged.fastio`` splits it into 16 slots (opcode, I bit, flags, bytes 2
and 3, AHS length, data length, bytes 8-15, ITT, and the seven words at
offsets 20..44); ``Pdu`` exposes them under those generic names (``w24`` is
CmdSN in a SCSI Command, ``w20`` the TTT in a Data-Out: §11.3-§11.18 give
each opcode's layout) and ``build`` takes the same names, so parsing and
building stay one line each and the compiled codec does the work.
"""

from __future__ import annotations

from storaged.fastio import crc32c, decode_bhs, encode_bhs

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF


class Op:
    # Initiator opcodes (§11.1.1)
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TMF_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    # Target opcodes (§11.1.2)
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TMF_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


INITIATOR_OPS = {Op.NOP_OUT, Op.SCSI_CMD, Op.TMF_REQ, Op.LOGIN_REQ, Op.TEXT_REQ,
                 Op.DATA_OUT, Op.LOGOUT_REQ, Op.SNACK}

# Slot names of the generic 16-slot BHS tuple.
SLOTS = ("opcode", "immediate", "flags", "b2", "b3", "ahs_len", "data_len", "lun",
         "itt", "w20", "w24", "w28", "w32", "w36", "w40", "w44")


class Pdu:
    """A received PDU: decoded header slots, raw header bytes, data segment."""

    __slots__ = SLOTS + ("header", "data")

    def __init__(self, header: bytes | memoryview, data: bytes | memoryview = b"") -> None:
        # ``header`` is the 48-byte BHS, followed by the AHS if TotalAHSLength > 0.
        (self.opcode, self.immediate, self.flags, self.b2, self.b3, self.ahs_len,
         self.data_len, self.lun, self.itt, self.w20, self.w24, self.w28, self.w32,
         self.w36, self.w40, self.w44) = decode_bhs(header)
        self.header = header
        self.data = data

    # Friendly names used by the protocol logic.
    @property
    def final(self) -> bool:
        return bool(self.flags & 0x80)

    @property
    def cdb(self) -> bytes:
        return bytes(self.header[32:48])

    @property
    def lun_bytes(self) -> bytes:
        return bytes(self.header[8:16])

    def __repr__(self) -> str:
        return (f"Pdu(op=0x{self.opcode:02x}, flags=0x{self.flags:02x}, itt=0x{self.itt:08x}, "
                f"dlen={self.data_len})")


def build(opcode: int, *, flags: int = 0, b2: int = 0, b3: int = 0, data_len: int = 0,
          lun: int = 0, itt: int = RESERVED_TAG, w20: int = 0, w24: int = 0, w28: int = 0,
          w32: int = 0, w36: int = 0, w40: int = 0, w44: int = 0, immediate: bool = False,
          ahs_len: int = 0) -> bytes:
    """Build a 48-byte BHS from named slots."""
    return encode_bhs(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
                      w20, w24, w28, w32, w36, w40, w44)


def pad_len(n: int) -> int:
    """Bytes of padding after an n-byte data segment (§11.2.4: to 4 bytes)."""
    return -n & 3


PADS = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def frame(header: bytes, data: bytes | memoryview = b"", header_digest: bool = False,
          data_digest: bool = False) -> list[bytes | memoryview]:
    """Header, digests, data and padding as a list of buffers ready for writelines."""
    out: list[bytes | memoryview] = [header]
    if header_digest:
        out.append(crc32c(header).to_bytes(4, "little"))
    n = len(data)
    if n:
        out.append(data)
        pad = PADS[n & 3]
        if pad:
            out.append(pad)
        if data_digest:
            crc = crc32c(data)
            if pad:
                crc = crc32c(pad, crc)
            out.append(crc.to_bytes(4, "little"))
    return out


def isid_tsih(value: int) -> tuple[int, int]:
    """Split the Login PDU's bytes 8-15 into ISID (48 bits) and TSIH (16 bits)."""
    return value >> 16, value & 0xFFFF
