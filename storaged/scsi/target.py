"""A SCSI target device: a LUN map of logical units plus the target-level
commands and task management side effects (SAM-5 §4.6, SPC-4)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from storaged.fastio import scsi_rw_decode
from storaged.scsi import sense, spc
from storaged.scsi.lu import UA_BUS_DEVICE_RESET, UA_POWER_ON, LogicalUnit
from storaged.scsi.sense import Key
from storaged.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    TmfFunction,
    TmfResponse,
)

log = logging.getLogger("storaged.scsi")

# READ(10)/READ(16) and WRITE(10)/WRITE(16): what initiators send for data.
_READ_OPS = frozenset((0x28, 0x88))
_WRITE_OPS = frozenset((0x2A, 0x8A))

DIRECT_OTHER, DIRECT_READ, DIRECT_WRITE = -1, 0, 1
"""Kinds of ``ScsiTarget.direct_io``."""

INQUIRY = 0x12
REQUEST_SENSE = 0x03
REPORT_LUNS = 0xA0


class ScsiTarget:
    """LUN number -> LogicalUnit, and the commands that are not any one LU's."""

    def __init__(self, name: str, vendor: str = "STORAGED") -> None:
        self.name = name
        self.vendor = vendor
        self.luns: dict[int, LogicalUnit] = {}
        self.on_abort_nexus: Callable[[Nexus, int], None] | None = None
        """Set by the transport: abort every task of I_T nexus ``nexus`` for
        LUN ``lun`` now.  PREEMPT AND ABORT calls it (through the LU's
        ``abort_hooks``) for each preempted nexus of this target before it
        completes (SPC-4 §5.14.11.5); never for the nexus that sent it."""

    # ------------------------------------------------------------ configuration
    def set_luns(self, mapping: Mapping[int, LogicalUnit]) -> None:
        """Replace the LUN map live.  When the inventory changes, every known
        I_T nexus of every mapped LU gets REPORTED LUNS DATA HAS CHANGED."""
        new = dict(mapping)
        for lun in new:
            if not 0 <= lun < 0x4000:
                raise ValueError(f"LUN {lun} out of range (0..16383)")
        changed = {k: id(v) for k, v in new.items()} != \
            {k: id(v) for k, v in self.luns.items()}
        hook = self._abort_nexus
        for lu in self.luns.values():
            if hook in lu.abort_hooks and all(lu is not n for n in new.values()):
                lu.abort_hooks.remove(hook)
        for lu in new.values():
            if hook not in lu.abort_hooks:
                lu.abort_hooks.append(hook)
        for lu in self.luns.values():      # EXTENDED COPY reaches the LUs of our map
            if lu.scsi_targets.get(self.name) is self.luns:
                del lu.scsi_targets[self.name]
        for lu in new.values():
            lu.scsi_targets[self.name] = new
        self.luns = new
        if changed:
            for lu in new.values():
                lu.add_unit_attention(0x3F, 0x0E)

    # ------------------------------------------------------------ commands
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        """Run one command addressed to ``cmd.lun``; never raises."""
        cdb = cmd.cdb
        lu = self.luns.get(cmd.lun)
        if not cdb:
            return sense.check(Key.ILLEGAL_REQUEST, 0x20, 0x00)
        if lu is not None and cdb[0] != REPORT_LUNS:
            return lu.execute(cmd)
        try:
            return self._target_command(cmd, lu)
        except Exception:  # noqa: BLE001 - never let a bug escape to the transport
            log.exception("%s: command %#04x to LUN %d raised", self.name, cdb[0], cmd.lun)
            return sense.check(Key.HARDWARE_ERROR, 0x44, 0x00)

    def may_block(self, cmd: ScsiCommand) -> bool:
        """Should the transport run this command off its event loop?"""
        lu = self.luns.get(cmd.lun)
        return lu is not None and lu.may_block(cmd)

    def direct_io(self, cmd: ScsiCommand) -> tuple[Any, int, tuple[int, int] | None] | None:
        """How a transport may overlap this command's disk access, for LUs on
        an O_DIRECT device (None for every other LU).

        ``(device, kind, byte_range)``: ``kind`` is DIRECT_READ or
        DIRECT_WRITE for a plain READ/WRITE(10/16) that runs without blocking
        (no FUA, write cache on), whose data may be read ahead
        (``byte_range``, when it lies inside the device) or queued by the
        device; DIRECT_OTHER for any other command, which must not run while
        the device has such accesses in flight (storaged.iscsi.direct)."""
        lu = self.luns.get(cmd.lun)
        dev = lu.device if lu is not None else None
        if not getattr(dev, "direct", False) or not hasattr(dev, "aio_reads"):
            return None
        cdb = cmd.cdb
        op = cdb[0] if cdb else -1
        if op not in _READ_OPS and op not in _WRITE_OPS or lu.may_block(cmd):  # type: ignore[union-attr]
            return dev, DIRECT_OTHER, None
        if op in _WRITE_OPS:
            return dev, DIRECT_WRITE, None
        try:
            lba, blocks, _flags = scsi_rw_decode(cdb)
        except ValueError:
            return dev, DIRECT_READ, None
        bs = lu.block_size  # type: ignore[union-attr]
        if blocks and (lba + blocks) * bs <= dev.size:
            return dev, DIRECT_READ, (lba * bs, blocks * bs)
        return dev, DIRECT_READ, None

    def _target_command(self, cmd: ScsiCommand, lu: LogicalUnit | None) -> ScsiResult:
        cdb = cmd.cdb
        op = cdb[0]
        if op == REPORT_LUNS:
            if len(cdb) < 12:
                return self._error(lu, Key.ILLEGAL_REQUEST, 0x24, 0x00)
            if cdb[11] & 0x04:
                return self._invalid_cdb(lu, 11, 2)
            data, bad = spc.report_luns_data(bytes(cdb[:12]), self.luns)
            if data is None:
                return self._invalid_cdb(lu, bad)
            for unit in self.luns.values():
                unit.clear_unit_attention(cmd.nexus, 0x3F, 0x0E)
            return ScsiResult(data=data)
        # The addressed LUN does not exist (SPC-4 §6.6.2 INQUIRY, §6.39 REQUEST SENSE).
        if op == INQUIRY and len(cdb) >= 6:
            alloc = (cdb[3] << 8) | cdb[4]
            if cdb[1] & 0x01:
                if cdb[2] != 0x00:
                    return sense.check(Key.ILLEGAL_REQUEST, 0x24, 0x00,
                                       sks=sense.field_pointer(2))
                return ScsiResult(data=bytes((0x7F, 0x00, 0x00, 0x00))[:alloc])
            if cdb[2]:
                return sense.check(Key.ILLEGAL_REQUEST, 0x24, 0x00,
                                   sks=sense.field_pointer(2))
            return ScsiResult(data=spc.no_lun_inquiry(self.vendor)[:alloc])
        if op == REQUEST_SENSE and len(cdb) >= 6:
            data = sense.build(Key.ILLEGAL_REQUEST, 0x25, 0x00,
                               descriptor=bool(cdb[1] & 0x01))
            return ScsiResult(data=data[:cdb[4]])
        return sense.check(Key.ILLEGAL_REQUEST, 0x25, 0x00)   # LOGICAL UNIT NOT SUPPORTED

    @staticmethod
    def _error(lu: LogicalUnit | None, key: int, asc: int, ascq: int) -> ScsiResult:
        if lu is not None:
            return lu.check(key, asc, ascq)
        return sense.check(key, asc, ascq)

    @staticmethod
    def _invalid_cdb(lu: LogicalUnit | None, byte: int, bit: int | None = None) -> ScsiResult:
        if lu is not None:
            return lu.invalid_cdb(byte, bit)
        return sense.check(Key.ILLEGAL_REQUEST, 0x24, 0x00,
                           sks=sense.field_pointer(byte, bit))

    # ------------------------------------------------------------ task management
    def task_management(self, function: int, lun: int, nexus: Nexus) -> int:
        """SCSI side effects of a task management function; returns a TmfResponse.

        The transport aborts its own queued/running tasks (ABORT TASK, ABORT
        TASK SET, CLEAR TASK SET, resets) before or after calling this; here
        only logical unit state changes:

        * LOGICAL UNIT RESET: mode pages back to saved values, PREVENT
          cleared, UA 29/03 for every I_T nexus of that LU (the issuer too).
        * TARGET WARM RESET: the same for every LU.
        * TARGET COLD RESET: every LU reset with UA 29/01 POWER ON OCCURRED
          (the transport also closes all sessions, RFC 7143 §11.5.1).
        """
        if function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            asc, ascq = UA_BUS_DEVICE_RESET if function == TmfFunction.TARGET_WARM_RESET \
                else UA_POWER_ON
            for lu in self.luns.values():
                lu.reset(asc, ascq)
            return TmfResponse.COMPLETE
        lu = self.luns.get(lun)
        if function in (TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET,
                        TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            if lu is None:
                return TmfResponse.NO_LUN
            if function == TmfFunction.LOGICAL_UNIT_RESET:
                lu.reset(*UA_BUS_DEVICE_RESET)
            return TmfResponse.COMPLETE
        if function == TmfFunction.CLEAR_ACA:
            return TmfResponse.NOT_SUPPORTED        # NormACA=0: no ACA to clear
        if function == TmfFunction.TASK_REASSIGN:
            return TmfResponse.NO_REASSIGN          # transport-level (ERL 2)
        return TmfResponse.NOT_SUPPORTED

    def take_reset_barriers(self) -> list[Any]:
        """Futures the last reset's task management response must wait for (see
        ``LogicalUnit.reset_barriers``); empty for LUs served by this node alone."""
        out: list[Any] = []
        for lu in self.luns.values():
            if lu.reset_barriers:
                out += lu.reset_barriers
                lu.reset_barriers = []
        return out

    def _abort_nexus(self, lu: LogicalUnit, nexus: Nexus) -> None:
        """LU abort hook: forward to ``on_abort_nexus`` with our LUN number(s) of ``lu``."""
        callback = self.on_abort_nexus
        if callback is None or (nexus.target_name and nexus.target_name != self.name):
            return
        for lun, unit in list(self.luns.items()):
            if unit is lu:
                callback(nexus, lun)

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone (session closed): every LU forgets it."""
        for lu in self.luns.values():
            lu.nexus_lost(nexus)

