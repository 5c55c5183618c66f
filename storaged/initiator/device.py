"""A remote iSCSI LUN as a BlockDevice (storaged/block/base.py).

URL: ``iscsi://[user[%password]@]host[:port]/IQN/LUN[?options]``.  Query
options: ``target_password`` (and ``target_user``) for mutual CHAP,
``initiator`` (our IQN), ``header_digest``/``data_digest`` (``CRC32C``,
``None`` or a list such as ``CRC32C,None``), ``replacement_timeout``,
``noop_interval``, ``noop_timeout`` (seconds), ``pr_key`` (hex: register
this reservation key and make sure a WRITE EXCLUSIVE - REGISTRANTS ONLY
reservation exists when the device opens, as fence_scsi's unfencing does,
so the device keeps write access on a LUN the cluster fences by PR).

The BlockDevice protocol is synchronous; the session runs on an event loop
in its own thread and the sync methods wait for it.  ``submit`` (and the
``aread``/``awrite`` coroutines on that loop) keep many commands in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field

from storaged.block.base import BlockDeviceError
from storaged.initiator import session as s
from storaged.initiator.client import IscsiClient, IscsiError, LoginError, Timeouts

GOOD = 0x00
CHECK_CONDITION = 0x02
RESERVATION_CONFLICT = 0x18
UNIT_ATTENTION = 0x06
MAX_TRANSFER = 1 << 20       # bytes per READ/WRITE command
PR_WE_RO = 5                 # WRITE EXCLUSIVE - REGISTRANTS ONLY (SPC-4 Table 213)


class FencedError(BlockDeviceError):
    """The target answered RESERVATION CONFLICT, or refused our login again
    after dropping the session: this node is fenced off."""


def _login_refused(e: IscsiError) -> bool:
    """A login refused for authorization (RFC 7143 §11.13.5 status 0x0201
    authentication failure, 0x0202 authorization failure): after a session
    drop this is what a fence that revoked our ACL looks like."""
    return isinstance(e, LoginError) and e.status in (0x0201, 0x0202)


class ScsiCheckError(BlockDeviceError):
    """CHECK CONDITION with sense (key, asc, ascq)."""

    def __init__(self, what: str, sense: bytes) -> None:
        self.sense = sense
        self.key, self.asc, self.ascq = sense_fields(sense)
        super().__init__(f"{what}: CHECK CONDITION sense key 0x{self.key:x} "
                         f"ASC/ASCQ 0x{self.asc:02x}/0x{self.ascq:02x}")


def sense_fields(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed (70h/71h) or descriptor (72h/73h) sense."""
    if len(sense) < 3:
        return 0, 0, 0
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2], sense[3] if len(sense) > 3 else 0
    return sense[2] & 0x0F, sense[12] if len(sense) > 12 else 0, \
        sense[13] if len(sense) > 13 else 0


@dataclass
class IscsiUrl:
    host: str
    port: int
    iqn: str
    lun: int
    user: str | None = None
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_url(url: str) -> IscsiUrl:
    """Parse ``iscsi://[user[%password]@]host[:port]/IQN/LUN[?k=v&...]``."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "iscsi":
        raise ValueError(f"not an iscsi:// URL: {url!r}")
    user = password = None
    netloc = u.netloc
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition("%")
        user = urllib.parse.unquote(user)
        password = urllib.parse.unquote(pw) if pw else None
    host, port = s.parse_target_address(netloc or "", 3260)
    parts = [p for p in u.path.split("/") if p]
    if not host or len(parts) not in (1, 2):
        raise ValueError(f"iscsi URL needs host and /IQN/LUN: {url!r}")
    lun = int(parts[1]) if len(parts) == 2 else 0
    opts = dict(urllib.parse.parse_qsl(u.query))
    return IscsiUrl(host, port, urllib.parse.unquote(parts[0]), lun, user, password, opts)


def fence_scsi_key(cluster_name: str, node_id: int) -> int:
    """The reservation key fence_scsi uses for a node: the first four hex
    digits of MD5(cluster name) followed by the node id as four decimal
    digits, read as a 32-bit hex number."""
    digest = hashlib.md5(cluster_name.encode("ascii"), usedforsecurity=False).hexdigest()
    return int(f"{digest[:4]}{node_id:04d}"[:8], 16)


def options_from_url(u: IscsiUrl, **over: object) -> tuple[s.LoginOptions, Timeouts]:
    o = u.options
    opts = s.LoginOptions(
        initiator_name=o.get("initiator", s.LoginOptions.initiator_name),
        target_name=u.iqn, user=u.user, password=u.password,
        target_user=o.get("target_user"), target_password=o.get("target_password"),
        header_digest=o.get("header_digest", "None,CRC32C"),
        data_digest=o.get("data_digest", "None,CRC32C"))
    t = Timeouts()
    for name in ("replacement_timeout", "noop_interval", "noop_timeout", "login_timeout"):
        if name in o:
            setattr(t, name, float(o[name]))
    for k, v in over.items():
        if hasattr(t, k):
            setattr(t, k, v)
        else:
            setattr(opts, k, v)
    if u.user is not None and u.password is None:
        raise ValueError("iscsi URL has a CHAP user but no password (user%password@host)")
    return opts, t


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="iscsi-initiator",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise BlockDeviceError(f"iSCSI command timed out after {timeout} s") from e

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class RemoteBlockDevice:
    """BlockDevice over one LUN of a remote iSCSI target."""

    read_only = False

    def __init__(self, url: str, read_only: bool = False, **overrides: object) -> None:
        self.url = parse_url(url)
        self.read_only = read_only
        key = self.url.options.get("pr_key")
        try:
            self.pr_key = int(key, 16) if key else None
        except ValueError:
            raise ValueError(f"pr_key must be a hexadecimal reservation key, got {key!r}"
                             ) from None
        opts, timeouts = options_from_url(self.url, **overrides)
        self.unit_attentions: list[tuple[int, int]] = []
        """(ASC, ASCQ) of every unit attention seen (capacity changed 2A/09,
        reservations preempted 2A/03, ALUA state changed 2A/06, ...)."""
        self.on_unit_attention = None
        self._lt = _LoopThread()
        self.client = IscsiClient(self.url.host, self.url.port, opts, timeouts)
        try:
            self._lt.run(self.client.connect())
            self._open()
            if self.pr_key is not None and not read_only:
                self.unfence(self.pr_key)
        except IscsiError as e:
            self.close()
            raise BlockDeviceError(str(e)) from e
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ commands
    async def ascsi(self, cdb: bytes, read_len: int = 0, data_out: bytes | memoryview = b"",
                    what: str = "command") -> s.CommandDone:
        """Run a command on the session's loop; unit attentions are recorded
        and the command retried; RESERVATION CONFLICT raises FencedError."""
        for _ in range(8):
            try:
                ev = await self.client.command(cdb, self.url.lun, read_len, data_out)
            except IscsiError as e:
                if _login_refused(e):
                    raise FencedError(f"{what}: session dropped and login refused "
                                      f"(this node is fenced): {e}") from e
                raise BlockDeviceError(f"{what}: {e}") from e
            if ev.status == GOOD:
                return ev
            if ev.status == RESERVATION_CONFLICT:
                raise FencedError(f"{what}: RESERVATION CONFLICT (this node is fenced)")
            if ev.status == CHECK_CONDITION:
                key, asc, ascq = sense_fields(ev.sense)
                if key == UNIT_ATTENTION:
                    self.unit_attentions.append((asc, ascq))
                    if self.on_unit_attention is not None:
                        self.on_unit_attention(asc, ascq)
                    continue
                raise ScsiCheckError(what, ev.sense)
            if ev.status < 0:
                raise BlockDeviceError(f"{what}: rejected by the target (0x{ev.response:x})")
            raise BlockDeviceError(f"{what}: SCSI status 0x{ev.status:02x}")
        raise BlockDeviceError(f"{what}: unit attentions without end")

    def scsi(self, cdb: bytes, read_len: int = 0, data_out: bytes | memoryview = b"",
             what: str = "command") -> s.CommandDone:
        return self._lt.run(self.ascsi(cdb, read_len, data_out, what))

    def submit(self, coro) -> concurrent.futures.Future:
        """Schedule a coroutine (e.g. ``aread``/``awrite``) on the session loop."""
        return asyncio.run_coroutine_threadsafe(coro, self._lt.loop)

    def _open(self) -> None:
        # REPORT LUNS (SPC-4 §6.33): the LUN must exist.
        ev = self.scsi(struct.pack(">BBxxxxIxx", 0xA0, 0, 4096), 4096, what="REPORT LUNS")
        n = int.from_bytes(ev.data[:4], "big") // 8
        luns = {s.decode_lun_raw(int.from_bytes(ev.data[8 + 8 * i:16 + 8 * i], "big"))
                for i in range(n)}
        if self.url.lun not in luns:
            raise BlockDeviceError(f"LUN {self.url.lun} not found on {self.url.iqn} "
                                   f"(target reports {sorted(luns)})")
        # READ CAPACITY(16) (SBC-3 §5.16).
        ev = self.scsi(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), 32,
                       what="READ CAPACITY(16)")
        last, bs = struct.unpack(">QI", ev.data[:12])
        self.block_size = bs
        self.blocks = last + 1
        self.thin = bool(ev.data[14] & 0x80) if len(ev.data) > 14 else False
        # INQUIRY VPD 83h: the LU's designators (SPC-4 §7.8.6).
        ev = self.scsi(struct.pack(">BBBHB", 0x12, 1, 0x83, 1024, 0), 1024,
                       what="INQUIRY VPD 83h")
        self.identifiers = _designators(ev.data)
        ev = self.scsi(struct.pack(">BBBHB", 0x12, 0, 0, 96, 0), 96, what="INQUIRY")
        self.vendor = ev.data[8:16].decode(errors="replace").strip()
        self.product = ev.data[16:32].decode(errors="replace").strip()

    @property
    def identity(self) -> str:
        """The LU's NAA (or first) designator as hex: the same LU through two
        paths has the same identity."""
        for kind, value in self.identifiers:
            if kind == 3:
                return value.hex()
        return self.identifiers[0][1].hex() if self.identifiers else ""

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    def refresh_size(self) -> int:
        """READ CAPACITY(16) again (the remote LUN may have grown); the size in bytes."""
        ev = self.scsi(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), 32,
                       what="READ CAPACITY(16)")
        self.blocks = struct.unpack(">Q", ev.data[:8])[0] + 1
        return self.size

    # --------------------------------------------------------------- async I/O
    def _check(self, offset: int, length: int) -> None:
        if offset % self.block_size or length % self.block_size:
            raise BlockDeviceError(f"unaligned I/O at {offset} length {length}")
        if offset + length > self.size or offset < 0:
            raise BlockDeviceError(f"I/O beyond the end of the LUN ({self.size} bytes)")

    async def aread(self, offset: int, length: int) -> bytes:
        bs = self.block_size
        if offset % bs or length % bs:
            # A byte range (a superblock probe): read the blocks around it, as a
            # file would; writes stay block-aligned (no read-modify-write here).
            start = offset - offset % bs
            end = -(-(offset + length) // bs) * bs
            if offset < 0 or offset + length > self.size:
                raise BlockDeviceError(f"I/O beyond the end of the LUN ({self.size} bytes)")
            data = await self.aread(start, end - start)
            return data[offset - start:offset - start + length]
        self._check(offset, length)
        if length <= MAX_TRANSFER:     # one command: no task per part
            ev = await self.ascsi(struct.pack(">BBQIBB", 0x88, 0, offset // bs, length // bs,
                                              0, 0), length, what="READ(16)")
            return ev.data
        parts = []
        for off in range(offset, offset + length, MAX_TRANSFER):
            n = min(MAX_TRANSFER, offset + length - off)
            parts.append(self.ascsi(struct.pack(">BBQIBB", 0x88, 0, off // bs, n // bs, 0, 0),
                                    n, what="READ(16)"))
        return b"".join(ev.data for ev in await asyncio.gather(*parts))

    async def awrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise BlockDeviceError(30, "write to a read-only device")   # EROFS
        self._check(offset, len(data))
        bs = self.block_size
        if len(data) <= MAX_TRANSFER:
            cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, offset // bs,
                              len(data) // bs, 0, 0)
            await self.ascsi(cdb, data_out=data, what="WRITE(16)")
            return
        data = bytes(data)
        parts = []
        for off in range(0, len(data), MAX_TRANSFER):
            chunk = data[off:off + MAX_TRANSFER]
            cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, (offset + off) // bs,
                              len(chunk) // bs, 0, 0)
            parts.append(self.ascsi(cdb, data_out=chunk, what="WRITE(16)"))
        await asyncio.gather(*parts)

    # ---------------------------------------------------------- BlockDevice
    def read(self, offset: int, length: int) -> bytes:
        return self._lt.run(self.aread(offset, length))

    def readinto(self, offset: int, buf: memoryview) -> int:
        data = self.read(offset, len(buf))
        buf[:len(data)] = data
        return len(data)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Returns once the target answered GOOD for every WRITE(16)."""
        self._lt.run(self.awrite(offset, data, fua))

    def flush(self) -> None:
        self.scsi(struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0), what="SYNCHRONIZE CACHE(16)")

    def discard(self, offset: int, length: int) -> None:
        """UNMAP (SBC-3 §5.28); WRITE SAME(16) of zeros when UNMAP is refused."""
        self._check(offset, length)
        bs = self.block_size
        lba, n = offset // bs, length // bs
        descs = b""
        while n:
            k = min(n, 0xFFFFFFFF)
            descs += struct.pack(">QIxxxx", lba, k)
            lba, n = lba + k, n - k
        param = struct.pack(">HH4x", len(descs) + 6, len(descs)) + descs
        try:
            self.scsi(struct.pack(">BBxxxxxHB", 0x42, 0, len(param), 0), data_out=param,
                      what="UNMAP")
        except ScsiCheckError as e:
            if e.key != 0x05:
                raise
            for off in range(offset, offset + length, MAX_TRANSFER):
                k = min(MAX_TRANSFER, offset + length - off) // bs
                self.scsi(struct.pack(">BBQIBB", 0x93, 0, off // bs, k, 0, 0),
                          data_out=bytes(bs), what="WRITE SAME(16)")

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

    def compare_and_write(self, offset: int, expected: bytes, new: bytes) -> bool:
        """COMPARE AND WRITE (SBC-3 §5.2): atomically replace ``expected``
        with ``new``; False if the medium held something else (MISCOMPARE)."""
        if len(expected) != len(new):
            raise ValueError("compare and write buffers differ in length")
        self._check(offset, len(new))
        bs = self.block_size
        cdb = struct.pack(">BBQxxxBxB", 0x89, 0, offset // bs, len(new) // bs, 0)
        try:
            self.scsi(cdb, data_out=expected + new, what="COMPARE AND WRITE")
        except ScsiCheckError as e:
            if e.key == 0x0E:      # MISCOMPARE
                return False
            raise
        return True

    # ------------------------------------------------------- reservations
    def _prout(self, action: int, key: int = 0, sa_key: int = 0, prtype: int = 0) -> None:
        param = struct.pack(">QQ4xBxxx", key, sa_key, 0)   # SPC-4 Table 225
        cdb = struct.pack(">BBBxxIB", 0x5F, action, prtype, len(param), 0)
        self.scsi(cdb, data_out=param, what="PERSISTENT RESERVE OUT")

    def register(self, key: int) -> None:
        """REGISTER AND IGNORE EXISTING KEY (SPC-4 §6.16.2)."""
        self._prout(0x06, 0, key)

    def reserve(self, key: int, prtype: int = PR_WE_RO) -> None:
        """RESERVE, by default WRITE EXCLUSIVE - REGISTRANTS ONLY (as fence_scsi)."""
        self._prout(0x01, key, 0, prtype)

    def preempt(self, key: int, victim: int, prtype: int = PR_WE_RO, abort: bool = True) -> None:
        """PREEMPT (AND ABORT): remove ``victim``'s registration."""
        self._prout(0x05 if abort else 0x04, key, victim, prtype)

    def unfence(self, key: int) -> None:
        """fence_scsi's "on": register our key and make sure a WE-RO
        reservation exists (reserving is a no-op if a registrant holds it)."""
        self.register(key)
        ev = self.scsi(struct.pack(">BBxxxxxHB", 0x5E, 0x01, 64, 0), 64,
                       what="PERSISTENT RESERVE IN")
        if len(ev.data) < 16 or int.from_bytes(ev.data[4:8], "big") == 0:
            self.reserve(key)

    def read_keys(self) -> list[int]:
        ev = self.scsi(struct.pack(">BBxxxxxHB", 0x5E, 0x00, 4096, 0), 4096,
                       what="PERSISTENT RESERVE IN")
        n = int.from_bytes(ev.data[4:8], "big") // 8
        return [int.from_bytes(ev.data[8 + 8 * i:16 + 8 * i], "big") for i in range(n)]

    # ----------------------------------------------------- task management
    def lun_reset(self) -> None:
        """LOGICAL UNIT RESET (RFC 7143 §11.5.1 function 5): the target aborts
        every task of the LU; raises unless it answered Function Complete."""
        try:
            rsp = self._lt.run(self.client.task_management(5, self.url.lun))
        except IscsiError as e:
            raise BlockDeviceError(f"LUN RESET: {e}") from e
        if rsp != 0:
            raise BlockDeviceError(f"LUN RESET refused by the target (response {rsp})")

    # -------------------------------------------------------------- close
    def close(self) -> None:
        lt = getattr(self, "_lt", None)
        if lt is None:
            return
        self._lt = None  # type: ignore[assignment]
        try:
            lt.run(self.client.close(), 10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        lt.stop()

    def __enter__(self) -> RemoteBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _designators(page: bytes) -> list[tuple[int, bytes]]:
    """(designator type, value) pairs of a Device Identification VPD page."""
    out = []
    end = 4 + int.from_bytes(page[2:4], "big")
    pos = 4
    while pos + 4 <= min(end, len(page)):
        n = page[pos + 3]
        out.append((page[pos + 1] & 0x0F, bytes(page[pos + 4:pos + 4 + n])))
        pos += 4 + n
    return out
