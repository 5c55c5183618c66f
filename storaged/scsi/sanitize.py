"""SANITIZE (SBC-3 §5.19, §4.11): OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE.

* OVERWRITE writes the initialization pattern (repeated to fill each block,
  inverted on every other pass with INVERT) to every LBA, OVERWRITE COUNT
  times, then flushes.  Every block is written, so a thin LUN ends up fully
  allocated - use BLOCK ERASE to wipe a thin LUN and keep it thin.
* BLOCK ERASE (thin LUs only: SBC-3 ties it to logical block provisioning)
  deallocates every LBA: the whole backing file becomes one hole, the LU
  reads zeros (VPD B1h WABEREQ=01b: reads after the erase succeed).
* CRYPTOGRAPHIC ERASE is not offered: nothing is stored encrypted, so there
  is no key to throw away.  It is absent from REPORT SUPPORTED OPERATION
  CODES and refused with INVALID FIELD IN CDB (like any unsupported service
  action); VPD B1h WACEREQ is 0.

The operation runs in its own thread and survives task management
functions, resets and the loss of the I_T nexus that started it.  Until it
ends, every command but INQUIRY, REPORT LUNS and REQUEST SENSE (which
reports progress in the sense-key specific field) is answered with NOT
READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS - ahead of pending unit
attentions.  IMMED=0 holds the command until the operation is over.  An
overwrite is throttled to ``lu.sanitize_rate`` bytes per second so wiping a
big LUN does not starve the other LUNs on the same disk.

If the operation fails (an I/O error) the LU enters failure mode: medium
access commands get MEDIUM ERROR, SANITIZE COMMAND FAILED until a new
SANITIZE succeeds or, when the failed one had AUSE=1, SANITIZE EXIT FAILURE
MODE.  Sanitize state is not persistent: a daemon restart in the middle of
a sanitize does not resume it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from storaged.block.base import BlockDeviceError
from storaged.scsi import sense
from storaged.scsi.commands import Access, CommandSet, CommandSpec
from storaged.scsi.sense import Key
from storaged.scsi.thin import deallocate
from storaged.scsi.types import ScsiCommand, ScsiResult

COMMANDS = CommandSet("sanitize")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

log = logging.getLogger("storaged.scsi")

C = 0x04
OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x03, 0x1F


def _usage(sa: int) -> list[int]:
    """CDB usage data: IMMED, AUSE and the service action itself in byte 1."""
    return [0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]

CHUNK = 4 * 1024 * 1024
SANITIZE_IN_PROGRESS = (0x04, 0x1B)
SANITIZE_FAILED = (0x31, 0x03)
ALLOWED_WHILE_RUNNING = frozenset((0x12, 0xA0))   # INQUIRY, REPORT LUNS


class Operation:
    """One sanitize operation running (or finished) on an LU."""

    def __init__(self, lu: LogicalUnit, action: int, ause: bool,
                 pattern: bytes = b"", passes: int = 1, invert: bool = False) -> None:
        self.lu = lu
        self.action = action
        self.ause = ause
        self.pattern = pattern
        self.passes = passes
        self.invert = invert
        self.done = threading.Event()
        self.error: Exception | None = None
        self._total = max(1, lu.num_blocks * (passes if action == OVERWRITE else 1))
        self._progressed = 0

    @property
    def progress(self) -> int:
        """PROGRESS INDICATION: fraction done, in 1/65536."""
        return min(0xFFFF, self._progressed * 0x10000 // self._total)

    def run(self) -> None:
        try:
            if self.action == OVERWRITE:
                self._overwrite()
            else:
                self._block_erase()
            self.lu.device.flush()
        except (BlockDeviceError, OSError) as e:
            log.error("%s: sanitize failed: %s", self.lu.name, e)
            self.error = e
        except Exception as e:  # noqa: BLE001 - the LU must leave the sanitize state
            log.exception("%s: sanitize raised", self.lu.name)
            self.error = e
        finally:
            _finish(self)

    def _block_erase(self) -> None:
        lu = self.lu
        step = max(1, (1 << 30) // lu.block_size)
        for lba in range(0, lu.num_blocks, step):
            n = min(step, lu.num_blocks - lba)
            deallocate(lu, lba, n)
            self._progressed += n

    def _overwrite(self) -> None:
        lu = self.lu
        bs = lu.block_size
        dev = lu.device
        block = (self.pattern * (bs // len(self.pattern) + 1))[:bs]
        per = max(1, CHUNK // bs)
        started = time.monotonic()
        written = 0
        for n_pass in range(self.passes):
            blk = bytes(b ^ 0xFF for b in block) if self.invert and n_pass % 2 else block
            buf = memoryview(blk * min(per, max(1, lu.num_blocks)))
            for lba in range(0, lu.num_blocks, per):
                n = min(per, lu.num_blocks - lba)
                with lu.medium_lock:
                    dev.write(lba * bs, buf[:n * bs])
                self._progressed += n
                written += n * bs
                rate = lu.sanitize_rate
                if rate > 0:
                    ahead = written / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)


class _State:
    __slots__ = ("op", "failed")

    def __init__(self) -> None:
        self.op: Operation | None = None      # running
        self.failed: Operation | None = None  # failure mode entered by this one


_states: weakref.WeakKeyDictionary[LogicalUnit, _State] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _state(lu: LogicalUnit) -> _State:
    with _lock:
        st = _states.get(lu)
        if st is None:
            st = _states[lu] = _State()
        return st


def in_progress(lu: LogicalUnit) -> Operation | None:
    """The sanitize operation running on ``lu``, if any."""
    st = _states.get(lu)
    return st.op if st is not None else None


def _progress_sks(op: Operation) -> bytes:
    p = op.progress
    return bytes((0x80, p >> 8, p & 0xFF))            # SKSV + PROGRESS INDICATION


def gate(lu: LogicalUnit, cmd: ScsiCommand, spec: CommandSpec | ScsiResult) -> ScsiResult | None:
    """Installed as ``lu.gate`` while a sanitize runs or failed (SBC-3 §4.11.4)."""
    st = _states.get(lu)
    if st is None:
        return None
    op = st.op
    opcode = cmd.cdb[0]
    if opcode in ALLOWED_WHILE_RUNNING:
        return None
    if opcode == 0x03 and len(cmd.cdb) >= 6:           # REQUEST SENSE: progress / failure
        desc = bool(cmd.cdb[1] & 0x01)
        if op is not None:
            data = sense.build(Key.NOT_READY, *SANITIZE_IN_PROGRESS, descriptor=desc,
                               sks=_progress_sks(op))
        elif st.failed is not None:
            data = sense.build(Key.MEDIUM_ERROR, *SANITIZE_FAILED, descriptor=desc)
        else:
            return None
        return ScsiResult(data=data[:cmd.cdb[4]])
    if op is not None:
        return lu.check(Key.NOT_READY, *SANITIZE_IN_PROGRESS, sks=_progress_sks(op))
    if st.failed is not None and opcode != 0x48 and type(spec) is CommandSpec and spec.medium:
        return lu.check(Key.MEDIUM_ERROR, *SANITIZE_FAILED)
    return None


def _finish(op: Operation) -> None:
    lu = op.lu
    st = _state(lu)
    with _lock:
        st.op = None
        st.failed = op if op.error is not None else None
        if st.failed is None:
            lu.gate = None
    op.done.set()
    log.info("%s: sanitize %s %s", lu.name, "overwrite" if op.action == OVERWRITE
             else "block erase", "failed" if op.error else "complete")


def start(lu: LogicalUnit, op: Operation) -> bool:
    """Start ``op`` in its own thread; False if a sanitize is already running."""
    st = _state(lu)
    with _lock:
        if st.op is not None:
            return False
        st.op = op
        st.failed = None
        lu.gate = gate
    threading.Thread(target=op.run, name=f"sanitize-{lu.name}", daemon=True).start()
    return True


def _run(lu: LogicalUnit, cmd: ScsiCommand, op: Operation, plen: int) -> ScsiResult:
    if not start(lu, op):
        return lu.check(Key.NOT_READY, *SANITIZE_IN_PROGRESS)
    if cmd.cdb[1] & 0x80:                              # IMMED: GOOD now, work goes on
        return ScsiResult(transfer_length=plen)
    op.done.wait()
    if op.error is not None:
        return lu.check(Key.MEDIUM_ERROR, *SANITIZE_FAILED)
    return ScsiResult(transfer_length=plen)


def _reserved(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult | None:
    cdb = cmd.cdb
    if cdb[1] & 0x40:
        return lu.invalid_cdb(1, 6)
    for i in range(2, 7):
        if cdb[i]:
            return lu.invalid_cdb(i)
    return None


def _plen(cmd: ScsiCommand) -> int:
    return (cmd.cdb[7] << 8) | cmd.cdb[8]


DAY = 86400


@COMMANDS.register(0x48, "SANITIZE OVERWRITE", 10, _usage(OVERWRITE), sa=OVERWRITE,
                   access=Access.WRITE, write=True, slow=True, recommended_timeout=DAY)
def sanitize_overwrite(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """OVERWRITE: the parameter list (SBC-3 table 56) is INVERT, TEST (must
    be 0), OVERWRITE COUNT (1-31), INITIALIZATION PATTERN LENGTH (1 to the
    block size) and the pattern; its length must be 5 to block size + 4."""
    bad = _reserved(lu, cmd)
    if bad is not None:
        return bad
    plen = _plen(cmd)
    bs = lu.block_size
    if plen < 5 or plen > bs + 4:
        return lu.invalid_cdb(7)
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    if len(data) < plen:
        return lu.param_list_length_error()
    if data[0] & 0x60:                                 # TEST
        return lu.invalid_param(0, 6)
    count = data[0] & 0x1F
    if not count:
        return lu.invalid_param(0, 4)
    ipl = (data[2] << 8) | data[3]
    if ipl == 0 or ipl > bs or ipl > plen - 4:
        return lu.invalid_param(2)
    if lu.write_protected:
        return lu.write_protect_error()
    op = Operation(lu, OVERWRITE, bool(cmd.cdb[1] & 0x20), data[4:4 + ipl], count,
                   bool(data[0] & 0x80))
    return _run(lu, cmd, op, plen)


@COMMANDS.register(0x48, "SANITIZE BLOCK ERASE", 10, _usage(BLOCK_ERASE), sa=BLOCK_ERASE,
                   access=Access.WRITE, write=True, slow=True, recommended_timeout=DAY)
def sanitize_block_erase(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """BLOCK ERASE: deallocate every LBA (no parameter list)."""
    bad = _reserved(lu, cmd)
    if bad is not None:
        return bad
    if _plen(cmd):
        return lu.invalid_cdb(7)
    if not lu.lbpme:
        return lu.invalid_cdb(1, 4)
    if lu.write_protected:
        return lu.write_protect_error()
    return _run(lu, cmd, Operation(lu, BLOCK_ERASE, bool(cmd.cdb[1] & 0x20)), 0)


@COMMANDS.register(0x48, "SANITIZE EXIT FAILURE MODE", 10, _usage(EXIT_FAILURE_MODE),
                   sa=EXIT_FAILURE_MODE,
                   access=Access.WRITE, write=True)
def sanitize_exit_failure_mode(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """EXIT FAILURE MODE: leave the failure mode of a failed sanitize that
    allowed it (AUSE=1); GOOD when there is nothing to leave."""
    bad = _reserved(lu, cmd)
    if bad is not None:
        return bad
    if _plen(cmd):
        return lu.invalid_cdb(7)
    st = _state(lu)
    with _lock:
        failed = st.failed
        if failed is not None:
            if not failed.ause:
                return lu.invalid_cdb(1, 5)
            st.failed = None
            if st.op is None:
                lu.gate = None
    return ScsiResult(transfer_length=0)
