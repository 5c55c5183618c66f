"""Acceptance tests with real NFS clients against ``storaged demo``.

libnfs tools (Debian libnfs-utils) reach the demo with
``nfs://127.0.0.1/export/...?version=3&nfsport=P&mountport=P`` and need no
portmapper.  QEMU's nfs:// driver has no port parameters: it asks the
portmapper on port 111, so that test uses the daemon's built-in portmapper
(or, when another process owns port 111, the registration the daemon made
there).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time

import pytest

from storaged.nfs.nfs3 import Stat
from tests.nfs_client import TcpClient, nfs_demo, nfs_url
from tests.support import require_tool, storaged

pytestmark = [pytest.mark.peer,
              pytest.mark.root]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_nfs_cp_1gib_in_and_out(tmp_path):
    require_tool("nfs-cp", "libnfs-utils")
    src = tmp_path / "src.bin"
    block = os.urandom(1 << 24)
    with open(src, "wb") as f:
        for i in range(64):  # 1 GiB, every 16 MiB block distinct
            f.write(i.to_bytes(8, "big") + block[8:])
    with nfs_demo(str(tmp_path / "demo")) as d:
        t0 = time.monotonic()
        r = run("nfs-cp", str(src), d.url("/big.bin"))
        t_in = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        back = tmp_path / "back.bin"
        t0 = time.monotonic()
        r = run("nfs-cp", d.url("/big.bin"), str(back))
        t_out = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        print(f"nfs-cp 1 GiB: in {t_in:.2f}s, out {t_out:.2f}s")
        want = sha256(str(src))
        assert sha256(os.path.join(d.export_dir, "big.bin")) == want
        assert sha256(str(back)) == want
        assert "Traceback" not in d.output()


def test_nfs_ls_10k_files_fast(tmp_path):
    require_tool("nfs-ls", "libnfs-utils")
    with nfs_demo(str(tmp_path / "demo")) as d:
        big = os.path.join(d.export_dir, "many")
        os.mkdir(big)
        for i in range(10_000):
            os.close(os.open(os.path.join(big, f"file-{i:05d}"), os.O_CREAT | os.O_WRONLY))
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            r = run("nfs-ls", d.url("/many"))
            times.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
            assert len(r.stdout.splitlines()) == 10_000
        print(f"nfs-ls 10k files: {[f'{t:.3f}' for t in times]}")
        assert statistics.median(times) < 0.5


def test_qemu_img_convert_compare(tmp_path):
    require_tool("qemu-img", "qemu-utils")
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for i in range(0, 64 << 20, 3 << 20):
            f.seek(i)
            f.write(os.urandom(65536))
    with nfs_demo(str(tmp_path / "demo")) as d:
        status = storaged("status", directory=d.directory, check=False)
        url = "nfs://127.0.0.1/export/disk.qcow2"
        r = run("qemu-img", "convert", "-O", "qcow2", str(src), url)
        assert r.returncode == 0, (r.stderr, status.stdout, d.output())
        assert os.path.exists(os.path.join(d.export_dir, "disk.qcow2"))
        r = run("qemu-img", "compare", str(src), url)
        assert r.returncode == 0, r.stdout + r.stderr
        back = tmp_path / "back.raw"
        r = run("qemu-img", "convert", "-O", "raw", url, str(back))
        assert r.returncode == 0, r.stderr
        assert sha256(str(back)) == sha256(str(src))
        r = run("qemu-img", "convert", "-O", "raw", str(src), "nfs://127.0.0.1/export/d.raw")
        assert r.returncode == 0, r.stderr
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
                "nfs://127.0.0.1/export/d.raw")
        assert r.returncode == 0, r.stdout + r.stderr


def test_commit_survives_sigkill(tmp_path):
    with nfs_demo(str(tmp_path / "demo")) as d:
        c = TcpClient("127.0.0.1", d.port)
        root = c.mnt("/export")
        fh = c.create(root, b"durable")
        payload = os.urandom(3 << 20)
        for off in range(0, len(payload), 1 << 20):
            status, res = c.write(fh, off, payload[off:off + (1 << 20)], stable=0)
            assert status == 0 and res["committed"] == 0
            verf = res["verf"]
        status, res = c.nfs("COMMIT", {"file": fh, "offset": 0, "count": 0})
        assert status == 0 and res["verf"] == verf
        c.close()
        d.kill()
        d.start()
        c = TcpClient("127.0.0.1", d.port)
        got = b""
        while len(got) < len(payload):
            status, res = c.read(fh, len(got), 1 << 20)  # the old handle still works
            assert status == 0
            got += bytes(res["data"])
        assert got == payload
        # the write verifier changed with the restart: clients know to resend
        status, res = c.write(fh, 0, b"x", stable=0)
        assert res["verf"] != verf
        c.close()


def test_libnfs_mounts_export_by_host_directory(tmp_path):
    """nfs-ls and nfs-cat reach an export through the host directory it serves."""
    require_tool("nfs-cat", "libnfs-utils")
    with nfs_demo(str(tmp_path / "demo")) as d:
        os.mkdir(os.path.join(d.export_dir, "sub"))
        with open(os.path.join(d.export_dir, "sub", "f"), "w") as f:
            f.write("by host path")
        by_dir = nfs_url(d.port, export=d.export_dir)
        r = run("nfs-ls", by_dir)
        assert r.returncode == 0 and "sub" in r.stdout, r.stderr
        r = run("nfs-cat", nfs_url(d.port, "/sub/f", export=d.export_dir))
        assert r.returncode == 0 and r.stdout == "by host path", r.stderr
        # the pseudo path still works, a directory outside the export does not
        assert run("nfs-cat", d.url("/sub/f")).stdout == "by host path"
        assert run("nfs-ls", nfs_url(d.port, export=str(tmp_path))).returncode != 0


def test_export_changes_apply_live_and_refusals(tmp_path):
    require_tool("nfs-ls", "libnfs-utils")
    with nfs_demo(str(tmp_path / "demo")) as d:
        with open(os.path.join(d.export_dir, "f"), "w") as f:
            f.write("data")
        c = TcpClient("127.0.0.1", d.port)
        root = c.mnt("/export")
        fh = c.lookup(root, b"f")
        # read-only: writes answer NFS3ERR_ROFS
        storaged("nfs", "export", "add", "/export", d.export_dir, "--client", "127.0.0.1",
                 "--ro", "--squash", "none", directory=d.directory)
        assert c.write(fh, 0, b"x")[0] == Stat.ROFS
        assert bytes(c.read(fh, 0, 10)[1]["data"]) == b"data"
        # root squash maps uid 0 to anonuid
        storaged("nfs", "export", "add", "/export", d.export_dir, "--client", "127.0.0.1",
                 "--squash", "root", "--anonuid", "4321", "--anongid", "4321",
                 directory=d.directory)
        os.chmod(d.export_dir, 0o777)
        c.create(root, b"squashed")
        assert os.stat(os.path.join(d.export_dir, "squashed")).st_uid == 4321
        # a client outside the list: MNT3ERR_ACCES and NFS3ERR_ACCES, nfs-ls fails
        storaged("nfs", "export", "add", "/export", d.export_dir, "--client", "10.0.0.0/8",
                 directory=d.directory)
        assert c.mount("MNT", b"/export")[0] == 13
        assert c.nfs("GETATTR", {"object": root})[0] == Stat.ACCES
        assert run("nfs-ls", d.url()).returncode != 0
        ls = storaged("nfs", "export", "ls", directory=d.directory).stdout
        assert "10.0.0.0/8" in ls
        # removing the export: its handles are stale
        storaged("nfs", "export", "remove", "/export", directory=d.directory)
        assert c.nfs("GETATTR", {"object": root})[0] == Stat.STALE
        c.close()


def test_garbage_records_do_not_hurt_the_daemon(tmp_path):
    with nfs_demo(str(tmp_path / "demo")) as d:
        for junk in (b"\x80\x00\x00\x04abcd", b"\xff" * 64, b"\x00\x00\x00\x08" + b"\x01" * 8,
                     b"\x7f\xff\xff\xff" + b"x" * 100):
            c = TcpClient("127.0.0.1", d.port)
            c.send_raw(junk)
            c.sock.settimeout(2)
            try:
                rec = c.recv_record()
            except TimeoutError:
                rec = b"(no answer yet)"
            assert rec is None or isinstance(rec, bytes)
            c.close()
        c = TcpClient("127.0.0.1", d.port)
        assert c.mnt("/export")
        c.close()
        assert d.proc.poll() is None
        assert "Traceback" not in d.output()
