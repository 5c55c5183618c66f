"""A minimal in-memory iSCSI initiator for driving the sans-IO core in tests."""

from __future__ import annotations

from storaged.fastio import crc32c
from storaged.iscsi import text
from storaged.iscsi.chap import response
from storaged.iscsi.connection import Close, Connection, Execute
from storaged.iscsi.pdu import BHS_LEN, Op, Pdu, build, frame

ISID = 0x23D000000001


class Initiator:
    """Builds initiator PDUs and parses what the target Connection answers."""

    def __init__(self, conn: Connection, name: str = "iqn.2026-11.test:init") -> None:
        self.conn = conn
        self.name = name
        self.itt = 1
        self.cmdsn = 1
        self.hd = False
        self.dd = False
        self.executed: list = []
        self.closed = False

    def send(self, header: bytes, data: bytes = b"") -> list[Pdu]:
        raw = b"".join(bytes(b) for b in frame(header, data, self.hd, self.dd))
        self.conn.receive_data(raw)
        return self.collect()

    def collect(self) -> list[Pdu]:
        out = b"".join(bytes(b) for b in self.conn.data_to_send())
        for ev in self.conn.next_events():
            if isinstance(ev, Execute):
                self.executed.append(ev.task)
            elif isinstance(ev, Close):
                self.closed = True
        return self.parse(out)

    def parse(self, raw: bytes) -> list[Pdu]:
        pdus = []
        pos = 0
        while pos < len(raw):
            hdr = raw[pos:pos + BHS_LEN]
            dlen = int.from_bytes(hdr[5:8], "big")
            pos += BHS_LEN
            if self.hd:
                assert int.from_bytes(raw[pos:pos + 4], "little") == crc32c(hdr)
                pos += 4
            data = raw[pos:pos + dlen]
            pos += (dlen + 3) & ~3
            if self.dd and dlen:
                pos += 4
            pdus.append(Pdu(hdr, data))
        return pdus

    def login(self, pairs: list[tuple[str, str]], csg: int, nsg: int, transit: bool = True,
              tsih: int = 0) -> Pdu:
        flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        data = text.encode(pairs)
        hdr = build(Op.LOGIN_REQ, flags=flags, b2=0, b3=0, data_len=len(data),
                    lun=(ISID << 16) | tsih, itt=self.itt, w24=self.cmdsn, w28=0,
                    immediate=True)
        self.itt += 1
        (rsp,) = self.send(hdr, data)
        return rsp

    def full_login(self, target: str, extra: list[tuple[str, str]] | None = None,
                   chap: tuple[str, str] | None = None) -> Pdu:
        ident = [("InitiatorName", self.name), ("TargetName", target),
                 ("SessionType", "Normal")]
        if chap is None:
            rsp = self.login(ident + [("AuthMethod", "None")], 0, 1)
        else:
            rsp = self.login(ident + [("AuthMethod", "CHAP,None")], 0, 1, transit=False)
            rsp = self.login([("CHAP_A", "5")], 0, 1, transit=False)
            keys = dict(text.decode(rsp.data))
            ident_n = int(keys["CHAP_I"])
            challenge = bytes.fromhex(keys["CHAP_C"][2:])
            r = response(ident_n, chap[1], challenge)
            rsp = self.login([("CHAP_N", chap[0]), ("CHAP_R", "0x" + r.hex())], 0, 1)
        if rsp.w36 >> 16:
            return rsp
        return self.login(extra or [("MaxRecvDataSegmentLength", "65536")], 1, 3)

    def scsi(self, cdb: bytes, edtl: int = 0, read: bool = False, write: bool = False,
             data: bytes = b"", final: bool = True, lun: int = 0) -> list[Pdu]:
        flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
        hdr = bytearray(build(Op.SCSI_CMD, flags=flags, data_len=len(data), lun=lun << 48,
                              itt=self.itt, w20=edtl, w24=self.cmdsn, w28=0))
        hdr[32:32 + len(cdb)] = cdb
        self.itt += 1
        self.cmdsn += 1
        return self.send(bytes(hdr), data)
