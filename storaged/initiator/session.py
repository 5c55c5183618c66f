"""The sans-IO iSCSI initiator connection (RFC 7143), ErrorRecoveryLevel 0.

The initiator role of the same PDU tables the target uses
(``storaged.iscsi.pdu``, ``text``, ``chap``, ``params``).  An
``InitiatorConnection`` takes bytes in (``receive_data``), gives bytes to
send (``data_to_send``) and events (``next_events``); it never opens a
socket or reads a clock.  One connection per session (MaxConnections=1), so
the session's CmdSN window lives here too.

Flow: ``start()`` queues the first Login Request; the events say how login
ends (``LoginDone``, ``LoginFailed``, ``Redirected``).  In full feature phase
``submit`` queues SCSI commands (sent as the CmdSN window allows, §4.2.2.1)
and each ends with one ``CommandDone``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from storaged.fastio import crc32c
from storaged.iscsi import text
from storaged.iscsi.chap import CHAP_MD5, ChapError, decode_binary, response
from storaged.iscsi.params import BOOL_AND, BOOL_OR, DECLARATIVE, KEYS, LIST, NUM_MAX, NUM_MIN
from storaged.iscsi.pdu import BHS_LEN, RESERVED_TAG, Op, Pdu, build, frame


def random_isid() -> int:
    """A 48-bit ISID of type 2 (§11.12.5: T=10b, A=0, B/C/D random)."""
    return (0x80 << 40) | secrets.randbits(32)


def _sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number a < b (32 bits)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def _sn_le(a: int, b: int) -> bool:
    return a == b or _sn_lt(a, b)


class InitiatorError(Exception):
    """The target broke the protocol; the connection must be dropped."""


# ---------------------------------------------------------------- events
@dataclass(slots=True)
class LoginDone:
    """Full feature phase reached (or discovery session open)."""

    tsih: int
    params: dict[str, str]


@dataclass(slots=True)
class LoginFailed:
    """Login refused with an iSCSI status class/detail (§11.13.5)."""

    status: int
    message: str


#: Login status class 1 details (§11.13.5): where the target went.
MOVED_TEMPORARILY = 0x0101
MOVED_PERMANENTLY = 0x0102


@dataclass(slots=True)
class Redirected:
    """Login status 0x0101/0x0102: try ``address`` (host, port) instead."""

    status: int
    host: str
    port: int


@dataclass(slots=True)
class CommandDone:
    """A SCSI command ended: status, sense, read data and the residual."""

    tag: int
    status: int
    sense: bytes = b""
    data: bytes = b""
    residual: int = 0
    response: int = 0     # iSCSI response code (0 = command completed at target)


@dataclass(slots=True)
class TmfDone:
    tag: int
    response: int


@dataclass(slots=True)
class NopReply:
    tag: int
    data: bytes


@dataclass(slots=True)
class TextDone:
    tag: int
    pairs: list[tuple[str, str]]


@dataclass(slots=True)
class AsyncEvent:
    """Asynchronous Message (§11.9): event code, parameters, any sense data."""

    event: int
    param1: int
    param2: int
    param3: int
    sense: bytes


@dataclass(slots=True)
class LoggedOut:
    response: int


@dataclass(slots=True)
class Dropped:
    """The connection is unusable (protocol or digest error)."""

    reason: str


Event = (LoginDone | LoginFailed | Redirected | CommandDone | TmfDone | NopReply | TextDone
         | AsyncEvent | LoggedOut | Dropped)


# ---------------------------------------------------------------- config
@dataclass
class LoginOptions:
    """What the initiator offers.  Values follow open-iscsi's defaults."""

    initiator_name: str = "iqn.2026-11.org.storaged:initiator"
    target_name: str | None = None    # None: a discovery session
    isid: int = field(default_factory=random_isid)
    tsih: int = 0                     # non-zero to reinstate/continue a session
    user: str | None = None
    password: str | None = None
    target_user: str | None = None    # mutual CHAP: expected target name (any if None)
    target_password: str | None = None
    header_digest: str = "None"       # offer list, e.g. "CRC32C,None"
    data_digest: str = "None"
    initial_r2t: bool = False
    immediate_data: bool = True
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    queue_cap: int = 128              # commands we keep in flight at most


STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL = 3

_DEFAULTS = {k.name: k.default for k in KEYS.values()}


def parse_target_address(value: str, default_port: int = 3260) -> tuple[str, int]:
    """``host[:port][,tpgt]`` or ``[v6]:port,tpgt`` (§13.9) to (host, port)."""
    addr = value.split(",", 1)[0]
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    return host, int(port)


@dataclass(slots=True)
class _Cmd:
    tag: int
    lun_raw: int
    cdb: bytes
    read_len: int
    data_out: bytes | memoryview
    attr: int
    cmdsn: int = 0
    buf: bytearray | None = None
    got: int = 0
    datasn: int = 0


class InitiatorConnection:
    """Initiator side of one connection/session."""

    def __init__(self, options: LoginOptions) -> None:
        self.opt = options
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._rbuf = bytearray()
        self.closed = False
        # Login
        self.stage = STAGE_SECURITY
        self.login_itt = 0
        self.chap_state = "none" if options.user is None else "offer"
        self.mutual_challenge: bytes | None = None
        self.mutual_id = 0
        self.offered: dict[str, str] = {}
        self.result: dict[str, str] = dict(_DEFAULTS)
        self.target_declared_mrdsl = 8192
        self.full_feature = False
        self.tsih = options.tsih
        self.target_keys: dict[str, str] = {}
        # Digests / limits (login runs with none and 8192, §13.12)
        self.hd = False
        self.dd = False
        self.max_send = 8192
        self.max_recv = options.max_recv_data_segment_length
        self.first_burst = 65536
        self.max_burst = 262144
        self.initial_r2t = True
        self.immediate_data = True
        # Sequence numbers
        self.cmdsn = 1
        self.expcmdsn = 1
        self.maxcmdsn = 1
        self.expstatsn = 0
        self.next_itt = 1
        self.cmds: dict[int, _Cmd] = {}
        self.backlog: list[_Cmd] = []
        self.others: dict[int, str] = {}   # itt -> "nop" | "tmf" | "text" | "logout"
        self.text_acc: dict[int, bytearray] = {}

    # ------------------------------------------------------------------ I/O
    def data_to_send(self) -> list[bytes | memoryview]:
        out = self._out
        self._out = []
        return out

    def next_events(self) -> list[Event]:
        ev = self._events
        self._events = []
        return ev

    def _send(self, header: bytes, data: bytes | memoryview = b"") -> None:
        self._out.extend(frame(header, data, self.hd, self.dd))

    def _drop(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._events.append(Dropped(reason))

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the socket; handles every complete PDU."""
        if self.closed:
            return
        if self._rbuf:
            self._rbuf += data
            buf: bytearray | bytes = self._rbuf
        else:
            buf = bytes(data)
        pos = 0
        mv = memoryview(buf)
        try:
            while len(buf) - pos >= BHS_LEN and not self.closed:
                ahs = buf[pos + 4] * 4
                dlen = int.from_bytes(buf[pos + 5:pos + 8], "big")
                hlen = BHS_LEN + ahs + (4 if self.hd else 0)
                plen = (dlen + 3) & ~3
                total = hlen + plen + (4 if self.dd and dlen else 0)
                if len(buf) - pos < total:
                    break
                header = bytes(mv[pos:pos + BHS_LEN + ahs])
                if self.hd:
                    want = int.from_bytes(mv[pos + hlen - 4:pos + hlen], "little")
                    if crc32c(header) != want:
                        raise InitiatorError("header digest error")
                payload = bytes(mv[pos + hlen:pos + hlen + dlen])
                if self.dd and dlen:
                    want = int.from_bytes(mv[pos + hlen + plen:pos + total], "little")
                    if crc32c(mv[pos + hlen:pos + hlen + plen]) != want:
                        # §7.8 at ERL 0: the connection cannot recover.
                        raise InitiatorError("data digest error")
                pos += total
                self._dispatch(Pdu(header, payload))
        except InitiatorError as e:
            self._drop(str(e))
        finally:
            mv.release()
            if buf is self._rbuf:
                del self._rbuf[:pos]
            else:
                self._rbuf = bytearray(buf[pos:])

    # --------------------------------------------------------------- login
    def start(self) -> None:
        """Queue the first Login Request."""
        opt = self.opt
        keys = [("InitiatorName", opt.initiator_name)]
        if opt.target_name is None:
            keys.append(("SessionType", "Discovery"))
        else:
            keys += [("TargetName", opt.target_name), ("SessionType", "Normal")]
        if opt.user is None:
            keys.append(("AuthMethod", "None"))
            self._login(keys, STAGE_SECURITY, STAGE_OPERATIONAL, transit=True)
        else:
            keys.append(("AuthMethod", "CHAP,None"))
            self._login(keys, STAGE_SECURITY, STAGE_OPERATIONAL, transit=False)

    def _login(self, pairs: list[tuple[str, str]], csg: int, nsg: int, transit: bool) -> None:
        flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        data = text.encode(pairs)
        self.login_itt = self._alloc_itt()
        # Version-max/min 0 (§11.12.4); CID 0; ISID+TSIH in bytes 8-15.
        hdr = build(Op.LOGIN_REQ, flags=flags, data_len=len(data),
                    lun=(self.opt.isid << 16) | self.tsih, itt=self.login_itt,
                    w24=self.cmdsn, w28=self.expstatsn, immediate=True)
        self._send(hdr, data)

    def _operational_offer(self) -> list[tuple[str, str]]:
        opt = self.opt
        yn = {True: "Yes", False: "No"}
        offer = [("HeaderDigest", opt.header_digest), ("DataDigest", opt.data_digest)]
        if opt.target_name is not None:
            offer += [("InitialR2T", yn[opt.initial_r2t]),
                      ("ImmediateData", yn[opt.immediate_data]),
                      ("MaxBurstLength", str(opt.max_burst_length)),
                      ("FirstBurstLength", str(opt.first_burst_length)),
                      ("MaxConnections", "1"), ("ErrorRecoveryLevel", "0"),
                      ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
                      ("MaxOutstandingR2T", "1")]
        offer += [("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                  ("MaxRecvDataSegmentLength", str(opt.max_recv_data_segment_length))]
        self.offered = dict(offer)
        return offer

    def _respond_to_target(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Record the target's answers; answer keys the target offered itself."""
        answers: list[tuple[str, str]] = []
        for name, value in pairs:
            self.target_keys[name] = value
            key = KEYS.get(name)
            if key is None:
                continue
            if name == "MaxRecvDataSegmentLength":
                self.target_declared_mrdsl = int(value)
                continue
            if value in ("Irrelevant", "NotUnderstood"):
                continue
            if value == "Reject":
                # §6.2: no common value; the key keeps its default, which must
                # be one we can live with.
                if name in self.offered and key.kind == LIST and \
                        key.default in self.offered[name].split(","):
                    self.result[name] = key.default
                    continue
                raise InitiatorError(f"target refused {name}={self.offered.get(name, value)}")
            if name in self.offered:
                self._check_answer(name, value)
                self.result[name] = value
                continue
            # The target proposes a key we did not offer: answer it (§6.2).
            mine = self.offered.get(name, key.default)
            if key.kind == LIST:
                ok = [v for v in value.split(",") if v in key.values]
                ans = "None" if "None" in ok else (ok[0] if ok else "Reject")
            elif key.kind in (BOOL_AND, BOOL_OR):
                b, m = value == "Yes", mine == "Yes"
                ans = "Yes" if ((b and m) if key.kind == BOOL_AND else (b or m)) else "No"
            elif key.kind in (NUM_MIN, NUM_MAX):
                n, m = int(value), int(mine)
                ans = str(min(n, m) if key.kind == NUM_MIN else max(n, m))
            elif key.kind == DECLARATIVE:
                continue
            else:
                continue
            self.result[name] = ans
            answers.append((name, ans))
        return answers

    def _check_answer(self, name: str, value: str) -> None:
        """The target's answer must be within what we offered (§6.2.2)."""
        key = KEYS[name]
        ours = self.offered[name]
        bad = False
        if key.kind == LIST:
            bad = value not in [v.strip() for v in ours.split(",")]
        elif key.kind == BOOL_AND:
            bad = ours == "No" and value == "Yes"
        elif key.kind == BOOL_OR:
            bad = ours == "Yes" and value == "No"
        elif key.kind == NUM_MIN:
            bad = not value.isdigit() or int(value) > int(ours)
        elif key.kind == NUM_MAX:
            bad = not value.isdigit() or int(value) < int(ours)
        if bad:
            raise InitiatorError(f"target answered {name}={value} to our offer {ours}")

    def _login_response(self, pdu: Pdu) -> None:
        status = pdu.w36 >> 16
        self.tsih = pdu.lun & 0xFFFF
        self._update_sn(pdu.w24, pdu.w28, pdu.w32, status_pdu=True)
        try:
            pairs = text.decode(pdu.data)
        except text.TextError as e:
            raise InitiatorError(str(e)) from e
        keys = dict(pairs)
        if status >> 8 == 1:
            addr = keys.get("TargetAddress")
            if addr is None:
                self._fail(status, "redirection without TargetAddress")
                return
            try:
                host, port = parse_target_address(addr)
            except ValueError:
                self._fail(status, f"redirection to a bad TargetAddress {addr!r}")
                return
            self.closed = True
            self._events.append(Redirected(status, host, port))
            return
        if status:
            self._fail(status, _login_status_text(status))
            return
        transit = bool(pdu.flags & 0x80)
        csg = (pdu.flags >> 2) & 3
        nsg = pdu.flags & 3
        if pdu.flags & 0x40:
            # Continued response (§11.13.2): ask for the rest with an empty request.
            self._login([], csg, nsg, transit=False)
            return
        try:
            if csg == STAGE_SECURITY:
                self._security_step(keys, transit, nsg)
                return
            answers = self._respond_to_target(
                [(k, v) for k, v in pairs if k not in ("TargetPortalGroupTag", "TargetAlias")])
        except ChapError as e:
            self._fail(0x0201, str(e))
            return
        if transit and nsg == STAGE_FULL:
            self._enter_full_feature()
            return
        self._login(answers, STAGE_OPERATIONAL, STAGE_FULL, transit=True)

    def _security_step(self, keys: dict[str, str], transit: bool, nsg: int) -> None:
        opt = self.opt
        if self.chap_state == "offer":
            method = keys.get("AuthMethod")
            if method == "CHAP":
                self.chap_state = "algo"
                self._login([("CHAP_A", CHAP_MD5)], STAGE_SECURITY, STAGE_OPERATIONAL, False)
                return
            if method != "None":
                raise ChapError(f"target chose AuthMethod={method}")
            if opt.target_password is not None:
                raise ChapError("mutual CHAP requested but the target does not authenticate")
            self.chap_state = "none"
        elif self.chap_state == "algo":
            if keys.get("CHAP_A") != CHAP_MD5 or "CHAP_I" not in keys or "CHAP_C" not in keys:
                raise ChapError("target sent no MD5 CHAP challenge")
            ident = int(keys["CHAP_I"], 0)
            challenge = decode_binary(keys["CHAP_C"])
            r = response(ident, opt.password or "", challenge)
            out = [("CHAP_N", opt.user or ""), ("CHAP_R", "0x" + r.hex())]
            if opt.target_password is not None:
                self.mutual_id = secrets.randbelow(256)
                self.mutual_challenge = secrets.token_bytes(16)
                if self.mutual_challenge == challenge:  # never reflect (§12.1.3)
                    self.mutual_challenge = secrets.token_bytes(16)
                out += [("CHAP_I", str(self.mutual_id)),
                        ("CHAP_C", "0x" + self.mutual_challenge.hex())]
            self.chap_state = "sent"
            self._login(out, STAGE_SECURITY, STAGE_OPERATIONAL, True)
            return
        elif self.chap_state == "sent":
            if self.mutual_challenge is not None:
                name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
                if name is None or resp is None:
                    raise ChapError("target did not answer the mutual CHAP challenge")
                if opt.target_user is not None and name != opt.target_user:
                    raise ChapError(f"target authenticated as {name!r}, "
                                    f"expected {opt.target_user!r}")
                want = response(self.mutual_id, opt.target_password or "",
                                self.mutual_challenge)
                if decode_binary(resp) != want:
                    raise ChapError("target failed mutual CHAP authentication")
            self.chap_state = "done"
        if not transit:
            # Target stays in security stage; propose moving on.
            self._login([], STAGE_SECURITY, STAGE_OPERATIONAL, True)
            return
        self.stage = nsg
        if nsg == STAGE_FULL:
            self._enter_full_feature()
            return
        self._login(self._operational_offer(), STAGE_OPERATIONAL, STAGE_FULL, True)

    def _fail(self, status: int, message: str) -> None:
        self.closed = True
        self._events.append(LoginFailed(status, message))

    def _enter_full_feature(self) -> None:
        r = self.result
        self.full_feature = True
        self.stage = STAGE_FULL
        self.hd = r["HeaderDigest"] == "CRC32C"
        self.dd = r["DataDigest"] == "CRC32C"
        self.max_send = self.target_declared_mrdsl
        self.max_burst = int(r["MaxBurstLength"])
        self.first_burst = min(int(r["FirstBurstLength"]), self.max_burst)
        self.initial_r2t = r["InitialR2T"] == "Yes"
        self.immediate_data = r["ImmediateData"] == "Yes"
        params = dict(r)
        params["TargetMaxRecvDataSegmentLength"] = str(self.max_send)
        params["MaxRecvDataSegmentLength"] = str(self.max_recv)
        self._events.append(LoginDone(self.tsih, params))

    # ------------------------------------------------------- sequence numbers
    def _alloc_itt(self) -> int:
        while True:
            itt = self.next_itt
            self.next_itt = (itt + 1) & 0xFFFFFFFF
            if itt != RESERVED_TAG and itt not in self.cmds and itt not in self.others:
                return itt

    def _update_sn(self, statsn: int, expcmdsn: int, maxcmdsn: int,
                   status_pdu: bool = True) -> None:
        if status_pdu:
            self.expstatsn = (statsn + 1) & 0xFFFFFFFF
        # §4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1; only move forward.
        if _sn_lt((maxcmdsn + 1) & 0xFFFFFFFF, expcmdsn):
            return
        if _sn_lt(self.expcmdsn, expcmdsn):
            self.expcmdsn = expcmdsn
        if _sn_lt(self.maxcmdsn, maxcmdsn):
            self.maxcmdsn = maxcmdsn
        self._pump()

    @property
    def window_open(self) -> bool:
        return _sn_le(self.cmdsn, self.maxcmdsn)

    # ---------------------------------------------------------- SCSI commands
    def submit(self, cdb: bytes, lun: int = 0, read_len: int = 0,
               data_out: bytes | memoryview = b"", attr: int = 1) -> int:
        """Queue a SCSI command; returns its tag (ITT).  ``attr`` is the task
        attribute (1 = SIMPLE).  Data-Out goes as immediate data, unsolicited
        Data-Out and R2T-solicited Data-Out as negotiated (§11.3.4)."""
        if not self.full_feature or self.opt.target_name is None:
            raise RuntimeError("no normal session in full feature phase")
        if len(cdb) > 16:
            raise ValueError("CDBs longer than 16 bytes need an AHS (not supported)")
        cmd = _Cmd(self._alloc_itt(), encode_lun(lun), bytes(cdb), read_len, data_out, attr)
        self.cmds[cmd.tag] = cmd
        self.backlog.append(cmd)
        self._pump()
        return cmd.tag

    def _pump(self) -> None:
        while self.backlog and self.window_open and not self.closed:
            self._send_cmd(self.backlog.pop(0))

    def _send_cmd(self, cmd: _Cmd) -> None:
        edtl_w = len(cmd.data_out)
        edtl = edtl_w or cmd.read_len
        imm = b""
        if edtl_w and self.immediate_data:
            imm = cmd.data_out[:min(self.first_burst, self.max_send, edtl_w)]
        unsol_end = len(imm)
        if edtl_w and not self.initial_r2t:
            unsol_end = min(self.first_burst, edtl_w)
        final = unsol_end <= len(imm)
        flags = (0x80 if final else 0) | (0x40 if cmd.read_len else 0) | \
            (0x20 if edtl_w else 0) | (cmd.attr & 7)
        if cmd.read_len:
            cmd.buf = bytearray(cmd.read_len)
        cmd.cmdsn = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        hdr = bytearray(build(Op.SCSI_CMD, flags=flags, data_len=len(imm), lun=cmd.lun_raw,
                              itt=cmd.tag, w20=edtl, w24=cmd.cmdsn, w28=self.expstatsn))
        hdr[32:32 + len(cmd.cdb)] = cmd.cdb
        self._send(bytes(hdr), imm)
        if not final:
            self._data_out(cmd, RESERVED_TAG, len(imm), unsol_end - len(imm))

    def _data_out(self, cmd: _Cmd, ttt: int, offset: int, length: int) -> None:
        mv = memoryview(cmd.data_out)
        end = offset + length
        datasn = 0
        while offset < end:
            n = min(self.max_send, end - offset)
            last = offset + n >= end
            hdr = build(Op.DATA_OUT, flags=0x80 if last else 0, data_len=n, lun=cmd.lun_raw,
                        itt=cmd.tag, w20=ttt, w28=self.expstatsn, w36=datasn, w40=offset)
            self._send(hdr, mv[offset:offset + n])
            datasn += 1
            offset += n

    def pending(self) -> list[int]:
        """Tags of commands without a response (to retry on a new connection)."""
        return list(self.cmds)

    def command_args(self, tag: int) -> tuple[bytes, int, int, bytes | memoryview, int]:
        c = self.cmds[tag]
        return c.cdb, decode_lun_raw(c.lun_raw), c.read_len, c.data_out, c.attr

    # ----------------------------------------------------------- other PDUs
    def nop(self, data: bytes = b"") -> int:
        """NOP-Out ping (immediate, §11.18): answered by a ``NopReply``."""
        itt = self._alloc_itt()
        self.others[itt] = "nop"
        self._send(build(Op.NOP_OUT, flags=0x80, data_len=len(data), itt=itt,
                         w20=RESERVED_TAG, w24=self.cmdsn, w28=self.expstatsn,
                         immediate=True), data)
        return itt

    def task_management(self, function: int, lun: int = 0, ref_tag: int = RESERVED_TAG) -> int:
        """TMF request (§11.5), immediate: 1 ABORT TASK, 5 LOGICAL UNIT RESET..."""
        itt = self._alloc_itt()
        self.others[itt] = "tmf"
        refcmdsn = self.cmds[ref_tag].cmdsn if ref_tag in self.cmds else 0
        self._send(build(Op.TMF_REQ, flags=0x80 | function, lun=encode_lun(lun), itt=itt,
                         w20=ref_tag, w24=self.cmdsn, w28=self.expstatsn, w32=refcmdsn,
                         immediate=True))
        return itt

    def send_targets(self, what: str = "All") -> int:
        """Text Request SendTargets (Appendix C); answered by ``TextDone``."""
        return self.text_request([("SendTargets", what)])

    def text_request(self, pairs: list[tuple[str, str]]) -> int:
        """A Text Request with ``pairs`` (§11.10); answered by ``TextDone``."""
        itt = self._alloc_itt()
        self.others[itt] = "text"
        self.text_acc[itt] = bytearray()
        data = text.encode(pairs)
        self._send(build(Op.TEXT_REQ, flags=0x80, data_len=len(data), itt=itt,
                         w20=RESERVED_TAG, w24=self.cmdsn, w28=self.expstatsn), data)
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return itt

    def logout(self) -> int:
        """Logout Request, reason 0 (close the session, §11.14)."""
        itt = self._alloc_itt()
        self.others[itt] = "logout"
        self._send(build(Op.LOGOUT_REQ, flags=0x80, itt=itt, w24=self.cmdsn,
                         w28=self.expstatsn, immediate=True))
        return itt

    # -------------------------------------------------------------- dispatch
    def _dispatch(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if not self.full_feature:
            if op != Op.LOGIN_RSP:
                raise InitiatorError(f"opcode 0x{op:02x} during login")
            if pdu.itt != self.login_itt:
                raise InitiatorError("login response for another task tag")
            self._login_response(pdu)
            return
        if op == Op.DATA_IN:
            self._data_in(pdu)
        elif op == Op.SCSI_RSP:
            self._scsi_rsp(pdu)
        elif op == Op.R2T:
            self._update_sn(pdu.w24, pdu.w28, pdu.w32, status_pdu=False)
            cmd = self.cmds.get(pdu.itt)
            if cmd is None:
                return  # R2T for a task we aborted
            off, length = pdu.w40, pdu.w44
            if off + length > len(cmd.data_out) or length == 0:
                raise InitiatorError("R2T outside the command's data")
            self._data_out(cmd, pdu.w20, off, length)
        elif op == Op.NOP_IN:
            self._nop_in(pdu)
        elif op == Op.TMF_RSP:
            self._update_sn(pdu.w24, pdu.w28, pdu.w32)
            if self.others.pop(pdu.itt, None) is not None:
                self._events.append(TmfDone(pdu.itt, pdu.b2))
        elif op == Op.TEXT_RSP:
            self._text_rsp(pdu)
        elif op == Op.LOGOUT_RSP:
            self._update_sn(pdu.w24, pdu.w28, pdu.w32)
            self.others.pop(pdu.itt, None)
            self.closed = True
            self._events.append(LoggedOut(pdu.b2))
        elif op == Op.ASYNC:
            self._update_sn(pdu.w24, pdu.w28, pdu.w32)
            data = bytes(pdu.data)
            sense = b""
            if len(data) >= 2:
                n = int.from_bytes(data[:2], "big")
                sense = data[2:2 + n]
            w36 = pdu.w36
            self._events.append(AsyncEvent(w36 >> 24, w36 & 0xFFFF, pdu.w40 >> 16,
                                           pdu.w40 & 0xFFFF, sense))
        elif op == Op.REJECT:
            self._update_sn(pdu.w24, pdu.w28, pdu.w32)
            rejected = bytes(pdu.data[:BHS_LEN])
            if len(rejected) == BHS_LEN:
                itt = int.from_bytes(rejected[16:20], "big")
                if itt in self.cmds:
                    del self.cmds[itt]
                    self._events.append(CommandDone(itt, -1, response=0x100 | pdu.b2))
                    return
            raise InitiatorError(f"target rejected a PDU (reason 0x{pdu.b2:02x})")
        else:
            raise InitiatorError(f"unexpected opcode 0x{op:02x}")

    def _data_in(self, pdu: Pdu) -> None:
        status = bool(pdu.flags & 0x01)
        self._update_sn(pdu.w24, pdu.w28, pdu.w32, status_pdu=status)
        cmd = self.cmds.get(pdu.itt)
        if cmd is None:
            return  # data for an aborted task
        off = pdu.w40
        n = len(pdu.data)
        if cmd.buf is None or off + n > len(cmd.buf):
            raise InitiatorError("Data-In beyond the expected data transfer length")
        if pdu.w36 != cmd.datasn:
            raise InitiatorError(f"Data-In DataSN {pdu.w36}, expected {cmd.datasn}")
        cmd.datasn += 1
        if status and off == 0 and cmd.got == 0:
            # The whole read in one PDU (the common small read): no reassembly copy.
            del self.cmds[cmd.tag]
            resid = pdu.w44 if pdu.flags & 0x06 else 0
            self._events.append(CommandDone(cmd.tag, pdu.b3, b"", pdu.data, resid))
            return
        cmd.buf[off:off + n] = pdu.data
        cmd.got = max(cmd.got, off + n)
        if status:
            del self.cmds[cmd.tag]
            resid = pdu.w44 if pdu.flags & 0x06 else 0
            data = cmd.buf if cmd.got == len(cmd.buf) else cmd.buf[:cmd.got]
            self._events.append(CommandDone(cmd.tag, pdu.b3, b"", bytes(data), resid))

    def _scsi_rsp(self, pdu: Pdu) -> None:
        self._update_sn(pdu.w24, pdu.w28, pdu.w32)
        cmd = self.cmds.pop(pdu.itt, None)
        if cmd is None:
            return
        sense = b""
        data = bytes(pdu.data)
        if len(data) >= 2:
            n = int.from_bytes(data[:2], "big")
            sense = data[2:2 + n]
        resid = pdu.w44 if pdu.flags & 0x06 else 0
        got = bytes(cmd.buf[:cmd.got]) if cmd.buf is not None else b""
        self._events.append(CommandDone(cmd.tag, pdu.b3, sense, got, resid, pdu.b2))

    def _nop_in(self, pdu: Pdu) -> None:
        ping = pdu.w20 != RESERVED_TAG
        self._update_sn(pdu.w24, pdu.w28, pdu.w32, status_pdu=pdu.itt != RESERVED_TAG)
        if ping:
            # The target pings us (§11.19): answer with the TTT, ITT reserved.
            self._send(build(Op.NOP_OUT, flags=0x80, lun=pdu.lun, itt=RESERVED_TAG,
                             w20=pdu.w20, w24=self.cmdsn, w28=self.expstatsn,
                             immediate=True))
        if pdu.itt != RESERVED_TAG and self.others.pop(pdu.itt, None) is not None:
            self._events.append(NopReply(pdu.itt, bytes(pdu.data)))

    def _text_rsp(self, pdu: Pdu) -> None:
        self._update_sn(pdu.w24, pdu.w28, pdu.w32)
        acc = self.text_acc.get(pdu.itt)
        if acc is None:
            return
        acc += pdu.data
        if pdu.flags & 0x40:
            # More to come (§11.11.2): ask with the target's TTT.
            self._send(build(Op.TEXT_REQ, flags=0x80, itt=pdu.itt, w20=pdu.w20,
                             w24=self.cmdsn, w28=self.expstatsn))
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
            return
        del self.text_acc[pdu.itt]
        self.others.pop(pdu.itt, None)
        self._events.append(TextDone(pdu.itt, text.decode(bytes(acc))))


def encode_lun(lun: int) -> int:
    """SAM LUN field (peripheral < 256, flat space otherwise) as a 64-bit int."""
    if lun < 256:
        return lun << 48
    return (0x4000 | (lun & 0x3FFF)) << 48


def decode_lun_raw(raw: int) -> int:
    """Inverse of ``encode_lun``."""
    top = raw >> 48
    return top & 0x3FFF if top & 0xC000 == 0x4000 else top & 0xFF


def send_targets_result(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """SendTargets pairs to [(target name, [TargetAddress, ...])]."""
    out: list[tuple[str, list[str]]] = []
    for k, v in pairs:
        if k == "TargetName":
            out.append((v, []))
        elif k == "TargetAddress" and out:
            out[-1][1].append(v)
    return out


_STATUS_TEXT = {
    0x0201: "authentication failed",
    0x0202: "authorization failure (initiator not allowed)",
    0x0203: "target not found",
    0x0204: "target removed",
    0x0205: "unsupported iSCSI version",
    0x0206: "too many connections",
    0x0207: "missing parameter",
    0x0208: "cannot include in session",
    0x0209: "session type not supported",
    0x020A: "session does not exist",
    0x020B: "invalid request during login",
    0x0300: "target error",
    0x0301: "service unavailable",
    0x0302: "out of resources",
}


def _login_status_text(status: int) -> str:
    return _STATUS_TEXT.get(status, "initiator error" if status >> 8 == 2 else "target error")
