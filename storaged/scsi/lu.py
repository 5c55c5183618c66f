"""A SCSI logical unit (SBC-3 direct-access block device) over one BlockDevice.

The logical unit is sans-IO and synchronous: ``execute(cmd)`` runs one
command to completion and returns its :class:`ScsiResult`; it never raises.
Command handlers live in :mod:`storaged.scsi.spc` (primary commands) and
:mod:`storaged.scsi.sbc` (block commands) and are found through the
:class:`~storaged.scsi.commands.CommandTable`.

State kept here:

* per I_T nexus (keyed by initiator port name + target port name): the
  pending unit attention queue and the PREVENT ALLOW MEDIUM REMOVAL state;
* the mode pages (shared by all nexuses), from which the write cache
  (WCE), descriptor sense (D_SENSE) and software write protect (SWP)
  settings are derived;
* configuration that can change live: ``read_only``, ``online``,
  ``resize()``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.scsi import modepages as mp
from storaged.scsi import sense
from storaged.scsi import thin as _thin
from storaged.scsi.alua import Alua
from storaged.scsi.commands import (
    DEFAULT_SA_FIELD,
    SA_FIELD,
    SA_LOCATORS,
    CommandSpec,
    CommandTable,
)
from storaged.scsi.pr import PersistentReservations, PrStore
from storaged.scsi.sense import Key
from storaged.scsi.table import command_table
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

log = logging.getLogger("storaged.scsi")

# Additional sense codes used by the unit attention machinery.
UA_POWER_ON_RESET = (0x29, 0x00)          # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
UA_POWER_ON = (0x29, 0x01)                # POWER ON OCCURRED
UA_BUS_DEVICE_RESET = (0x29, 0x03)        # BUS DEVICE RESET FUNCTION OCCURRED
UA_NOT_READY_TO_READY = (0x28, 0x00)      # NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED
UA_MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
UA_CAPACITY_CHANGED = (0x2A, 0x09)
UA_REPORTED_LUNS_CHANGED = (0x3F, 0x0E)

_WWN_RE = re.compile(r"^6[0-9a-fA-F]{31}$")

MAX_UA_QUEUE = 16


class NexusState:
    """What the logical unit remembers about one I_T nexus."""

    __slots__ = ("nexus", "ua", "prevent")

    def __init__(self, nexus: Nexus) -> None:
        self.nexus = nexus
        self.ua: list[tuple[int, int]] = [UA_POWER_ON_RESET]
        self.prevent = False


def _ascii(value: str, what: str) -> str:
    if not all(0x20 <= ord(c) < 0x7F for c in value):
        raise ValueError(f"{what} must be printable ASCII: {value!r}")
    return value


class LogicalUnit:
    """One SBC-3 logical unit.

    ``device`` is any :class:`~storaged.block.base.BlockDevice`.  ``wwn`` is
    the 32-hex-digit NAA-6 identifier (the VPD 0x83 NAA designator).
    """

    def __init__(self, device: BlockDevice, *, name: str, serial: str, wwn: str,
                 read_only: bool = False, online: bool = True, wce: bool = True,
                 vendor: str = "STORAGED", product: str = "storaged LUN",
                 revision: str = "0001", physical_block_size: int = 4096,
                 max_transfer_bytes: int = 8 * 1024 * 1024, protocol_id: int = 5,
                 d_sense: bool = False, commands: CommandTable | None = None,
                 thin: bool | None = None, pr_store: PrStore | None = None) -> None:
        if not _WWN_RE.match(wwn):
            raise ValueError(f"wwn must be 32 hex digits starting with 6 (NAA-6): {wwn!r}")
        self.device = device
        self.name = name
        self.serial = _ascii(serial, "serial")
        self.wwn = wwn.lower()
        self.vendor = _ascii(vendor, "vendor")[:8]
        self.product = _ascii(product, "product")[:16]
        self.revision = _ascii(revision, "revision")[:4]
        self.protocol_id = protocol_id
        """SCSI transport protocol identifier for port designators (5 = iSCSI)."""
        self.removable = False

        bs = device.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ValueError(f"block size must be a power of two: {bs}")
        self.block_size = bs
        self.lbppbe = max(0, (max(physical_block_size, bs) // bs).bit_length() - 1)
        self.max_transfer_blocks = max(1, max_transfer_bytes // bs)
        self._nblocks = device.size // bs

        # Thin provisioning (LBPME, LBPRZ, UNMAP/WRITE SAME limits): see
        # storaged.scsi.thin.  ``thin=None`` asks the device (sparse files are thin).
        if thin is None:
            thin = bool(getattr(device, "thin", False))
        _thin.configure(self, thin)
        table = commands or command_table(thin)
        self.commands = table
        self.third_party_copy = table.find(0x83, 0x00) is not None
        """3PC in standard INQUIRY: EXTENDED COPY (LID1) is in the command table."""
        self._plain = table.plain
        self._by_sa = table.by_sa

        self.mode = mp.ModePages(wce=wce, d_sense=d_sense)
        self._read_only = bool(read_only)
        self._online = bool(online)
        self._wce = True
        self._d_sense = False
        self._swp = False
        self._wp = False
        self._refresh_mode_state()

        self._nexus: dict[tuple[str, str], NexusState] = {}

        self.medium_lock = threading.Lock()
        """Held while a command reads or changes the medium.  COMPARE AND WRITE,
        ORWRITE and WRITE ATOMIC do their whole read-modify-write under it, so
        they are atomic against every other command from any session, whether
        it runs on the transport's event loop or in its thread pool."""
        self.gate: Callable[[LogicalUnit, ScsiCommand, CommandSpec | ScsiResult],
                            ScsiResult | None] | None = None
        """Consulted before unit attentions are reported: while a sanitize
        operation runs (SBC-3 §4.11) it answers every command but INQUIRY and
        REPORT LUNS itself.  None (the usual case) costs one attribute test."""
        self.scsi_targets: dict[str, Mapping[int, LogicalUnit]] = {}
        """Target name -> LUN map of every ScsiTarget that maps this LU (set by
        ScsiTarget.set_luns): the LUs EXTENDED COPY may reach."""
        self.atomic_journal = None
        """An :class:`storaged.scsi.atomic.AtomicJournal` makes WRITE ATOMIC(16)
        all-or-nothing across a crash; without one WRITE ATOMIC is not offered."""
        self.max_compare_and_write = 255
        """MAXIMUM COMPARE AND WRITE LENGTH in blocks (VPD B0h)."""
        self.max_atomic_transfer_blocks = 0
        """MAXIMUM ATOMIC TRANSFER LENGTH; storaged.scsi.atomic.attach_journal sets it."""
        self.sanitize_rate = 128 * 1024 * 1024
        """Bytes per second a SANITIZE OVERWRITE may write (0: unthrottled), so
        erasing one LUN does not starve the others sharing the disk."""

        self.access_check: Callable[[LogicalUnit, ScsiCommand, CommandSpec],
                                    ScsiResult | None] | None = None
        """Reservation check (next issue): return a RESERVATION CONFLICT result
        to refuse the command, or None to let it run.  Called after unit
        attentions are reported and before the handler, with the spec whose
        ``access`` class says how the command relates to reservations."""
        self.alua_check: Callable[[LogicalUnit, ScsiCommand, CommandSpec],
                                  ScsiResult | None] | None = None
        """ALUA check (storaged.scsi.alua): set only while the LU's target port
        groups include a local one in standby, unavailable, offline or
        transitioning state.  Runs after unit attentions, before ``access_check``."""
        self.alua: Alua = Alua()
        """Target port groups (SPC-4 §5.16); the daemon attaches one shared
        :class:`~storaged.scsi.alua.Alua` to every LU.  Alone, an LU has the
        default: one active/optimized group 1 holding every port."""
        self.alua.attach(self)
        self.reset_hooks: list[Callable[[LogicalUnit, int, int], None]] = []
        """Called on logical unit / target reset with the UA (asc, ascq)."""
        self.reset_barriers: list[Any] = []
        """Futures a reset hook adds that the task management response should
        wait for (a shared LU: the other storage nodes have reset it too);
        taken by :meth:`ScsiTarget.take_reset_barriers`."""
        self.nexus_lost_hooks: list[Callable[[LogicalUnit, Nexus], None]] = []
        self.abort_hooks: list[Callable[[LogicalUnit, Nexus], None]] = []
        """Called by PREEMPT AND ABORT for each preempted I_T nexus: abort its
        tasks for this LU before the command completes (ScsiTarget forwards
        them to ``on_abort_nexus``)."""
        self.pr = PersistentReservations(self, pr_store)
        """Persistent and SPC-2 reservations (storaged.scsi.pr); ``pr_store``
        keeps them across restarts when the initiator asked for APTPL."""

    # ------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        return self._nblocks

    @property
    def tpgs(self) -> int:
        """INQUIRY TPGS field: ALUA implicit (1) and explicit (2) support."""
        return self.alua.tpgs

    @property
    def read_only(self) -> bool:
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self._read_only = bool(value)
        self._refresh_mode_state()

    @property
    def write_protected(self) -> bool:
        """Writes fail with DATA PROTECT (configured read-only, read-only device or SWP)."""
        return self._wp

    @property
    def online(self) -> bool:
        return self._online

    @online.setter
    def online(self, value: bool) -> None:
        value = bool(value)
        if value and not self._online:
            self._online = True
            self.add_unit_attention(*UA_NOT_READY_TO_READY)
        else:
            self._online = value

    @property
    def wce(self) -> bool:
        """Write cache enabled (caching mode page WCE, current value)."""
        return self._wce

    @wce.setter
    def wce(self, value: bool) -> None:
        self.mode.set_default_bit(mp.CACHING, 2, mp.WCE, bool(value))
        self._refresh_mode_state()

    @property
    def d_sense(self) -> bool:
        """Descriptor format sense data (control mode page D_SENSE)."""
        return self._d_sense

    def _refresh_mode_state(self) -> None:
        m = self.mode
        self._wce = m.bit(mp.CACHING, 2, mp.WCE)
        self._d_sense = m.bit(mp.CONTROL, 2, mp.D_SENSE)
        self._swp = m.bit(mp.CONTROL, 4, mp.SWP)
        self._wp = self._read_only or bool(getattr(self.device, "read_only", False)) \
            or self._swp

    def resize(self) -> int:
        """Re-read the capacity after the backing store changed size.

        Establishes CAPACITY DATA HAS CHANGED for every I_T nexus when the
        capacity differs; returns the new number of logical blocks."""
        refresh = getattr(self.device, "refresh_size", None)
        size = refresh() if refresh is not None else self.device.size
        nblocks = size // self.block_size
        if nblocks != self._nblocks:
            self._nblocks = nblocks
            self.add_unit_attention(*UA_CAPACITY_CHANGED)
        return nblocks

    # ------------------------------------------------------------ sense helpers
    def check(self, key: int, asc: int, ascq: int, info: int | None = None,
              sks: bytes | None = None) -> ScsiResult:
        """CHECK CONDITION in this LU's current sense format (control page D_SENSE)."""
        return ScsiResult(status=Status.CHECK_CONDITION,
                          sense=sense.build(key, asc, ascq, info, self._d_sense, sks))

    def invalid_cdb(self, byte: int, bit: int | None = None) -> ScsiResult:
        """ILLEGAL REQUEST, INVALID FIELD IN CDB with a field pointer."""
        return self.check(Key.ILLEGAL_REQUEST, 0x24, 0x00,
                          sks=sense.field_pointer(byte, bit, cdb=True))

    def invalid_param(self, byte: int, bit: int | None = None) -> ScsiResult:
        """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST with a field pointer."""
        return self.check(Key.ILLEGAL_REQUEST, 0x26, 0x00,
                          sks=sense.field_pointer(byte, bit, cdb=False))

    def param_list_length_error(self) -> ScsiResult:
        return self.check(Key.ILLEGAL_REQUEST, 0x1A, 0x00)

    def lba_out_of_range(self) -> ScsiResult:
        return self.check(Key.ILLEGAL_REQUEST, 0x21, 0x00)

    def write_protect_error(self) -> ScsiResult:
        return self.check(Key.DATA_PROTECT, 0x27, 0x00)

    def not_ready(self) -> ScsiResult:
        # LOGICAL UNIT NOT READY, OFFLINE (SPC-4 04h/12h)
        return self.check(Key.NOT_READY, 0x04, 0x12)

    def invalid_opcode(self) -> ScsiResult:
        return self.check(Key.ILLEGAL_REQUEST, 0x20, 0x00,
                          sks=sense.field_pointer(0, 7, cdb=True))

    # ------------------------------------------------------------ unit attentions
    def _state(self, nexus: Nexus) -> NexusState:
        key = (nexus.initiator_port, nexus.target_port)
        st = self._nexus.get(key)
        if st is None:
            st = self._nexus[key] = NexusState(nexus)
        return st

    @staticmethod
    def _push_ua(st: NexusState, asc: int, ascq: int) -> None:
        ua = st.ua
        if asc == 0x29:
            # A reset condition subsumes everything queued before it.
            st.ua = [(asc, ascq)]
            return
        if (asc, ascq) in ua:
            return
        if any(a == 0x29 for a, _ in ua):
            return  # the pending reset already tells the initiator to rescan
        if len(ua) < MAX_UA_QUEUE:
            ua.append((asc, ascq))

    def add_unit_attention(self, asc: int, ascq: int, except_nexus: Nexus | None = None,
                           only_nexus: Nexus | None = None) -> None:
        """Establish a unit attention for every known I_T nexus (or one/all-but-one).

        A nexus that has not sent a command yet gets POWER ON, RESET... on
        its first command anyway, which covers any earlier event."""
        skip = None if except_nexus is None else \
            (except_nexus.initiator_port, except_nexus.target_port)
        if only_nexus is not None:
            self._push_ua(self._state(only_nexus), asc, ascq)
            return
        for key, st in list(self._nexus.items()):
            if key != skip:
                self._push_ua(st, asc, ascq)

    def clear_unit_attention(self, nexus: Nexus, asc: int, ascq: int) -> None:
        st = self._nexus.get((nexus.initiator_port, nexus.target_port))
        if st is not None and (asc, ascq) in st.ua:
            st.ua = [u for u in st.ua if u != (asc, ascq)]

    def pending_unit_attentions(self, nexus: Nexus) -> list[tuple[int, int]]:
        st = self._nexus.get((nexus.initiator_port, nexus.target_port))
        return list(st.ua) if st is not None else [UA_POWER_ON_RESET]

    def take_unit_attention(self, nexus: Nexus) -> tuple[int, int] | None:
        """Remove and return the oldest pending UA of a nexus (REQUEST SENSE)."""
        st = self._state(nexus)
        try:
            return st.ua.pop(0)
        except IndexError:
            return None

    # ------------------------------------------------------------ resets and nexus loss
    def reset(self, asc: int = UA_BUS_DEVICE_RESET[0],
              ascq: int = UA_BUS_DEVICE_RESET[1]) -> None:
        """Logical unit reset (SAM-5 §6.3.3): mode pages back to their saved
        values, PREVENT state cleared, and a unit attention (default BUS
        DEVICE RESET FUNCTION OCCURRED) for every I_T nexus - including the
        one that asked for the reset, as libiscsi's MultipathIO.Reset expects.
        The transport aborts its own tasks."""
        self.mode.reset()
        self._refresh_mode_state()
        for st in self._nexus.values():
            st.ua = [(asc, ascq)]
            st.prevent = False
        for hook in list(self.reset_hooks):
            hook(self, asc, ascq)

    def nexus_lost(self, nexus: Nexus) -> None:
        """Forget everything about an I_T nexus (its session ended)."""
        self._nexus.pop((nexus.initiator_port, nexus.target_port), None)
        for hook in list(self.nexus_lost_hooks):
            hook(self, nexus)

    def nexuses(self) -> list[Nexus]:
        return [st.nexus for st in self._nexus.values()]

    def nexus_state(self, nexus: Nexus) -> NexusState:
        return self._state(nexus)

    # ------------------------------------------------------------ dispatch
    def lookup(self, cdb: bytes | bytearray | memoryview) -> CommandSpec | ScsiResult:
        """The spec for a CDB, or the CHECK CONDITION for an unknown command."""
        op = cdb[0]
        spec = self._plain[op]
        if spec is not None:
            return spec
        locate = SA_LOCATORS.get(op)
        sas = self._by_sa.get(op)
        if locate is None or not sas:
            return self.invalid_opcode()
        spec = sas.get(locate(bytes(cdb[:16])))
        if spec is None:
            byte, bit = SA_FIELD.get(op, DEFAULT_SA_FIELD)
            return self.invalid_cdb(byte, bit)
        return spec

    def may_block(self, cmd: ScsiCommand) -> bool:
        """True when the command may wait on the disk (flush, FUA or write-through
        write, verify...), so a transport should run it off its event loop."""
        cdb = cmd.cdb
        if not cdb:
            return False
        spec = self.lookup(cdb)
        if type(spec) is not CommandSpec:
            return False
        if spec.slow:
            return True
        if spec.write:
            return not self._wce or (len(cdb) > 1 and bool(cdb[1] & 0x08))
        # PERSISTENT RESERVE OUT waits for the other nodes of a shared LU.
        return cdb[0] == 0x5F and self.pr.backend.blocking

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        """Run one command; never raises."""
        cdb = cmd.cdb
        if not cdb:
            return self.invalid_opcode()
        spec = self._plain[cdb[0]]
        if spec is None:
            spec = self.lookup(cdb)
        gate = self.gate
        if gate is not None:
            # A sanitize operation in progress outranks unit attentions (SBC-3 §4.11.4).
            refused = gate(self, cmd, spec)
            if refused is not None:
                return refused
        nexus = cmd.nexus
        st = self._nexus.get((nexus.initiator_port, nexus.target_port))
        if st is None:
            st = self._state(nexus)
        if st.ua and (type(spec) is not CommandSpec or not spec.ua_exempt):
            try:
                asc, ascq = st.ua.pop(0)
            except IndexError:  # raced with another thread: nothing left
                pass
            else:
                return self.check(Key.UNIT_ATTENTION, asc, ascq)
        if type(spec) is not CommandSpec:
            return spec  # unknown opcode / service action
        n = spec.cdb_len
        if len(cdb) < n:
            return self.invalid_cdb(len(cdb))
        if cdb[n - 1] & 0x04:   # NACA: ACA is not supported (NormACA=0)
            return self.invalid_cdb(n - 1, 2)
        check = self.alua_check
        if check is not None:
            # Asymmetric access state of the arrival port (SPC-4 §5.16.2.4).
            refused = check(self, cmd, spec)
            if refused is not None:
                return refused
        check = self.access_check
        if check is not None:
            # Reservation conflicts are decided here, per the spec's access class.
            refused = check(self, cmd, spec)
            if refused is not None:
                return refused
        if spec.medium and not self._online:
            return self.not_ready()
        try:
            return spec.handler(self, cmd)
        except BlockDeviceError as e:
            log.warning("%s: %s failed: %s", self.name, spec.name, e)
            if spec.write:
                return self.check(Key.MEDIUM_ERROR, 0x0C, 0x00)   # WRITE ERROR
            return self.check(Key.MEDIUM_ERROR, 0x11, 0x00)       # UNRECOVERED READ ERROR
        except Exception:  # noqa: BLE001 - a bug must not kill the session
            log.exception("%s: %s raised", self.name, spec.name)
            return self.check(Key.HARDWARE_ERROR, 0x44, 0x00)     # INTERNAL TARGET FAILURE

