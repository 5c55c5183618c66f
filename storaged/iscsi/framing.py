"""PDU framing for the sans-IO iSCSI connection (RFC 7143 §11.2, §12.1).

``PduFraming`` is the byte side of ``storaged.iscsi.connection.Connection``:
the receive buffer the asyncio ``BufferedProtocol`` reads into, cutting it
into PDUs (BHS, AHS, header and data digests, padding), and framing outgoing
headers and data for ``transport.writelines``.  It is a mixin: the
connection's ``__init__`` sets the state it reads (``_rbuf``, ``_rwant``,
``_offered``, ``_rstart``, ``_rend``, ``_out``, ``closed``, ``hd``, ``dd``,
``max_recv``, ``first_burst``, ``_quick``) and the session provides what a
whole PDU goes to (``_quick_command``, ``_dispatch``, ``_data_digest_error``,
``drop``).
"""

from __future__ import annotations

from storaged.fastio import crc32c
from storaged.iscsi.pdu import BHS_LEN, Pdu, frame

# Receive buffer: starts small so idle sessions cost little memory (a zeroed
# 1 MiB bytearray per connection was 1 MiB of RSS per idle session), doubles
# up to _RBUF_BUSY while socket reads fill all the space offered (a busy
# connection reads big chunks: fewer syscalls, bigger batches), and grows
# beyond that only for a PDU larger than the buffer.
_RBUF_START = 16 << 10
_RBUF_BUSY = 1 << 20
_MIN_READ = 4 << 10  # least free space offered to a socket read


class ProtocolError(Exception):
    """The peer broke the protocol badly enough that the connection drops."""


class PduFraming:
    """Receive buffer and PDU framing of one connection (see the module doc)."""

    def get_buffer(self, sizehint: int = 0) -> memoryview:
        """Writable space where the next socket read should land (the asyncio
        BufferedProtocol path: bytes go from the kernel into our buffer)."""
        size = len(self._rbuf)
        if size - self._rend < _MIN_READ or size < self._rwant:
            self._compact(max(sizehint, _MIN_READ,
                              self._rwant - (self._rend - self._rstart)))
        view = memoryview(self._rbuf)[self._rend:]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer``: handle them."""
        if nbytes >= self._offered and self._rwant < _RBUF_BUSY:
            # The read filled everything offered: the socket has more, offer more.
            self._rwant = min(2 * max(self._rwant, len(self._rbuf)), _RBUF_BUSY)
        self._rend += nbytes
        self._parse()

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the socket; parse and handle every complete PDU."""
        view = memoryview(data).cast("B")
        while len(view) and not self.closed:
            with self.get_buffer(len(view)) as buf:
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def _compact(self, need: int) -> None:
        """Move unparsed bytes to the front (or into a larger buffer)."""
        pending = self._rend - self._rstart
        if pending + need > len(self._rbuf):
            new = bytearray(max(2 * len(self._rbuf), pending + need))
            new[:pending] = self._rbuf[self._rstart:self._rend]
            self._rbuf = new
        elif pending:
            # Same-length slice assignment: allowed while a view is exported.
            self._rbuf[:pending] = self._rbuf[self._rstart:self._rend]
        self._rstart = 0
        self._rend = pending

    def _parse(self) -> None:
        buf = self._rbuf
        pos = self._rstart
        end = self._rend
        mv = memoryview(buf)
        quick = self._quick if not self.dd else None
        try:
            while not self.closed:
                if end - pos < BHS_LEN:
                    break
                ahs = buf[pos + 4] * 4
                dlen = (buf[pos + 5] << 16) | (buf[pos + 6] << 8) | buf[pos + 7]
                hlen = BHS_LEN + ahs + (4 if self.hd else 0)
                plen = (dlen + 3) & ~3
                total = hlen + plen + (4 if (self.dd and dlen) else 0)
                if dlen > self.max_recv and dlen > self.first_burst:
                    raise ProtocolError(f"data segment of {dlen} bytes exceeds "
                                        f"MaxRecvDataSegmentLength {self.max_recv}")
                if end - pos < total:
                    if end - pos >= hlen and self.hd:
                        self._check_hd(mv, pos, ahs)
                    break
                if self.hd:
                    self._check_hd(mv, pos, ahs)
                dstart = pos + hlen
                if quick is not None and buf[pos] == 0x01 and not ahs and \
                        self._quick_command(quick, mv, pos, dstart, dlen,
                                            end - pos - total < BHS_LEN):
                    pos += total
                    continue
                header = bytes(mv[pos:pos + BHS_LEN + ahs])
                payload = bytes(mv[dstart:dstart + dlen]) if dlen else b""
                pos += total
                if self.dd and dlen:
                    want = int.from_bytes(mv[dstart + plen:dstart + plen + 4], "little")
                    crc = crc32c(payload)
                    if plen != dlen:
                        crc = crc32c(bytes(plen - dlen), crc)
                    if crc != want:
                        self._data_digest_error(header)
                        continue
                self._dispatch(Pdu(header, payload))
        except ProtocolError as e:
            self.drop(str(e))
        finally:
            mv.release()
            if pos == end:
                self._rstart = self._rend = 0
            else:
                self._rstart = pos

    def _check_hd(self, mv: memoryview, pos: int, ahs: int) -> None:
        end = pos + BHS_LEN + ahs
        want = int.from_bytes(mv[end:end + 4], "little")
        if crc32c(mv[pos:end]) != want:
            # §7.8: at ERL 0 a header digest error ends the connection.
            raise ProtocolError("header digest error")

    def data_to_send(self) -> list[bytes | memoryview]:
        """Buffers to write, in order (for transport.writelines)."""
        out = self._out
        self._out = []
        return out

    def _send(self, header: bytes, data: bytes | memoryview = b"") -> None:
        self._out.extend(frame(header, data, self.hd, self.dd))

