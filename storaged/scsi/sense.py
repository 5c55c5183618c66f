"""Sense data (SPC-4 §4.5): fixed and descriptor formats, and the keys we use."""

from __future__ import annotations

from storaged.scsi.types import ScsiResult, Status


class Key:
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


def build(key: int, asc: int, ascq: int, info: int | None = None,
          descriptor: bool = False, sks: bytes | None = None) -> bytes:
    """Encode sense data.  ``info`` fills the INFORMATION field (VALID bit set);
    ``sks`` is a 3-byte sense-key specific field (SKSV set by the caller)."""
    if descriptor:
        out = bytearray(8)
        out[0] = 0x72
        out[1] = key & 0xF
        out[2] = asc
        out[3] = ascq
        if info is not None:
            desc = bytearray(12)
            desc[0] = 0x00
            desc[1] = 0x0A
            desc[2] = 0x80
            desc[4:12] = info.to_bytes(8, "big")
            out += desc
        if sks is not None:
            desc = bytearray(8)
            desc[0] = 0x02
            desc[1] = 0x06
            desc[4:7] = sks
            out += desc
        out[7] = len(out) - 8
        return bytes(out)
    out = bytearray(18)
    out[0] = 0x70
    out[2] = key & 0xF
    if info is not None:
        if info <= 0xFFFFFFFF:  # fixed format holds 32 bits; VALID stays 0 otherwise
            out[0] |= 0x80
        out[3:7] = (info & 0xFFFFFFFF).to_bytes(4, "big")
    out[7] = 10
    out[12] = asc
    out[13] = ascq
    if sks is not None:
        out[15:18] = sks
    return bytes(out)


def check(key: int, asc: int, ascq: int, info: int | None = None,
          descriptor: bool = False, sks: bytes | None = None) -> ScsiResult:
    """A CHECK CONDITION result carrying the given sense."""
    return ScsiResult(status=Status.CHECK_CONDITION,
                      sense=build(key, asc, ascq, info, descriptor, sks))


def field_pointer(byte: int, bit: int | None = None, cdb: bool = True) -> bytes:
    """Sense-key specific field pointer (SPC-4 §4.5.2.4.2) with SKSV set.

    ``cdb`` selects C/D (the error is in the CDB rather than the parameter
    list); ``bit`` is the bit position of the field's most significant bit."""
    b0 = 0x80 | (0x40 if cdb else 0)
    if bit is not None:
        b0 |= 0x08 | (bit & 7)
    return bytes((b0, (byte >> 8) & 0xFF, byte & 0xFF))
