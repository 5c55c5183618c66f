"""A small NFSv3/MOUNT client for tests, over TCP or straight into the sans-IO core.

``LocalClient`` feeds call records into an ``RpcConnection`` + ``RpcService``
in memory (no sockets); ``TcpClient`` talks to a running server.  Both
encode arguments and decode results with the same XDR tables the server
uses, so tests read like the RFC: ``c.nfs("LOOKUP", {"what": {...}})``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from storaged.nfs import mount, nfs3
from storaged.nfs.rpc import (
    AUTH_NONE,
    SUCCESS,
    RecordReader,
    RpcConnection,
    RpcError,
    RpcService,
    decode_reply,
    encode_authsys,
    encode_call,
    record,
)

_NAMES = {name: num for num, (name, _a, _r) in nfs3.PROCEDURES.items()}
_MNT = {name: num for num, (name, _a, _r) in mount.PROCEDURES.items()}


class Client:
    """Shared encode/decode logic; subclasses implement ``roundtrip``."""

    def __init__(self, uid: int | None = 0, gid: int = 0, gids: tuple[int, ...] = ()) -> None:
        self.xids = itertools.count(1)
        self.set_user(uid, gid, gids)

    def set_user(self, uid: int | None, gid: int = 0, gids: tuple[int, ...] = ()) -> None:
        """AUTH_SYS as uid/gid, or AUTH_NONE with uid None."""
        self.cred = (encode_authsys(uid, gid, gids) if uid is not None
                     else {"flavor": AUTH_NONE, "body": b""})

    def roundtrip(self, message: bytes) -> bytes:
        raise NotImplementedError

    def call(self, prog: int, vers: int, proc: int, args: bytes = b"") -> tuple[int, memoryview]:
        """``(accept_stat, result bytes)``; RpcError for a denied reply."""
        xid = next(self.xids)
        reply = self.roundtrip(encode_call(xid, prog, vers, proc, args, self.cred))
        rxid, stat, res = decode_reply(reply)
        assert rxid == xid
        return stat, res

    def nfs(self, name: str, args: Any = None) -> Any:
        """Call NFSv3 procedure ``name``; the decoded result ``(status, value)``."""
        num = _NAMES[name]
        _n, atype, rtype = nfs3.PROCEDURES[num]
        stat, res = self.call(nfs3.NFS_PROGRAM, 3, num, atype.encode(args))
        if stat != SUCCESS:
            raise RpcError(stat)
        return rtype.decode(res)

    def mount(self, name: str, args: Any = None) -> Any:
        num = _MNT[name]
        _n, atype, rtype = mount.PROCEDURES[num]
        stat, res = self.call(mount.MOUNT_PROGRAM, 3, num, atype.encode(args))
        if stat != SUCCESS:
            raise RpcError(stat)
        return rtype.decode(res)

    def mnt(self, path: str) -> bytes:
        """MNT ``path``; the root handle (AssertionError naming the status otherwise)."""
        status, ok = self.mount("MNT", path.encode())
        assert status == 0, f"MNT {path}: status {status}"
        return ok["fhandle"]

    # -- conveniences
    def lookup(self, dirfh: bytes, name: bytes) -> bytes:
        status, res = self.nfs("LOOKUP", {"what": {"dir": dirfh, "name": name}})
        assert status == 0, f"LOOKUP {name!r}: {status}"
        return res["object"]

    def create(self, dirfh: bytes, name: bytes, mode: int = 0o644) -> bytes:
        status, res = self.nfs("CREATE", {"where": {"dir": dirfh, "name": name},
                                          "how": (0, sattr(mode=mode))})
        assert status == 0, f"CREATE {name!r}: {status}"
        return res["obj"]

    def write(self, fh: bytes, offset: int, data: bytes, stable: int = 2) -> Any:
        return self.nfs("WRITE", {"file": fh, "offset": offset, "count": len(data),
                                  "stable": stable, "data": data})

    def read(self, fh: bytes, offset: int, count: int) -> Any:
        return self.nfs("READ", {"file": fh, "offset": offset, "count": count})


def sattr(mode: int | None = None, uid: int | None = None, gid: int | None = None,
          size: int | None = None) -> dict[str, Any]:
    """A sattr3 value."""
    return {"mode": mode, "uid": uid, "gid": gid, "size": size, "atime": (0, None),
            "mtime": (0, None)}


class LocalClient(Client):
    """Calls straight into a server's sans-IO core; ``peer`` is the pretend address."""

    def __init__(self, service: RpcService, peer: tuple[str, int] = ("127.0.0.1", 700),
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.service = service
        self.conn = RpcConnection(peer)
        self.reader = RecordReader()

    def roundtrip(self, message: bytes) -> bytes:
        self.conn.receive_data(record(message))
        for ev in self.conn.next_events():
            proc = self.service.lookup(ev)  # type: ignore[arg-type]
            if isinstance(proc, tuple):
                from storaged.nfs.rpc import reply_accept
                self.conn.send(reply_accept(ev.xid, *proc))  # type: ignore[union-attr]
            else:
                # As the TCP shell runs calls: READ/WRITE through their quick path.
                parts = None if proc.blocking else self.service.run_inline(ev)  # type: ignore[arg-type]
                self.conn.send(parts if parts is not None
                               else self.service.run(ev, proc))  # type: ignore[arg-type]
        out = b"".join(bytes(b) for b in self.conn.data_to_send())
        recs = self.reader.feed(out)
        assert len(recs) == 1, recs
        return recs[0]


class TcpClient(Client):
    """Calls over a TCP connection to ``host:port``."""

    def __init__(self, host: str, port: int, source_port: int | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.sock = socket.socket()
        if source_port is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", source_port))
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.reader = RecordReader()
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_record(self) -> bytes | None:
        """The next whole record, or None when the server closed the connection."""
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def roundtrip(self, message: bytes) -> bytes:
        self.sock.sendall(record(message))
        rec = self.recv_record()
        if rec is None:
            raise ConnectionError("server closed the connection")
        return rec

    def close(self) -> None:
        self.sock.close()


def nfs_url(port: int, path: str = "", export: str = "/export") -> str:
    """libnfs URL that needs no portmapper."""
    return f"nfs://127.0.0.1{export}{path}?version=3&nfsport={port}&mountport={port}"


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class NfsDemo:
    """``storaged demo`` with its NFS export on a chosen port (iSCSI on another)."""

    def __init__(self, directory: str, nfs_port: int, iscsi_port: int) -> None:
        self.directory = directory
        self.port = nfs_port
        self.iscsi_port = iscsi_port
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(directory, "daemon.log")
        self.export_dir = os.path.join(directory, "export")

    def start(self) -> NfsDemo:
        os.makedirs(self.directory, exist_ok=True)
        cmd = [sys.executable, "-m", "storaged", "demo", "--dir", self.directory,
               "--iscsi", f"127.0.0.1:{self.iscsi_port}", "--nfs", f"127.0.0.1:{self.port}"]
        env = dict(os.environ, STORAGED_LOG="WARNING")
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        wait_tcp(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._logf.closed:
            self._logf.close()
        return self.proc.returncode

    def output(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def url(self, path: str = "") -> str:
        return nfs_url(self.port, path)


@contextlib.contextmanager
def nfs_demo(directory: str) -> Iterator[NfsDemo]:
    """A running demo daemon with NFS on a free port; stopped afterwards."""
    from tests.support import free_port

    d = NfsDemo(directory, free_port(), free_port()).start()
    try:
        yield d
    finally:
        d.stop()
