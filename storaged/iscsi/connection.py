"""The sans-IO iSCSI target connection (RFC 7143), ErrorRecoveryLevel 0.

A Connection takes bytes in (``receive_data``), produces bytes to send
(``data_to_send``) and events for the shell (``next_events``): ``Execute``
when a SCSI command has all its data and its turn in CmdSN order, ``Close``
when the connection must end.  The shell runs the command against the SCSI
layer and hands the result back with ``complete``.  No sockets, no clocks
except the ``now`` values the shell passes to ``tick``.

Since MaxConnections is negotiated to 1, a session has exactly one
connection and the session-wide sequence numbers (CmdSN window) live here.

This module holds the full-feature session: dispatch, CmdSN ordering, the
SCSI command path (quick path, R2T/Data-Out, Data-In, status), NOP, Text,
Logout, task management and timers.  The receive buffer and PDU framing are
``storaged.iscsi.framing.PduFraming``, the login phase is
``storaged.iscsi.login.LoginPhase``; ``Connection`` inherits both.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from functools import partial

from storaged.fastio import crc32c, decode_bhs, encode_bhs
from storaged.iscsi import redirect, text
from storaged.iscsi.chap import ChapTarget
from storaged.iscsi.events import Close, Execute
from storaged.iscsi.framing import _RBUF_START, PduFraming, ProtocolError
from storaged.iscsi.login import LOGIN_MRDSL, STAGE_SECURITY, LoginPhase
from storaged.iscsi.params import Negotiator
from storaged.iscsi.pdu import BHS_LEN, PADS, RESERVED_TAG, Op, Pdu, build, frame
from storaged.iscsi.target import Registry, TargetContext
from storaged.scsi import sense
from storaged.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    Status,
    TmfFunction,
    TmfResponse,
    decode_lun,
)

log = logging.getLogger("storaged.iscsi")

# Reject reasons (§11.17.1).
REJ_DIGEST = 0x02
REJ_SNACK = 0x03
REJ_PROTOCOL = 0x04
REJ_NOT_SUPPORTED = 0x05
REJ_TASK_IN_PROGRESS = 0x07
REJ_INVALID_FIELD = 0x09

# ABORTED COMMAND / DATA PHASE ERROR for Data-Out sequence errors (SPC-4 4B/00).
_DATA_PHASE_ERROR = sense.check(sense.Key.ABORTED_COMMAND, 0x4B, 0x00)


def _sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b (RFC 1982, 32 bits) as CmdSN needs."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def _sn_in(sn: int, lo: int, hi: int) -> bool:
    """lo <= sn <= hi in serial arithmetic."""
    return ((sn - lo) & 0xFFFFFFFF) <= ((hi - lo) & 0xFFFFFFFF)


QuickCommand = Callable[..., "bytes | object | None"]
"""``quick(scsi, target_name, nexus_key, lun, cdb, expected_length, data_out,
alone, defer)`` (``storaged.iscsi.server.IscsiServer.quick_command``) runs a plain
READ/WRITE(10/16) that the core hands it straight from the receive buffer:

* it returns the read data (b"" for a write) when the command ended GOOD with
  exactly the expected length moved;
* or it returns None, having done nothing: the command goes the general way
  (``Execute``);
* or it calls ``defer()`` once, returns ``QUEUED``, and later calls what
  ``defer`` returned with the result: the data (b"" for a write), or None
  when the disk access failed (a READ then goes the general way, which
  reports the error; for a WRITE the connection is dropped, so nothing that
  did not reach the medium is acknowledged).

``alone``: no other whole PDU follows the command in the receive buffer.
``data_out`` is a view of the receive buffer, valid only during the call."""

QUEUED = object()
"""What a QuickCommand returns for a command it finishes later."""

_QUICK_FIELDS = struct.Struct(">QIII")   # LUN, ITT, EDTL, CmdSN: BHS bytes 8-27

_LUN_NUMBERS: dict[int, int] = {}


def _lun_number(lun_raw: int) -> int:
    """``decode_lun`` of a raw 64-bit LUN field, memoized (a session uses a
    handful of LUN values; decoding one per command showed in profiles)."""
    n = _LUN_NUMBERS.get(lun_raw)
    if n is None:
        n = decode_lun(lun_raw.to_bytes(8, "big"))
        if len(_LUN_NUMBERS) < 4096:
            _LUN_NUMBERS[lun_raw] = n
    return n


class Task:
    """One SCSI command from arrival to status."""

    __slots__ = ("itt", "lun", "lun_raw", "cdb", "cmdsn", "edtl", "read", "write", "attr",
                 "immediate", "buf", "received", "unsol_done", "unsol_limit", "r2t_next",
                 "r2ts", "r2tsn", "datasn", "executing", "aborted", "command", "delivered",
                 "unsol_datasn", "error")

    def __init__(self, itt: int, lun_raw: int, cdb: bytes, cmdsn: int, edtl: int, read: bool,
                 write: bool, attr: int, immediate: bool) -> None:
        self.itt = itt
        self.lun_raw = lun_raw
        self.lun = _lun_number(lun_raw)
        self.cdb = cdb
        self.cmdsn = cmdsn
        self.edtl = edtl
        self.read = read
        self.write = write
        self.attr = attr
        self.immediate = immediate
        self.buf: bytearray | bytes | None = None
        self.received = 0
        self.unsol_done = True
        self.unsol_limit = 0
        self.r2t_next = 0           # next buffer offset to solicit
        self.r2ts: dict[int, list[int]] = {}  # ttt -> [offset, length, next_datasn, got]
        self.r2tsn = 0
        self.datasn = 0
        self.unsol_datasn = 0
        self.executing = False
        self.aborted = False
        self.delivered = False
        self.command: ScsiCommand | None = None
        self.error: ScsiResult | None = None

    @property
    def data_complete(self) -> bool:
        return not self.write or self.received >= self.edtl


class Connection(PduFraming, LoginPhase):
    """One iSCSI connection/session on the target side."""

    def __init__(self, registry: Registry, local: tuple[str, int], peer: tuple[str, int],
                 nop_interval: float = 15.0, nop_timeout: float = 30.0,
                 login_timeout: float = 30.0, now: float = 0.0,
                 quick: QuickCommand | None = None) -> None:
        self.registry = registry
        self.quick = quick
        """Runs a plain READ/WRITE(10/16) at once (see ``QuickCommand``); None:
        every command goes out as an ``Execute`` event."""
        self._quick: Callable[..., bytes | object | None] | None = None
        self._quick_args: tuple = ()     # the command ``_quick_defer`` turns into a Task
        self.on_output: Callable[[], None] = lambda: None
        """Called when a queued quick command put its status out (the shell sends it)."""
        self.local = local
        self.peer = peer
        self._rbuf = bytearray(_RBUF_START)  # receive buffer: [_rstart, _rend) unparsed
        self._rwant = _RBUF_START  # buffer size to offer next (see _RBUF_BUSY)
        self._offered = 0
        self._rstart = 0
        self._rend = 0
        self._out: list[bytes | memoryview] = []
        self._events: list[Execute | Close] = []
        self.closed = False
        self.on_drop: Callable[[str], None] | None = None
        # Login state
        self.full_feature = False
        self.stage = STAGE_SECURITY
        self.login_started = False
        self.login_keys: list[tuple[str, str]] = []   # accumulates C-bit continuation
        self.neg = Negotiator()
        self.chap: ChapTarget | None = None
        self.auth_needed = False
        self.auth_done = False
        self.auth_method: str | None = None
        self.declared_tpgt = False
        self.initiator = ""
        self.alias = ""
        self.discovery = False
        self.target: TargetContext | None = None
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.nexus: Nexus | None = None
        self.redirect_keys: list[tuple[str, str]] = []  # TargetAddress of a redirect
        # Digest and segment limits (login uses defaults).
        self.hd = False
        self.dd = False
        self.max_recv = LOGIN_MRDSL   # what we accept
        self.max_send = LOGIN_MRDSL   # what the initiator accepts
        self.first_burst = 65536
        self.max_burst = 262144
        self.initial_r2t = True
        self.immediate_data = True
        self.max_r2t = 1
        # Sequence numbers
        self.statsn = 0
        self.expcmdsn = 0
        self.queue_depth = 128
        self.tasks: dict[int, Task] = {}
        self.waiting: dict[int, object] = {}   # cmdsn -> Task or deferred PDU
        self.ttt_next = 1
        self.text_pending: list[bytes] = []
        self.text_ttt = RESERVED_TAG
        self.text_itt = RESERVED_TAG
        # Liveness
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_deadline = now + login_timeout
        self.last_rx = now
        self.ping_sent_at: float | None = None
        self.ping_ttt = 0
        self.logout_sent = False

    # --------------------------------------------------------------- events
    def next_events(self) -> list[Execute | Close]:
        ev = self._events
        self._events = []
        return ev

    def drop(self, reason: str) -> None:
        """End the connection (and, at ERL 0, the session) abruptly."""
        if self.closed:
            return
        self.closed = True
        # A connection that never sent a Login (a health check's TCP connect) is debug.
        log.log(logging.INFO if self.login_started else logging.DEBUG,
                "connection %s:%s dropped: %s", self.peer[0], self.peer[1], reason)
        for task in self.tasks.values():
            task.aborted = True
        self._unregister()
        self._events.append(Close(reason))
        if self.on_drop is not None:
            self.on_drop(reason)

    def _unregister(self) -> None:
        if self.target is not None and self.tsih:
            key = (self.initiator, self.isid, self.target.name)
            if self.registry.sessions.get(key) is self:
                del self.registry.sessions[key]
            if self.nexus is not None:
                self.target.scsi.nexus_lost(self.nexus)

    # -------------------------------------------------------------- helpers
    @property
    def maxcmdsn(self) -> int:
        return (self.expcmdsn + self.queue_depth - 1) & 0xFFFFFFFF

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _reject(self, header: bytes, reason: int) -> None:
        header = bytes(header[:BHS_LEN])  # the rejected BHS is the data (§11.17)
        self._send(build(Op.REJECT, flags=0x80, b2=reason, data_len=BHS_LEN,
                         itt=RESERVED_TAG, w24=self._next_statsn(), w28=self.expcmdsn,
                         w32=self.maxcmdsn), header)

    def _data_digest_error(self, header: bytes) -> None:
        # §7.8.1: Reject the PDU; at ERL 0 the command it belongs to will not
        # complete normally, so fail the task too.
        (op, _imm, _fl, _b2, _b3, _a, _d, _lun, itt, *_rest) = decode_bhs(header)
        self._reject(header, REJ_DIGEST)
        task = self.tasks.get(itt)
        if task is not None and op == Op.DATA_OUT:
            self.drop("data digest error on Data-Out at ErrorRecoveryLevel 0")

    # ------------------------------------------------------------- dispatch
    def _dispatch(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if not self.full_feature:
            if op != Op.LOGIN_REQ:
                raise ProtocolError(f"opcode 0x{op:02x} before login completed")
            self._login(pdu)
            return
        if op == Op.SCSI_CMD:
            self._scsi_command(pdu)
        elif op == Op.DATA_OUT:
            self._data_out(pdu)
        elif op == Op.NOP_OUT:
            self._ordered(pdu, self._nop_out)
        elif op == Op.TMF_REQ:
            self._ordered(pdu, self._tmf)
        elif op == Op.TEXT_REQ:
            self._ordered(pdu, self._text)
        elif op == Op.LOGOUT_REQ:
            self._ordered(pdu, self._logout)
        elif op == Op.LOGIN_REQ:
            # §6.3: a Login Request in full feature phase is a protocol error.
            self._reject(pdu.header, REJ_PROTOCOL)
            self.drop("login request in full feature phase")
        elif op == Op.SNACK:
            self._reject(pdu.header, REJ_SNACK if pdu.flags & 0x0F else REJ_NOT_SUPPORTED)
        else:
            self._reject(pdu.header, REJ_NOT_SUPPORTED)

    def _ordered(self, pdu: Pdu, handler: Callable[[Pdu], None]) -> None:
        """Deliver non-SCSI requests in CmdSN order; immediate ones at once."""
        cmdsn = pdu.w24
        if pdu.immediate:
            handler(pdu)
            return
        if not _sn_in(cmdsn, self.expcmdsn, self.maxcmdsn):
            return  # §4.2.2.1: silently ignore commands outside the window
        if cmdsn == self.expcmdsn:
            self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
            handler(pdu)
            self._drain_waiting()
        else:
            self.waiting[cmdsn] = (pdu, handler)

    def _drain_waiting(self) -> None:
        while self.expcmdsn in self.waiting and not self.closed:
            item = self.waiting.pop(self.expcmdsn)
            self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
            if isinstance(item, Task):
                self._deliver(item)
            else:
                pdu, handler = item  # type: ignore[misc]
                handler(pdu)

    # ------------------------------------------------------------ SCSI path
    def _scsi_command(self, pdu: Pdu) -> None:
        if self.discovery:
            self._reject(pdu.header, REJ_PROTOCOL)
            return
        cmdsn = pdu.w24
        if not pdu.immediate and not _sn_in(cmdsn, self.expcmdsn, self.maxcmdsn):
            return  # §4.2.2.1 out of window: silently ignored
        itt = pdu.itt
        if itt in self.tasks or itt == RESERVED_TAG:
            self._reject(pdu.header, REJ_TASK_IN_PROGRESS if itt != RESERVED_TAG
                         else REJ_INVALID_FIELD)
            return
        flags = pdu.flags
        read = bool(flags & 0x40)
        write = bool(flags & 0x20)
        edtl = pdu.w20
        dlen = len(pdu.data)
        if dlen and (not write or not self.immediate_data or dlen > edtl
                     or dlen > self.first_burst):
            self._reject(pdu.header, REJ_PROTOCOL)
            return
        cdb = pdu.cdb
        if pdu.ahs_len:
            cdb = self._extended_cdb(pdu)
            if cdb is None:
                self._reject(pdu.header, REJ_INVALID_FIELD)
                return
        task = Task(itt, pdu.lun, cdb, cmdsn, edtl, read, write, flags & 7, pdu.immediate)
        if write and edtl:
            if dlen == edtl:
                task.buf = pdu.data  # all data came as immediate data: no copy
            else:
                task.buf = bytearray(edtl)
                task.buf[:dlen] = pdu.data
            task.received = dlen
            if not self.initial_r2t and not (flags & 0x80):
                task.unsol_done = False
                task.unsol_limit = min(self.first_burst, edtl)
            task.r2t_next = max(dlen, task.unsol_limit)
        self.tasks[itt] = task
        if pdu.immediate:
            self._deliver(task)
        elif cmdsn == self.expcmdsn:
            self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
            self._deliver(task)
            self._drain_waiting()
        else:
            self.waiting[cmdsn] = task

    def _quick_command(self, quick: Callable[..., bytes | object | None], mv: memoryview,
                       pos: int, dstart: int, dlen: int, alone: bool) -> bool:
        """A SCSI Command PDU (opcode byte 0x01: not immediate) that may go
        to ``quick`` (QuickCommand): in CmdSN order with nothing queued ahead
        of it, SIMPLE or untagged, READ with its data fitting one Data-In PDU
        or WRITE with all its data immediate.  True once ``quick`` took it;
        False (nothing changed) sends it down the general path."""
        b1 = mv[pos + 1]
        if b1 & 0x87 > 0x81 or b1 & 0x80 == 0:   # F bit; ATTR 0 (untagged) or 1 (SIMPLE)
            return False
        lun_raw, itt, edtl, cmdsn = _QUICK_FIELDS.unpack_from(mv, pos + 8)
        # Commands parsed before it in this pass but not yet run (_events)
        # keep their turn: it goes the general way behind them.
        if cmdsn != self.expcmdsn or self.waiting or self._events or itt in self.tasks \
                or itt == RESERVED_TAG or not edtl:
            return False
        rw = b1 & 0x60
        cdb = bytes(mv[pos + 32:pos + 48])
        if rw == 0x40:
            if dlen or edtl > self.max_send or edtl > self.max_burst:
                return False
            self._quick_args = (itt, lun_raw, cdb, cmdsn, edtl, True, b1 & 7)
            result = quick(_lun_number(lun_raw), cdb, edtl, None, alone, self._quick_defer)
        else:
            if rw != 0x20 or dlen != edtl or not self.immediate_data or dlen > self.first_burst:
                return False
            self._quick_args = (itt, lun_raw, cdb, cmdsn, edtl, False, b1 & 7)
            with mv[dstart:dstart + dlen] as payload:
                result = quick(_lun_number(lun_raw), cdb, edtl, payload, alone,
                               self._quick_defer)
        if result is None:
            return False
        self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        if result is not QUEUED:
            self._quick_status(itt, lun_raw, edtl, result)  # type: ignore[arg-type]
        return True

    def _quick_status(self, itt: int, lun_raw: int, edtl: int, data: bytes) -> None:
        """GOOD status of a quick command: for a READ one Data-In with the data
        and the phase-collapsed status (§11.7.4), for a WRITE a SCSI Response."""
        if data:
            self._one_data_in(itt, lun_raw, data, edtl, 0x81, 0, self._next_statsn(), 0, 0)
        else:
            self._bare_response(itt, 0, 0, 0, 0)

    def _one_data_in(self, itt: int, lun_raw: int, data: bytes | memoryview, length: int,
                     flags: int, status: int, statsn: int, datasn: int, resid: int) -> None:
        """A Data-In PDU carrying all of ``data[:length]`` at offset 0."""
        hdr = encode_bhs(Op.DATA_IN, False, flags, 0, status, 0, length, lun_raw, itt,
                         RESERVED_TAG, statsn, self.expcmdsn, self.maxcmdsn, datasn, 0, resid)
        out = self._out
        out.append(hdr)
        if self.hd:
            out.append(crc32c(hdr).to_bytes(4, "little"))
        out.append(data if len(data) == length else memoryview(data)[:length])
        pad = PADS[length & 3]
        if pad:
            out.append(pad)

    def _bare_response(self, itt: int, resid_flags: int, status: int, expdatasn: int,
                       resid: int) -> None:
        """A SCSI Response without sense data: one header, no data segment."""
        hdr = encode_bhs(Op.SCSI_RSP, False, 0x80 | resid_flags, 0, status, 0, 0, 0, itt, 0,
                         self._next_statsn(), self.expcmdsn, self.maxcmdsn, expdatasn, 0, resid)
        self._out.append(hdr)
        if self.hd:
            self._out.append(crc32c(hdr).to_bytes(4, "little"))

    def _quick_defer(self) -> Callable[[bytes | None], None]:
        """The quick command being handed out will finish later: track it as
        a Task (task management and a dropped connection see it) and return
        its completion callback."""
        itt, lun_raw, cdb, cmdsn, edtl, read, attr = self._quick_args
        task = Task(itt, lun_raw, cdb, cmdsn, edtl, read, not read, attr, False)
        task.delivered = task.executing = True
        if not read:
            task.received = edtl
        self.tasks[itt] = task
        return partial(self._quick_done, task)

    def _quick_done(self, task: Task, result: bytes | None) -> None:
        if task.aborted or self.closed:
            return
        if result is not None:
            self.tasks.pop(task.itt, None)
            self._quick_status(task.itt, task.lun_raw, task.edtl, result)
        elif task.read:
            task.executing = False
            self._ready(task)        # the general path reads again and reports the error
        else:
            self.drop("write error: the data of a WRITE did not reach the medium")
        self.on_output()

    @staticmethod
    def _extended_cdb(pdu: Pdu) -> bytes | None:
        """CDB from the BHS plus an Extended CDB AHS (§11.3.5, AHSType 1)."""
        ahs = bytes(pdu.header[BHS_LEN:])
        pos = 0
        cdb = pdu.cdb
        while pos + 4 <= len(ahs):
            length = int.from_bytes(ahs[pos:pos + 2], "big")
            kind = ahs[pos + 2]
            body = ahs[pos + 4:pos + 3 + length]
            if kind == 1:
                cdb += body
            elif kind != 2:  # 2: bidirectional read length, ignored
                return None
            pos += (3 + length + 3) & ~3
        return cdb

    def _deliver(self, task: Task) -> None:
        """The command's turn has come: solicit data or run it."""
        if task.aborted:
            return
        task.delivered = True
        if task.data_complete:
            self._ready(task)
        elif task.unsol_done:
            self._send_r2ts(task)

    def _ready(self, task: Task) -> None:
        if task.executing or task.aborted:
            return
        task.executing = True
        if task.error is not None:
            self.complete(task, task.error)
            return
        data = None
        if task.buf is not None:
            data = memoryview(task.buf)[:task.received]
        task.command = ScsiCommand(task.cdb, task.lun, self.nexus, data,  # type: ignore
                                   task.edtl, task.read, task.write, task.itt, task.attr)
        self._events.append(Execute(task))

    def _send_r2ts(self, task: Task) -> None:
        while (len(task.r2ts) < self.max_r2t and task.r2t_next < task.edtl):
            off = task.r2t_next
            length = min(self.max_burst, task.edtl - off)
            ttt = self.ttt_next
            self.ttt_next = (self.ttt_next + 1) & 0x7FFFFFFF or 1
            task.r2ts[ttt] = [off, length, 0, 0]
            task.r2t_next = off + length
            self._send(build(Op.R2T, flags=0x80, lun=task.lun_raw, itt=task.itt, w20=ttt,
                             w24=self.statsn, w28=self.expcmdsn, w32=self.maxcmdsn,
                             w36=task.r2tsn, w40=off, w44=length))
            task.r2tsn += 1

    def _data_out(self, pdu: Pdu) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None or task.aborted or not task.write or task.buf is None:
            if task is None or task.aborted:
                return  # data for an aborted/finished task is discarded (§11.5.1)
            self._reject(pdu.header, REJ_PROTOCOL)
            return
        ttt = pdu.w20
        datasn = pdu.w36
        off = pdu.w40
        n = len(pdu.data)
        if off + n > task.edtl or task.received >= task.edtl:
            self._reject(pdu.header, REJ_PROTOCOL)
            self.drop("Data-Out beyond the expected data transfer length")
            return
        if ttt == RESERVED_TAG:
            if task.unsol_done:
                self._reject(pdu.header, REJ_PROTOCOL)
                return
            if datasn != task.unsol_datasn:
                task.error = _DATA_PHASE_ERROR
            task.unsol_datasn += 1
            if off + n > task.unsol_limit:
                self._reject(pdu.header, REJ_PROTOCOL)
                self.drop("unsolicited data beyond FirstBurstLength")
                return
            task.buf[off:off + n] = pdu.data
            task.received += n
            if pdu.final:
                task.unsol_done = True
                if task.delivered and not task.data_complete:
                    self._send_r2ts(task)
        else:
            r2t = task.r2ts.get(ttt)
            if r2t is None:
                self._reject(pdu.header, REJ_INVALID_FIELD)
                return
            if datasn != r2t[2]:
                # §7.9: at ERL 0 the target cannot recover a DataSN gap within the
                # command; fail the command once its data is in (the connection
                # survives for the initiator's other tasks).
                task.error = _DATA_PHASE_ERROR
            if off < r2t[0] or off + n > r2t[0] + r2t[1]:
                self.drop("Data-Out outside the R2T's buffer range")
                return
            r2t[2] += 1
            r2t[3] += n
            task.buf[off:off + n] = pdu.data
            task.received += n
            if pdu.final or r2t[3] >= r2t[1]:
                del task.r2ts[ttt]
                if task.delivered and task.r2t_next < task.edtl:
                    self._send_r2ts(task)
        if task.delivered and task.data_complete and not task.r2ts:
            self._ready(task)

    def complete(self, task: Task, result: ScsiResult) -> None:
        """Send Data-In and/or SCSI Response for a finished command."""
        self.tasks.pop(task.itt, None)
        if task.aborted or self.closed:
            return
        status = result.status
        data = result.data
        edtl = task.edtl
        if task.read:
            have = len(data) if data is not None else 0
            wanted = result.transfer_length if result.transfer_length is not None else have
        elif task.write:
            have = 0
            wanted = (result.transfer_length if result.transfer_length is not None
                      else task.received)
        else:
            have = 0
            wanted = result.transfer_length or (len(data) if data is not None else 0)
        if status != Status.GOOD and status != Status.CONDITION_MET:
            have = 0
        send = min(have, edtl) if task.read else 0
        resid_flags = 0
        resid = 0
        if status in (Status.GOOD, Status.CONDITION_MET):
            if wanted > edtl:
                resid_flags, resid = 0x04, wanted - edtl
            elif wanted < edtl:
                resid_flags, resid = 0x02, edtl - wanted
        if send and result.sense is None:
            self._data_in(task, data, send, status, resid_flags, resid)  # type: ignore
            return
        if send:
            self._data_in(task, data, send, None, 0, 0)  # type: ignore
        if not result.sense:
            self._bare_response(task.itt, resid_flags, status,
                                task.datasn if task.read else task.r2tsn, resid)
            return
        payload = b""
        if result.sense:
            payload = len(result.sense).to_bytes(2, "big") + result.sense
        hdr = build(Op.SCSI_RSP, flags=0x80 | resid_flags, b2=0, b3=status,
                    data_len=len(payload), itt=task.itt, w24=self._next_statsn(),
                    w28=self.expcmdsn, w32=self.maxcmdsn,
                    w36=task.datasn if task.read else task.r2tsn, w44=resid)
        self._send(hdr, payload)

    def _data_in(self, task: Task, data: bytes | memoryview, length: int,
                 status: int | None, resid_flags: int, resid: int) -> None:
        seg = self.max_send
        burst = self.max_burst
        hd, dd = self.hd, self.dd
        out = self._out
        if length <= seg and length <= burst and not dd:
            # One PDU carries it all (every 4 KiB read), with the
            # phase-collapsed status (§11.7.4) when there is one.
            if status is not None:
                self._one_data_in(task.itt, task.lun_raw, data, length, 0x81 | resid_flags,
                                  status, self._next_statsn(), task.datasn, resid)
            else:
                self._one_data_in(task.itt, task.lun_raw, data, length, 0x80, 0, 0,
                                  task.datasn, 0)
            task.datasn += 1
            return
        mv = memoryview(data)
        off = 0
        while off < length:
            n = min(seg, length - off, burst - off % burst)
            last = off + n >= length
            flags = 0
            if last or (off + n) % burst == 0:
                flags |= 0x80
            if last and status is not None:
                flags |= 0x01 | resid_flags
                statsn = self._next_statsn()
            else:
                statsn = 0
            hdr = build(Op.DATA_IN, flags=flags, b3=status if (last and status is not None)
                        else 0, data_len=n, lun=task.lun_raw, itt=task.itt, w20=RESERVED_TAG,
                        w24=statsn, w28=self.expcmdsn, w32=self.maxcmdsn, w36=task.datasn,
                        w40=off, w44=resid if (last and status is not None) else 0)
            task.datasn += 1
            out.extend(frame(hdr, mv[off:off + n], hd, dd))
            off += n

    # ------------------------------------------------------------- NOP/Text
    def _nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == RESERVED_TAG:
            if pdu.w20 != RESERVED_TAG and pdu.w20 == self.ping_ttt:
                self.ping_sent_at = None
            return
        data = pdu.data[:self.max_send]
        self._send(build(Op.NOP_IN, flags=0x80, data_len=len(data), lun=pdu.lun, itt=pdu.itt,
                         w20=RESERVED_TAG, w24=self._next_statsn(), w28=self.expcmdsn,
                         w32=self.maxcmdsn), data)

    def _text(self, pdu: Pdu) -> None:
        if pdu.w20 != RESERVED_TAG:
            # Continuation of a long response (§11.10.4).
            if pdu.w20 != self.text_ttt or not self.text_pending:
                self._reject(pdu.header, REJ_INVALID_FIELD)
                return
            self._text_send(pdu.itt)
            return
        try:
            pairs = text.decode(pdu.data)
        except text.TextError:
            self._reject(pdu.header, REJ_PROTOCOL)
            return
        out: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                out += self._send_targets(value)
            elif (count := redirect.answer_counts(self.registry, self.local, key)) is not None:
                out.append((key, count))
        others = [(k, v) for k, v in pairs if k != "SendTargets"
                  and redirect.answer_counts(self.registry, self.local, k) is None]
        if others:
            out += self.neg.respond(others, in_login=False)
            self.max_send = self.neg.num("MaxRecvDataSegmentLength")
        body = text.encode(out)
        self.text_pending = [body[i:i + self.max_send]
                             for i in range(0, len(body), self.max_send)] or [b""]
        self._text_send(pdu.itt)

    def _text_send(self, itt: int) -> None:
        chunk = self.text_pending.pop(0)
        more = bool(self.text_pending)
        if more:
            self.text_ttt = self.ttt_next
            self.ttt_next = (self.ttt_next + 1) & 0x7FFFFFFF or 1
        else:
            self.text_ttt = RESERVED_TAG
        self._send(build(Op.TEXT_RSP, flags=0x40 if more else 0x80, data_len=len(chunk),
                         itt=itt, w20=self.text_ttt, w24=self._next_statsn(),
                         w28=self.expcmdsn, w32=self.maxcmdsn), chunk)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        """SendTargets (§Appendix C): only what this initiator may see."""
        out: list[tuple[str, str]] = []
        group = redirect.group_portal(self.registry, self.local)
        if value == "All" and not self.discovery:
            return [("SendTargets", "Reject")]
        if group is not None:
            # A group portal lists itself as the address of every target (§13.8).
            for t in redirect.group_targets(self.registry, self.initiator, value, self.target):
                out += [("TargetName", t.name), ("TargetAddress", f"{group},{t.tpgt}")]
            return out
        if value == "All":
            targets = self.registry.visible(self.initiator, self.local)
        elif value == "" or value is None:
            targets = [self.target] if self.target else []
        else:
            t = self.registry.target(value)
            targets = [t] if t and t.allowed(self.initiator) and t.served_on(self.local) else []
        for t in targets:
            out.append(("TargetName", t.name))
            for ip, port in t.portals:
                if ip in ("0.0.0.0", "::"):
                    ip = self.local[0]
                host = f"[{ip}]" if ":" in ip else ip
                out.append(("TargetAddress", f"{host}:{port},{t.tpgt}"))
        return out

    # -------------------------------------------------------------- logout
    def _logout(self, pdu: Pdu) -> None:
        reason = pdu.flags & 0x7F
        response = 0
        if reason == 2:
            response = 2  # connection recovery is not supported at ERL 0
        self._send(build(Op.LOGOUT_RSP, flags=0x80, b2=response, itt=pdu.itt,
                         w24=self._next_statsn(), w28=self.expcmdsn, w32=self.maxcmdsn,
                         w40=(2 << 16) | 0))
        if response == 0:
            for task in self.tasks.values():
                task.aborted = True
            self.closed = True
            self._unregister()
            self._events.append(Close("logout"))

    # ----------------------------------------------------- task management
    def _tmf(self, pdu: Pdu) -> None:
        fn = pdu.flags & 0x7F
        lun = decode_lun(pdu.lun.to_bytes(8, "big"))
        resp = TmfResponse.COMPLETE
        target = self.target
        if self.discovery or target is None:
            resp = TmfResponse.REJECTED
        elif fn == TmfFunction.ABORT_TASK:
            task = self.tasks.get(pdu.w20)
            ref = pdu.w32
            if task is not None:
                if task.lun == lun:
                    self._abort(task)
                else:
                    resp = TmfResponse.NO_TASK
            elif ref in self.waiting:
                self.waiting[ref] = (None, lambda _p: None)
            elif _sn_in(ref, self.expcmdsn, self.maxcmdsn) and _sn_lt(ref, pdu.w24):
                # §11.5.1 b): the command never arrived; count its CmdSN as received.
                self.waiting[ref] = (None, lambda _p: None)
                self._drain_waiting()
            else:
                resp = TmfResponse.NO_TASK  # already completed, or never existed
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                    TmfFunction.LOGICAL_UNIT_RESET):
            if lun not in target.scsi.luns:
                resp = TmfResponse.NO_LUN
            else:
                conns = [self] if fn == TmfFunction.ABORT_TASK_SET else \
                    self.registry.connections(target.name)
                for conn in conns:
                    for task in list(conn.tasks.values()):
                        if task.lun == lun:
                            conn._abort(task)
                if fn == TmfFunction.LOGICAL_UNIT_RESET:
                    resp = target.scsi.task_management(fn, lun, self.nexus)  # type: ignore
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            for conn in self.registry.connections(target.name):
                for task in list(conn.tasks.values()):
                    conn._abort(task)
            resp = target.scsi.task_management(fn, lun, self.nexus)  # type: ignore
        elif fn == TmfFunction.CLEAR_ACA:
            resp = TmfResponse.NOT_SUPPORTED
        elif fn == TmfFunction.TASK_REASSIGN:
            resp = TmfResponse.NO_REASSIGN
        else:
            resp = TmfResponse.REJECTED
        take = getattr(target.scsi, "take_reset_barriers", None) if target is not None else None
        waits = take() if take is not None else []
        if waits:
            # A shared LU: answer once the other storage nodes have reset it too.
            left = [len(waits)]

            def one(_f: object) -> None:
                left[0] -= 1
                if left[0] == 0 and not self.closed:
                    self._tmf_respond(pdu, fn, resp, target)
                    self.on_output()
            for w in waits:
                w.add_done_callback(one)
            return
        self._tmf_respond(pdu, fn, resp, target)

    def _tmf_respond(self, pdu: Pdu, fn: int, resp: int,
                     target: TargetContext | None) -> None:
        self._send(build(Op.TMF_RSP, flags=0x80, b2=resp, itt=pdu.itt,
                         w24=self._next_statsn(), w28=self.expcmdsn, w32=self.maxcmdsn))
        if fn == TmfFunction.TARGET_COLD_RESET and resp == TmfResponse.COMPLETE \
                and target is not None:
            # §11.5.1: a cold reset also closes every connection to the target.
            for conn in self.registry.connections(target.name):
                if conn is not self:
                    conn.drop("target cold reset")
            self.closed = True
            self._unregister()
            self._events.append(Close("target cold reset"))

    def abort_lun_tasks(self, lun: int) -> None:
        """Abort this session's tasks on ``lun`` without status (TAS=0), e.g. for
        PREEMPT AND ABORT; late Data-Out for them is discarded."""
        for task in list(self.tasks.values()):
            if task.lun == lun:
                self._abort(task)

    def _abort(self, task: Task) -> None:
        task.aborted = True
        self.tasks.pop(task.itt, None)
        if task.cmdsn in self.waiting and self.waiting[task.cmdsn] is task:
            # Its CmdSN still counts as received (§11.5.1 c).
            self.waiting[task.cmdsn] = (None, lambda _p: None)

    # --------------------------------------------------------------- timers
    def tick(self, now: float) -> None:
        """Periodic housekeeping: login timeout, NOP-In pings, dead peers."""
        if self.closed:
            return
        if not self.full_feature:
            if now > self.login_deadline:
                self.drop("login timed out")
            return
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at > self.nop_timeout:
                self.drop("initiator did not answer NOP-In")
            return
        if self.nop_interval and now - self.last_rx > self.nop_interval:
            self.ping_ttt = self.ttt_next
            self.ttt_next = (self.ttt_next + 1) & 0x7FFFFFFF or 1
            self.ping_sent_at = now
            self._send(build(Op.NOP_IN, flags=0x80, lun=0, itt=RESERVED_TAG, w20=self.ping_ttt,
                             w24=self.statsn, w28=self.expcmdsn, w32=self.maxcmdsn))

    def touch(self, now: float) -> None:
        """The shell saw bytes from the peer at ``now``."""
        self.last_rx = now

    def request_logout(self, seconds: int = 5) -> None:
        """Async Message: ask the initiator to log out (daemon shutdown)."""
        if self.closed or not self.full_feature or self.logout_sent:
            return
        self.logout_sent = True
        self._send(build(Op.ASYNC, flags=0x80, lun=0, itt=RESERVED_TAG, w20=0,
                         w24=self._next_statsn(), w28=self.expcmdsn, w32=self.maxcmdsn,
                         w36=(1 << 24) | seconds, w40=0))
