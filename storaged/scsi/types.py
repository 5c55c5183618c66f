"""Transport-independent SCSI command and result records.

The transport (iSCSI) builds a ScsiCommand once all Data-Out has arrived and
hands it to the SCSI layer; the SCSI layer returns a ScsiResult.  Residual
counts are the transport's job: it compares what the CDB called for
(``transfer_length``) with the initiator's expected data transfer length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Status:
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttr:
    """SAM-5 task attributes as iSCSI carries them (RFC 7143 §11.3.1.2)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


@dataclass(slots=True, frozen=True)
class Nexus:
    """An I_T nexus: SCSI initiator port and SCSI target port (SPC-4 §3.1.45).

    For iSCSI the initiator port name is ``<initiator iqn>,i,0x<ISID 12 hex>``
    and the target port name ``<target iqn>,t,0x<TPGT 4 hex>``.
    """

    initiator_port: str
    target_port: str
    relative_port_id: int = 1
    initiator_name: str = ""
    target_name: str = ""
    transport_id: bytes = b""


@dataclass(slots=True)
class ScsiCommand:
    """One SCSI command as the SCSI layer sees it."""

    cdb: bytes
    lun: int
    nexus: Nexus
    data_out: memoryview | bytes | None = None
    expected_length: int = 0
    read: bool = False
    write: bool = False
    task_tag: int = 0
    task_attr: int = TaskAttr.SIMPLE


@dataclass(slots=True)
class ScsiResult:
    """Status, optional sense, and Data-In of a completed command.

    ``transfer_length`` is the number of bytes the CDB asked to move (in
    either direction); None means ``len(data)`` for reads and
    ``len(data_out)`` for writes.
    """

    status: int = Status.GOOD
    data: bytes | bytearray | memoryview | None = None
    sense: bytes | None = None
    transfer_length: int | None = None
    extra: dict = field(default_factory=dict)


class TmfFunction:
    """Task management functions (RFC 7143 §11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse:
    """Task management responses (RFC 7143 §11.6.1)."""

    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_ALLEGIANT = 3
    NO_REASSIGN = 4
    NOT_SUPPORTED = 5
    AUTH_FAILED = 6
    REJECTED = 255


def decode_lun(raw: bytes) -> int:
    """SAM-5 8-byte LUN field to a LUN number (peripheral and flat addressing)."""
    method = raw[0] >> 6
    if method == 0:  # peripheral device addressing, bus 0
        return raw[1] if (raw[0] & 0x3F) == 0 else 0xFFFF_FFFF
    if method == 1:  # flat space addressing
        return ((raw[0] & 0x3F) << 8) | raw[1]
    return 0xFFFF_FFFF


def encode_lun(lun: int) -> bytes:
    """LUN number to the 8-byte SAM-5 LUN field (peripheral below 256, else flat)."""
    if lun < 256:
        return bytes([0, lun, 0, 0, 0, 0, 0, 0])
    return bytes([0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0])
