"""ONC RPC v2 over TCP (RFC 5531), sans-IO.

``RpcConnection`` takes stream bytes in (``receive_data``), reassembles
record-marked records (RFC 5531 §11: a 4-byte mark per fragment, top bit =
last fragment, low 31 bits = fragment length), decodes each call header and
hands out ``Call`` events (or ``Close`` when the stream is beyond repair).
Replies go back with ``reply`` / ``reply_error`` and leave through
``data_to_send``.  ``RpcService`` maps (program, version, procedure) to
handlers described by XDR tables and turns bad input into the protocol's own
errors: PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, AUTH_ERROR
(§9, §8.2).  Nothing here opens a socket or reads a clock.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storaged.fastio import extensions_disabled
from storaged.nfs.xdr import (
    UINT32,
    Array,
    Opaque,
    String,
    Struct,
    XdrError,
    XdrType,
)

log = logging.getLogger("storaged.nfs")

RPC_VERSION = 2

# msg_type, reply_stat, accept_stat, reject_stat, auth_stat (RFC 5531 §9)
CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
SUCCESS, PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR = range(6)
RPC_MISMATCH, AUTH_ERROR = 0, 1
AUTH_OK, AUTH_BADCRED, AUTH_REJECTEDCRED, AUTH_BADVERF, AUTH_REJECTEDVERF, AUTH_TOOWEAK = range(6)

# auth flavors (RFC 5531 §8.2, Appendix A)
AUTH_NONE, AUTH_SYS = 0, 1

MAX_AUTH_BYTES = 400
#: Largest record accepted (a 1 MiB WRITE plus headers fits many times over).
MAX_RECORD = 4 << 20
LAST_FRAGMENT = 0x80000000

OPAQUE_AUTH = Struct("opaque_auth", ("flavor", UINT32),
                     ("body", Opaque(MAX_AUTH_BYTES, copy=True)))

CALL_HEADER = Struct(
    "rpc_msg(call)",
    ("xid", UINT32), ("mtype", UINT32), ("rpcvers", UINT32), ("prog", UINT32),
    ("vers", UINT32), ("proc", UINT32), ("cred", OPAQUE_AUTH), ("verf", OPAQUE_AUTH),
)

AUTHSYS_PARMS = Struct(
    "authsys_parms", ("stamp", UINT32), ("machinename", String(255)), ("uid", UINT32),
    ("gid", UINT32), ("gids", Array(UINT32, 16)),
)

MISMATCH_INFO = Struct("mismatch_info", ("low", UINT32), ("high", UINT32))

_HDR6 = struct.Struct(">IIIIII")
_MARK = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Cred:
    """Who a call claims to be: AUTH_SYS ids, or all None for AUTH_NONE."""

    flavor: int = AUTH_NONE
    uid: int | None = None
    gid: int | None = None
    gids: tuple[int, ...] = ()
    machine: bytes = b""


@dataclass(slots=True)
class Call:
    """A decoded call: header fields, credential and the raw argument bytes."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: Cred
    args: memoryview
    peer: tuple[str, int] = ("", 0)
    #: the transport sends ``FileRange`` reply parts itself (sendfile); see FileRange
    zero_copy: bool = False
    #: the connection's scratch dict, where a ``Procedure.quick`` keeps what it has
    #: worked out for this client (the same dict for every call on the connection)
    local: dict[Any, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Close:
    """The stream is unusable (bad framing, oversized record): close after flushing."""

    reason: str


class FileRange:
    """A reply part that is ``count`` bytes of open file ``fd`` from ``offset``: the TCP
    shell sends it with sendfile(2) from the page cache instead of reading it into
    memory first.  The part owns ``fd`` (a dup): whoever sends it closes it.  Only
    handed out for calls with ``zero_copy`` set."""

    __slots__ = ("fd", "offset", "count")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count


class Encoded(list):  # type: ignore[type-arg]
    """Handler results already XDR-encoded, as a list of buffers sent back to back."""


class RpcError(Exception):
    """Raised by a handler to answer with an accept/reject status instead of results."""

    def __init__(self, accept_stat: int, detail: str = "") -> None:
        super().__init__(detail or f"accept_stat {accept_stat}")
        self.accept_stat = accept_stat


_CALL6 = struct.Struct(">IIIIII")
_TWO_WORDS = struct.Struct(">II")  # flavor + length of an auth; xid + message type


def parse_call_header_py(buf: memoryview
                         ) -> tuple[int, int, int, int, int, bytes, int, int] | None:
    """Fast path for ``CALL_HEADER``: ``(rpcvers, prog, vers, proc, cred flavor, cred body,
    verf flavor, offset of the arguments)``, or None if the header is malformed.

    Equivalent to decoding with the declarative table (a test checks this).  The
    pure-Python reference of ``parse_call_header`` (``_fastio._nfsrpc`` when built).
    """
    n = len(buf)
    if n < 40:
        return None
    _xid, _mtype, rpcvers, prog, vers, proc = _CALL6.unpack_from(buf, 0)
    flavor, blen = _TWO_WORDS.unpack_from(buf, 24)
    if blen > MAX_AUTH_BYTES:
        return None
    off = 32 + blen + (-blen & 3)
    if off + 8 > n:
        return None
    body = bytes(buf[32:32 + blen])
    vflavor, vlen = _TWO_WORDS.unpack_from(buf, off)
    if vlen > MAX_AUTH_BYTES:
        return None
    off += 8 + vlen + (-vlen & 3)
    if off > n:
        return None
    return rpcvers, prog, vers, proc, flavor, body, vflavor, off


parse_call_header = parse_call_header_py
if not extensions_disabled():
    try:
        from _fastio._nfsrpc import parse_call_header  # type: ignore[no-redef]
    except ImportError:
        pass


def decode_cred(auth: dict[str, Any]) -> Cred | None:
    """A Cred from an opaque_auth, or None if the flavor is unsupported or the body bad."""
    flavor = auth["flavor"]
    if flavor == AUTH_NONE:
        return Cred()
    if flavor == AUTH_SYS:
        try:
            p = AUTHSYS_PARMS.decode(auth["body"])
        except XdrError:
            return None
        return Cred(AUTH_SYS, p["uid"], p["gid"], tuple(p["gids"]), p["machinename"])
    return None


def encode_authsys(uid: int, gid: int, gids: tuple[int, ...] = (), machine: bytes = b"test",
                   stamp: int = 0) -> dict[str, Any]:
    """An AUTH_SYS opaque_auth (used by our own client and the tests)."""
    body = AUTHSYS_PARMS.encode({"stamp": stamp, "machinename": machine, "uid": uid,
                                 "gid": gid, "gids": list(gids)})
    return {"flavor": AUTH_SYS, "body": body}


def accepted_header(xid: int, stat: int = SUCCESS) -> bytes:
    """Reply header up to the results: MSG_ACCEPTED, AUTH_NONE verifier, ``stat``."""
    return _HDR6.pack(xid, REPLY, MSG_ACCEPTED, AUTH_NONE, 0, stat)


def frame(body_parts: list[bytes | bytearray | memoryview]) -> list[bytes | bytearray | memoryview]:
    """Record-mark one reply as a single last fragment."""
    n = sum(len(p) for p in body_parts)
    return [_MARK.pack(LAST_FRAGMENT | n), *body_parts]


def reply_success(xid: int, results: list[bytes | bytearray | memoryview]
                  ) -> list[bytes | bytearray | memoryview]:
    """A framed SUCCESS reply whose results are the concatenation of ``results``."""
    return frame([accepted_header(xid), *results])


def reply_accept(xid: int, stat: int, low: int = 0, high: int = 0
                 ) -> list[bytes | bytearray | memoryview]:
    """A framed accepted reply with a non-SUCCESS ``accept_stat`` (RFC 5531 §9)."""
    extra = struct.pack(">II", low, high) if stat == PROG_MISMATCH else b""
    return frame([accepted_header(xid, stat) + extra])


def reply_denied(xid: int, stat: int, auth: int = 0) -> list[bytes | bytearray | memoryview]:
    """A framed MSG_DENIED reply: RPC_MISMATCH (2..2) or AUTH_ERROR with ``auth``."""
    if stat == RPC_MISMATCH:
        body = struct.pack(">IIIIII", xid, REPLY, MSG_DENIED, RPC_MISMATCH,
                           RPC_VERSION, RPC_VERSION)
    else:
        body = struct.pack(">IIIII", xid, REPLY, MSG_DENIED, AUTH_ERROR, auth)
    return frame([body])


def encode_call(xid: int, prog: int, vers: int, proc: int, args: bytes = b"",
                cred: dict[str, Any] | None = None) -> bytes:
    """A whole call message (no record mark): header plus ``args``."""
    head = CALL_HEADER.encode({
        "xid": xid, "mtype": CALL, "rpcvers": RPC_VERSION, "prog": prog, "vers": vers,
        "proc": proc, "cred": cred or {"flavor": AUTH_NONE, "body": b""},
        "verf": {"flavor": AUTH_NONE, "body": b""}})
    return head + args


def record(message: bytes, fragment: int | None = None) -> bytes:
    """Record-mark ``message``, split into fragments of ``fragment`` bytes if given."""
    if not fragment:
        return _MARK.pack(LAST_FRAGMENT | len(message)) + message
    out = bytearray()
    for i in range(0, max(len(message), 1), fragment):
        chunk = message[i:i + fragment]
        last = i + fragment >= len(message)
        out += _MARK.pack((LAST_FRAGMENT if last else 0) | len(chunk)) + chunk
    return bytes(out)


def decode_reply(message: bytes | memoryview) -> tuple[int, int, memoryview]:
    """Client side: ``(xid, accept_stat, results)`` of an accepted reply.

    A denied reply raises RpcError with ``accept_stat`` = -1 - reject_stat.
    """
    buf = memoryview(message)
    xid, mtype, stat = struct.unpack_from(">III", buf, 0)
    if mtype != REPLY:
        raise XdrError("not a reply")
    if stat == MSG_DENIED:
        rstat = struct.unpack_from(">I", buf, 12)[0]
        raise RpcError(-1 - rstat, f"denied: reject_stat {rstat}")
    _verf, off = OPAQUE_AUTH.unpack(buf, 12)
    astat, off = UINT32.unpack(buf, off)
    return xid, astat, buf[off:]


def _exported(buf: bytearray) -> bool:
    """True while a memoryview (a record handed out, or a slice of one) still uses ``buf``:
    CPython refuses to resize an exported bytearray."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


#: Free space offered to each socket read (asyncio BufferedProtocol ``get_buffer``).
MIN_READ = 256 << 10


class RecordReader:
    """Record-marking reassembly (RFC 5531 §11), shared by server and client sides.

    Bytes land in one receive buffer, straight from the socket with
    ``get_buffer``/``buffer_updated`` (asyncio's BufferedProtocol) or copied in
    by ``feed``.  Whole single-fragment records are handed out as zero-copy
    memoryviews of that buffer (a 1 MiB WRITE is never copied in user space
    before its pwrite).  Bytes a record view may still reference are never
    overwritten: when more room is needed and views are alive, the unread tail
    moves to a fresh buffer; otherwise it is compacted in place.  A buffer
    always has room for the whole record being received, so records stay
    contiguous.
    """

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self.buf = bytearray(MIN_READ)
        self.start = 0      # first byte not yet parsed
        self.end = 0        # end of the received bytes
        self.view: memoryview | None = None  # base of the record views handed out
        self.need = 0       # bytes (from ``start``) the record being received needs
        self.frags: list[bytes] = []
        self.size = 0
        self.max_record = max_record

    def get_buffer(self, sizehint: int = 0) -> memoryview:
        """Writable space for the next socket read (at least MIN_READ bytes)."""
        want = max(self.need - (self.end - self.start), MIN_READ,
                   min(sizehint, self.max_record + 4))
        if len(self.buf) - self.end < want:
            self._make_room(want)
        return memoryview(self.buf)[self.end:]

    def _make_room(self, want: int) -> None:
        pending = self.end - self.start
        if self.view is not None:
            self.view.release()
            self.view = None
        size = len(self.buf)
        if pending + want <= size and not _exported(self.buf):
            if pending:
                self.buf[:pending] = self.buf[self.start:self.end]
        else:
            new = bytearray(max(size, pending + want))
            new[:pending] = memoryview(self.buf)[self.start:self.end]
            self.buf = new
        self.start = 0
        self.end = pending

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """``nbytes`` arrived after the last ``get_buffer``: the records they complete.

        ValueError when a record would exceed ``max_record``.
        """
        self.end += nbytes
        buf = self.buf
        pos = self.start
        end = self.end
        out: list[memoryview] = []
        while end - pos >= 4:
            mark = _MARK.unpack_from(buf, pos)[0]
            n = mark & 0x7FFFFFFF
            if self.size + n > self.max_record:
                raise ValueError(f"record larger than {self.max_record} bytes")
            if end - pos - 4 < n:
                self.need = 4 + n
                break
            if self.view is None:
                self.view = memoryview(buf)
            frag = self.view[pos + 4:pos + 4 + n]
            pos += 4 + n
            if mark & LAST_FRAGMENT:
                if self.frags:
                    self.frags.append(bytes(frag))
                    frag = memoryview(b"".join(self.frags))
                    self.frags = []
                self.size = 0
                out.append(frag)
            else:
                self.frags.append(bytes(frag))
                self.size += n
        else:
            self.need = 0
        self.start = pos
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Add stream bytes; return the records completed by them.  ValueError on abuse."""
        src = memoryview(data).cast("B")
        out: list[memoryview] = []
        while len(src):
            with self.get_buffer(len(src)) as dst:
                k = min(len(dst), len(src))
                dst[:k] = src[:k]
            src = src[k:]
            out += self.buffer_updated(k)
        return out


class RpcConnection:
    """One client's RPC stream, server side (sans-IO)."""

    def __init__(self, peer: tuple[str, int] = ("", 0), max_record: int = MAX_RECORD) -> None:
        self.peer = peer
        self.reader = RecordReader(max_record)
        self._events: list[Call | Close] = []
        self._out: list[bytes | bytearray | memoryview] = []
        self._creds: dict[tuple[int, bytes], Cred] = {}
        self.local: dict[Any, Any] = {}  # Call.local
        self.closed = False
        #: set by a transport that can send FileRange parts (Call.zero_copy)
        self.zero_copy = False
        #: set by the shell: runs a call at once, returning its reply, or None to
        #: have it go out as an event (``RpcService.run_inline``)
        self.inline: Callable[[Call], list[bytes | bytearray | memoryview] | None] | None = None

    # -- input
    def get_buffer(self, sizehint: int = 0) -> memoryview:
        """Where the next socket read should land (asyncio BufferedProtocol)."""
        if self.closed:
            return memoryview(bytearray(MIN_READ))
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer``; never raises on bad input."""
        if self.closed:
            return
        try:
            records = self.reader.buffer_updated(nbytes)
        except ValueError as e:
            self._close(str(e))
            return
        for rec in records:
            self._record(rec)

    def receive_data(self, data: bytes) -> None:
        """Feed stream bytes; never raises on bad input (it becomes an event or reply)."""
        if self.closed:
            return
        try:
            records = self.reader.feed(data)
        except ValueError as e:
            self._close(str(e))
            return
        for rec in records:
            self._record(rec)

    def _close(self, reason: str) -> None:
        self.closed = True
        self._events.append(Close(reason))

    def _record(self, rec: bytes | memoryview) -> None:
        buf = rec if type(rec) is memoryview else memoryview(rec)
        if len(buf) < 8:
            self._close("record shorter than an RPC header")
            return
        xid, mtype = _TWO_WORDS.unpack_from(buf, 0)
        if mtype != CALL:
            self._close(f"message type {mtype} is not a CALL")
            return
        hdr = parse_call_header(buf)
        if hdr is None:
            # Unreadable header: if the version word is there and wrong, say so.
            if len(buf) >= 12 and struct.unpack_from(">I", buf, 8)[0] != RPC_VERSION:
                self._denied(xid, RPC_MISMATCH)
            else:
                self._accepted(xid, GARBAGE_ARGS)
            return
        rpcvers, prog, vers, proc, flavor, body, verf_flavor, off = hdr
        if rpcvers != RPC_VERSION:
            self._denied(xid, RPC_MISMATCH)
            return
        key = (flavor, body)
        cred = self._creds.get(key)
        if cred is None:
            cred = decode_cred({"flavor": flavor, "body": body})
            if cred is None:
                self._denied(xid, AUTH_ERROR, AUTH_BADCRED)
                return
            if len(self._creds) > 64:
                self._creds.clear()
            self._creds[key] = cred
        if verf_flavor not in (AUTH_NONE, AUTH_SYS):
            self._denied(xid, AUTH_ERROR, AUTH_BADVERF)
            return
        call = Call(xid, prog, vers, proc, cred, buf[off:], self.peer, self.zero_copy,
                    self.local)
        inline = self.inline
        if inline is not None and not self._events:
            # Nothing queued ahead of it: its reply keeps its place in order.
            parts = inline(call)
            if parts is not None:
                self.send(parts)
                return
        self._events.append(call)

    # -- output
    def _accepted(self, xid: int, stat: int) -> None:
        self._out.extend(reply_accept(xid, stat))

    def _denied(self, xid: int, stat: int, auth: int = 0) -> None:
        self._out.extend(reply_denied(xid, stat, auth))

    def send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Queue an already framed reply (from ``RpcService.run``)."""
        if not self.closed:
            self._out.extend(parts)
            return
        for p in parts:
            if type(p) is FileRange:
                os.close(p.fd)  # never sent: the part owned the descriptor

    def next_events(self) -> list[Call | Close]:
        ev, self._events = self._events, []
        return ev

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        out, self._out = self._out, []
        return out


# ------------------------------------------------------------------ service

Handler = Callable[[Call, Any], Any]


@dataclass(slots=True)
class Procedure:
    """One procedure: XDR types of its arguments and results and the handler.

    ``handler(call, args)`` returns the result value (packed with ``res``),
    or raw bytes / ``Encoded`` buffers already encoded (hot paths).
    ``blocking`` procedures may wait for the disk; the shell runs them in a
    worker thread.
    """

    name: str
    args: XdrType
    res: XdrType
    handler: Handler
    blocking: bool = False
    fast_args: Callable[[memoryview], Any] | None = None
    """Decodes the arguments like ``args`` does, without the table walk, or
    returns None to leave it to ``args`` (hot procedures: READ, WRITE)."""
    quick: Callable[[Call, Any], list[bytes | bytearray | memoryview] | None] | None = None
    """``quick(call, args)`` with ``args`` from ``fast_args``: runs the call start to
    finish and returns its framed reply, or returns None, having done nothing,
    to leave it to the handler; only where the call may run on the caller's
    thread (``run_inline``).  Hot procedures: READ, WRITE."""


@dataclass
class Program:
    """An RPC program version: number, version and its procedures by number."""

    prog: int
    vers: int
    procs: dict[int, Procedure] = field(default_factory=dict)


class RpcService:
    """Routes calls to programs; everything that can go wrong becomes an RPC error."""

    def __init__(self) -> None:
        self.programs: dict[int, dict[int, Program]] = {}
        #: (prog, vers, proc) -> procedure, for ``run_inline`` (one lookup per call)
        self._procs: dict[tuple[int, int, int], Procedure] = {}

    def add(self, program: Program) -> None:
        self.programs.setdefault(program.prog, {})[program.vers] = program
        for num, proc in program.procs.items():
            self._procs[(program.prog, program.vers, num)] = proc

    def clear(self) -> None:
        """Forget every program."""
        self.programs.clear()
        self._procs.clear()

    def lookup(self, call: Call) -> Procedure | tuple[int, int, int]:
        """The procedure for ``call`` or ``(accept_stat, low, high)`` to answer with."""
        versions = self.programs.get(call.prog)
        if not versions:
            return (PROG_UNAVAIL, 0, 0)
        program = versions.get(call.vers)
        if program is None:
            return (PROG_MISMATCH, min(versions), max(versions))
        proc = program.procs.get(call.proc)
        if proc is None:
            return (PROC_UNAVAIL, 0, 0)
        return proc

    def run(self, call: Call, proc: Procedure, args: Any = None
            ) -> list[bytes | bytearray | memoryview]:
        """Decode args (unless given, already decoded), run the handler; the framed
        reply (safe to call from a thread)."""
        if args is None:
            try:
                fast = proc.fast_args
                args = fast(call.args) if fast is not None else None
                if args is None:
                    args = proc.args.decode(call.args)
            except XdrError as e:
                log.debug("%s: garbage args from %s: %s", proc.name, call.peer, e)
                return reply_accept(call.xid, GARBAGE_ARGS)
        try:
            result = proc.handler(call, args)
        except RpcError as e:
            if e.accept_stat < 0:
                return reply_denied(call.xid, AUTH_ERROR, -e.accept_stat)
            return reply_accept(call.xid, e.accept_stat)
        except Exception:
            log.exception("%s: handler failed", proc.name)
            return reply_accept(call.xid, SYSTEM_ERR)
        if isinstance(result, Encoded):
            return reply_success(call.xid, result)
        if isinstance(result, bytes | bytearray):
            return reply_success(call.xid, [result])
        out = bytearray()
        try:
            proc.res.pack(result, out)
        except XdrError:
            log.exception("%s: cannot encode result", proc.name)
            return reply_accept(call.xid, SYSTEM_ERR)
        return reply_success(call.xid, [out])

    def run_inline(self, call: Call) -> list[bytes | bytearray | memoryview] | None:
        """The reply to ``call`` if it can run now on the caller's thread (a
        non-blocking procedure, or an RPC error), else None."""
        proc = self._procs.get((call.prog, call.vers, call.proc))
        if proc is None:
            found = self.lookup(call)
            if isinstance(found, tuple):
                return reply_accept(call.xid, *found)
            proc = found
        if proc.blocking:
            return None
        quick = proc.quick
        if quick is not None and proc.fast_args is not None:
            args = proc.fast_args(call.args)
            if args is not None:  # else the tables decode it and say what is wrong
                try:
                    parts = quick(call, args)
                except Exception:  # noqa: BLE001 - an unexpected failure: the handler reports it
                    parts = None
                return parts if parts is not None else self.run(call, proc, args)
        return self.run(call, proc)

    def dispatch(self, conn: RpcConnection, call: Call) -> None:
        """Look up and run ``call`` inline, queueing the reply on ``conn``."""
        proc = self.lookup(call)
        if isinstance(proc, tuple):
            conn.send(reply_accept(call.xid, *proc))
            return
        conn.send(self.run(call, proc))
