"""A small blocking iSCSI initiator over TCP for tests (many sessions, digests).

It speaks just enough RFC 7143 to log in (optionally with CHAP), read and
write with immediate data and R2T/Data-Out, and log out.
"""

from __future__ import annotations

import socket
import struct

from storaged.fastio import crc32c
from storaged.iscsi import text
from storaged.iscsi.chap import response
from storaged.iscsi.pdu import BHS_LEN, Op, Pdu, build, frame


class LoginFailed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"login failed with status 0x{status:04x}")
        self.status = status


class TcpInitiator:
    def __init__(self, host: str, port: int, name: str = "iqn.2026-11.test:tcp",
                 isid: int = 0x23D000000001, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.name = name
        self.isid = isid
        self.itt = 1
        self.cmdsn = 1
        self.hd = False
        self.dd = False
        self.mrdsl = 8192
        self.immediate = True
        self.first_burst = 65536

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("target closed the connection")
            buf += chunk
        return bytes(buf)

    def send(self, header: bytes, data: bytes = b"") -> None:
        self.sock.sendall(b"".join(bytes(b) for b in frame(header, data, self.hd, self.dd)))

    def recv(self) -> Pdu:
        hdr = self._recv_exact(BHS_LEN)
        if self.hd:
            crc = int.from_bytes(self._recv_exact(4), "little")
            assert crc == crc32c(hdr), "bad header digest from target"
        dlen = int.from_bytes(hdr[5:8], "big")
        data = self._recv_exact((dlen + 3) & ~3)[:dlen] if dlen else b""
        if self.dd and dlen:
            crc = int.from_bytes(self._recv_exact(4), "little")
            pad = bytes(-dlen & 3)
            assert crc == crc32c(data + pad), "bad data digest from target"
        return Pdu(hdr, data)

    def _login_pdu(self, pairs, csg, nsg, transit=True) -> Pdu:
        flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        data = text.encode(pairs)
        self.send(build(Op.LOGIN_REQ, flags=flags, data_len=len(data), lun=self.isid << 16,
                        itt=self.itt, w24=self.cmdsn, immediate=True), data)
        self.itt += 1
        rsp = self.recv()
        status = rsp.w36 >> 16
        if status:
            raise LoginFailed(status)
        return rsp

    def login(self, target: str | None, chap: tuple[str, str] | None = None,
              mutual: tuple[str, str] | None = None, digests: bool = False,
              params: dict[str, str] | None = None) -> dict[str, str]:
        ident = [("InitiatorName", self.name)]
        if target is None:
            ident.append(("SessionType", "Discovery"))
        else:
            ident += [("TargetName", target), ("SessionType", "Normal")]
        if chap is None:
            self._login_pdu(ident + [("AuthMethod", "None")], 0, 1)
        else:
            self._login_pdu(ident + [("AuthMethod", "CHAP")], 0, 1, transit=False)
            rsp = self._login_pdu([("CHAP_A", "5")], 0, 1, transit=False)
            keys = dict(text.decode(rsp.data))
            r = response(int(keys["CHAP_I"]), chap[1], bytes.fromhex(keys["CHAP_C"][2:]))
            pairs = [("CHAP_N", chap[0]), ("CHAP_R", "0x" + r.hex())]
            if mutual:
                my_challenge = bytes(range(16))
                pairs += [("CHAP_I", "7"), ("CHAP_C", "0x" + my_challenge.hex())]
            rsp = self._login_pdu(pairs, 0, 1)
            if mutual:
                keys = dict(text.decode(rsp.data))
                want = response(7, mutual[1], bytes(range(16)))
                if keys.get("CHAP_N") != mutual[0] or keys.get("CHAP_R") != "0x" + want.hex():
                    raise LoginFailed(0xFFFF)
        ops = {"MaxRecvDataSegmentLength": "262144", "ImmediateData": "Yes",
               "InitialR2T": "Yes", "MaxBurstLength": "1048576", "FirstBurstLength": "65536"}
        if digests:
            ops.update(HeaderDigest="CRC32C", DataDigest="CRC32C")
        ops.update(params or {})
        rsp = self._login_pdu(list(ops.items()), 1, 3)
        keys = dict(text.decode(rsp.data))
        self.tsih = rsp.lun & 0xFFFF
        self.hd = keys.get("HeaderDigest") == "CRC32C"
        self.dd = keys.get("DataDigest") == "CRC32C"
        self.mrdsl = int(keys.get("MaxRecvDataSegmentLength", "8192"))
        self.immediate = keys.get("ImmediateData", "Yes") == "Yes"
        fb = keys.get("FirstBurstLength", "65536")
        self.first_burst = int(fb) if fb.isdigit() else 0  # "Irrelevant" (§13.14)
        return keys

    def start(self, cdb: bytes, read_len: int = 0, data: bytes = b"", lun: int = 0,
              queue: list[bytes] | None = None) -> int:
        """Send a SCSI Command PDU (with what fits as immediate data) and
        return its ITT without waiting; with ``queue``, append its bytes there
        instead, for one ``sendall`` of several pipelined commands."""
        itt = self.itt
        self.itt += 1
        write = bool(data)
        flags = 0x80 | 0x01 | (0x40 if read_len else 0) | (0x20 if write else 0)
        imm = data[:min(self.first_burst, self.mrdsl)] if (write and self.immediate) else b""
        hdr = bytearray(build(Op.SCSI_CMD, flags=flags, data_len=len(imm), lun=lun << 48,
                              itt=itt, w20=len(data) if write else read_len, w24=self.cmdsn))
        hdr[32:32 + len(cdb)] = cdb
        self.cmdsn += 1
        if queue is None:
            self.send(bytes(hdr), imm)
        else:
            queue.extend(bytes(b) for b in frame(bytes(hdr), imm, self.hd, self.dd))
        return itt

    def command(self, cdb: bytes, read_len: int = 0, data: bytes = b"",
                lun: int = 0) -> tuple[int, bytes, bytes]:
        """Run one SCSI command; return (status, data-in, sense)."""
        itt = self.start(cdb, read_len, data, lun)
        got = bytearray()
        while True:
            pdu = self.recv()
            if pdu.opcode == Op.R2T:
                off, length, ttt = pdu.w40, pdu.w44, pdu.w20
                sn = 0
                end = off + length
                while off < end:
                    n = min(self.mrdsl, end - off)
                    last = off + n >= end
                    self.send(build(Op.DATA_OUT, flags=0x80 if last else 0, data_len=n,
                                    lun=lun << 48, itt=itt, w20=ttt, w36=sn, w40=off),
                              data[off:off + n])
                    sn += 1
                    off += n
            elif pdu.opcode == Op.DATA_IN:
                got[pdu.w40:pdu.w40 + len(pdu.data)] = pdu.data
                if pdu.flags & 0x01:
                    return pdu.b3, bytes(got), b""
            elif pdu.opcode == Op.SCSI_RSP:
                sense = b""
                if pdu.data:
                    n = struct.unpack(">H", pdu.data[:2])[0]
                    sense = bytes(pdu.data[2:2 + n])
                return pdu.b3, bytes(got), sense
            elif pdu.opcode == Op.NOP_IN:
                continue
            else:
                raise AssertionError(f"unexpected PDU {pdu!r}")

    def read10(self, lba: int, blocks: int, bs: int = 512) -> tuple[int, bytes, bytes]:
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        return self.command(cdb, read_len=blocks * bs)

    def write10(self, lba: int, data: bytes, bs: int = 512, fua: bool = False):
        cdb = struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, len(data) // bs, 0)
        return self.command(cdb, data=data)

    def send_targets(self) -> list[tuple[str, str]]:
        body = b"SendTargets=All\0"
        self.send(build(Op.TEXT_REQ, flags=0x80, data_len=len(body), itt=self.itt,
                        w20=0xFFFFFFFF, w24=self.cmdsn, immediate=True), body)
        self.itt += 1
        return text.decode(self.recv().data)

    def logout(self) -> None:
        self.send(build(Op.LOGOUT_REQ, flags=0x80, itt=self.itt, w24=self.cmdsn,
                        immediate=True))
        self.itt += 1
        rsp = self.recv()
        assert rsp.opcode == Op.LOGOUT_RSP and rsp.b2 == 0
        self.close()

    def clear_unit_attentions(self, lun: int = 0) -> None:
        """TEST UNIT READY until the pending unit attentions are consumed."""
        for _ in range(8):
            status, _data, _sense = self.command(bytes(6), lun=lun)
            if status == 0:
                return
        raise AssertionError("unit attentions never cleared")
