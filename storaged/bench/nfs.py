"""NFS benchmark: storaged vs nfs-ganesha (VFS FSAL), side by side in one run.

    python -m storaged.bench nfs [--runs 3] [--quick] [--keep] [--rows REGEX]
                                 [--only storaged|ganesha|unfs3] [--unfs3 UNFSD]

Rows (each the median of ``--runs`` runs, servers alternating):

* ``qemu-img bench`` 4 KiB QD32 reads and writes (IOPS),
* ``qemu-img bench`` 128 KiB sequential reads and writes (MB/s),
* ``nfs-cp`` of a 1 GiB file in and out (MB/s),
* ``nfs-ls`` of a directory of 10,000 files (seconds).

``--unfs3 PATH`` adds unfs3's ``unfsd`` as a third server in the same
alternation, with its own ratio column and a ``min ratio storaged/unfs3``
line before the last.  unfs3 is packaged neither in Debian 12 nor 13: build
it from its sources and give the binary (it runs with ``-d -p -n -m -l
127.0.0.1``, no portmapper registration, exports file written here).

QEMU's nfs:// driver can only find servers through the portmapper on port
111, and ganesha refuses to start unless it can register there, so the whole
benchmark runs in a private network namespace (``unshare -n``) with its own
loopback: a built-in storaged portmapper owns port 111 there, ganesha
registers with it, and before each QEMU row the benchmark points the NFS and
MOUNT mappings at the server under test.  storaged runs as
``python -m storaged.nfs`` (the daemon's NFS stack without the state store).

The image the qemu rows use is read once, unmeasured, before the first run
(its page cache filled).  Every measurement starts after ``sync`` (no writeback
of the previous row's data during the next server's turn).  A second table
gives each server's CPU time per row (all threads, exited ones too, from
/proc/PID/stat), steadier than wall time on a shared machine.  The last line
is ``min ratio storaged/ganesha: X.XX`` (ratios > 1 mean storaged is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

STORAGED_PORT = 2049
GANESHA_NFS_PORT = 12049
GANESHA_MNT_PORT = 12050
UNFS3_NFS_PORT = 22049
UNFS3_MNT_PORT = 22050

GANESHA_CONF = """\
NFS_CORE_PARAM {{
    NFS_Port = {nfs_port};
    MNT_Port = {mnt_port};
    NLM_Port = {nlm_port};
    Rquota_Port = {rquota_port};
    Protocols = 3;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 77;
    Path = {path};
    Pseudo = {path};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    Attr_Expiration_Time = {attr_timeout};
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = WARN; }}
"""


@dataclass
class Server:
    """One NFS server under test."""

    name: str
    export: str          # NFS path clients mount
    directory: str       # host directory behind it
    nfs_port: int
    mnt_port: int
    proc: subprocess.Popen | None = None
    results: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # server CPU s per run

    def url(self, path: str = "", ports: bool = True) -> str:
        base = f"nfs://127.0.0.1{self.export}{path}"
        if ports:
            base += f"?version=3&nfsport={self.nfs_port}&mountport={self.mnt_port}"
        return base


@dataclass
class Row:
    """A benchmark row: how to measure it and whether bigger is better."""

    name: str
    unit: str
    measure: Callable[[Server], float]
    higher_better: bool = True


def _run(cmd: list[str], timeout: float = 600) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def parse_qemu_bench(output: str) -> float:
    """Seconds from ``qemu-img bench`` output."""
    m = _COMPLETED.search(output)
    if not m:
        raise ValueError(f"no 'Run completed' line in: {output!r}")
    return float(m.group(1))


def _in_netns() -> bool:
    return os.environ.get("STORAGED_BENCH_NETNS") == "1"


def _reexec_in_netns(argv: list[str]) -> int:
    """Run this benchmark again inside a new network namespace with lo up."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        print("need unshare(1) and ip(8) (util-linux, iproute2)", file=sys.stderr)
        return 2
    env = dict(os.environ, STORAGED_BENCH_NETNS="1")
    cmd = ["unshare", "--net", "sh", "-c",
           'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "storaged.bench", "nfs",
           *argv]
    return subprocess.call(cmd, env=env)


class PortMapper:
    """The built-in portmapper on 127.0.0.1:111, in a background thread."""

    def __init__(self) -> None:
        from storaged.nfs.server import NfsServer
        self.server = NfsServer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        from storaged.nfs.mount import MOUNT_PROGRAM
        from storaged.nfs.nfs3 import NFS_PROGRAM
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            self.server.start("127.0.0.1", 0, "builtin"), self.loop)
        fut.result(10)
        # Only the portmapper is wanted here: forget the (empty) server's own programs.
        for prog in (NFS_PROGRAM, MOUNT_PROGRAM):
            for vers in (1, 2, 3):
                self.server.portmap.unset(prog, vers)

    def point_at(self, s: Server) -> None:
        from storaged.nfs.mount import MOUNT_PROGRAM
        from storaged.nfs.nfs3 import NFS_PROGRAM
        pm = self.server.portmap
        for prog, port in ((NFS_PROGRAM, s.nfs_port), (MOUNT_PROGRAM, s.mnt_port)):
            pm.unset(prog, 3)
            pm.set(prog, 3, 6, port, s.name.encode())

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _wait_ready(s: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if s.proc is not None and s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited with {s.proc.returncode}")
        r = subprocess.run(["nfs-ls", s.url()], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return
        last = r.stderr
        time.sleep(0.5)
    raise TimeoutError(f"{s.name} did not come up: {last}")


def _prepare(directory: str, image_size: int, files: int) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "bench.img"), "wb") as f:
        f.truncate(image_size)
    many = os.path.join(directory, "many")
    os.mkdir(many)
    for i in range(files):
        os.close(os.open(os.path.join(many, f"f{i:05d}"), os.O_CREAT | os.O_WRONLY, 0o644))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m storaged.bench nfs",
                                description="storaged vs nfs-ganesha NFSv3 benchmark")
    p.add_argument("--runs", type=int, default=3, help="runs per server (median)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument("--tmp", default=None, help="parent of the temp directory (default /tmp)")
    p.add_argument("--rows", default=None, metavar="REGEX",
                   help="only rows whose name matches REGEX (nfs-cp out needs nfs-cp in)")
    p.add_argument("--attr-timeout", type=int, default=1, metavar="SECONDS",
                   help="server-side attribute cache expiry for both servers: storaged's "
                   "export attr_timeout (default 1) and ganesha's Attr_Expiration_Time "
                   "(its own default is 60)")
    p.add_argument("--cprofile", metavar="FILE", default=None,
                   help="run storaged's server under cProfile, dump to FILE and list "
                        "its top functions (slows it: use with --only storaged)")
    p.add_argument("--only", choices=["storaged", "ganesha", "unfs3"], default=None,
                   help="measure one server only (no ratios)")
    p.add_argument("--unfs3", metavar="UNFSD", default=None,
                   help="also measure unfs3: the path of an unfsd binary (not packaged "
                        "in Debian; build it from source)")
    args = p.parse_args(argv)
    if args.only == "unfs3" and not args.unfs3:
        p.error("--only unfs3 needs --unfs3 UNFSD")
    if args.unfs3 and not (os.path.isfile(args.unfs3) and os.access(args.unfs3, os.X_OK)):
        p.error(f"--unfs3 {args.unfs3}: not an executable file")
    if os.geteuid() != 0:
        print("the NFS benchmark needs root (open_by_handle_at, netns, ganesha)",
              file=sys.stderr)
        return 2
    for tool, pkg in (("qemu-img", "qemu-utils"), ("nfs-cp", "libnfs-utils"),
                      ("ganesha.nfsd", "nfs-ganesha nfs-ganesha-vfs")):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install {pkg}", file=sys.stderr)
            return 2
    if not _in_netns():
        return _reexec_in_netns(argv)
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    quick = args.quick
    cp_size = (64 if quick else 1024) << 20
    files = 1000 if quick else 10_000
    ops4k = 3000 if quick else 40_000
    ops128k = 300 if quick else 4096
    image = (256 if quick else 1024) << 20
    top = tempfile.mkdtemp(prefix="storaged-nfs-bench-", dir=args.tmp)
    src = os.path.join(top, "src.bin")
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(cp_size >> 20):
            f.write(i.to_bytes(8, "big") + block[8:])
    st = Server("storaged", "/export", os.path.join(top, "storaged"), STORAGED_PORT,
                STORAGED_PORT)
    ga = Server("ganesha", os.path.join(top, "ganesha"), os.path.join(top, "ganesha"),
                GANESHA_NFS_PORT, GANESHA_MNT_PORT)
    un = Server("unfs3", os.path.join(top, "unfs3"), os.path.join(top, "unfs3"),
                UNFS3_NFS_PORT, UNFS3_MNT_PORT)
    everyone = [st, ga] + ([un] if args.unfs3 else [])
    for s in everyone:
        _prepare(s.directory, image, files)
    pm = PortMapper()
    procs: list[subprocess.Popen] = []
    try:
        pm.start()
        profile = ["-m", "cProfile", "-o", os.path.abspath(args.cprofile)] \
            if args.cprofile else []
        st.proc = subprocess.Popen(
            [sys.executable, *profile, "-m", "storaged.nfs", st.directory, "--listen",
             f"127.0.0.1:{st.nfs_port}", "--portmap", "off",
             "--attr-timeout", str(args.attr_timeout)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(top, "storaged.log"), "wb"))
        procs.append(st.proc)
        conf = os.path.join(top, "ganesha.conf")
        with open(conf, "w") as f:
            f.write(GANESHA_CONF.format(nfs_port=ga.nfs_port, mnt_port=ga.mnt_port,
                                        nlm_port=12051, rquota_port=12052, path=ga.directory,
                                        attr_timeout=args.attr_timeout))
        ga.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", conf, "-L", os.path.join(top, "ganesha.log"),
             "-p", os.path.join(top, "ganesha.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ga.proc)
        if args.unfs3:
            exports = os.path.join(top, "unfs3.exports")
            with open(exports, "w") as f:
                f.write(f"{un.directory} 127.0.0.1(rw,no_root_squash,insecure)\n")
            un.proc = subprocess.Popen(
                [os.path.abspath(args.unfs3), "-d", "-p", "-t", "-n", str(un.nfs_port),
                 "-m", str(un.mnt_port), "-l", "127.0.0.1", "-e", exports],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(top, "unfs3.log"), "wb"))
            procs.append(un.proc)
        for s in everyone:
            _wait_ready(s)

        def qemu(s: Server, size: int, count: int, depth: int, write: bool) -> float:
            pm.point_at(s)
            cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
                   "-s", str(size)]
            if write:
                cmd.append("-w")
            secs = parse_qemu_bench(_run(cmd + [s.url("/bench.img", ports=False)]))
            return count / secs * (1 if size == 4096 else size / 1e6)

        copies: dict[str, int] = {}
        scratch = "/dev/shm" if os.path.isdir("/dev/shm") else top

        def cp_in(s: Server) -> float:
            # nfs-cp creates GUARDED, and ganesha caches directory entries: a new
            # name per run rather than deleting behind the server's back.
            n = copies[s.name] = copies.get(s.name, 0) + 1
            # The server's page cache takes 1 GiB of new pages.  On a VM whose
            # balloon reports freed memory to the host (virtio-balloon free page
            # reporting, as on the dev VM) memory freed moments ago is faulted in
            # again on first touch, which cost the copy up to 2.5x the server CPU.
            # So 1 GiB is freed right before the copy: the server's previous copy
            # (truncated on the host; done with) or, the first time, a tmpfs file
            # written for it.
            prev = os.path.join(s.directory, f"copy{n - 1}.bin")
            if os.path.exists(prev):
                os.truncate(prev, 0)
            else:
                _touch_memory(os.path.join(scratch, "touch.bin"), cp_size)
            t0 = time.perf_counter()
            _run(["nfs-cp", src, s.url(f"/copy{n}.bin")])
            return cp_size / (time.perf_counter() - t0) / 1e6

        def cp_out(s: Server) -> float:
            # The copy lands in tmpfs when there is one: the client's own writeback to
            # disk is not what this row measures.  nfs-cp creates its destination
            # (O_EXCL: /dev/null is refused), and a copy into memory the VM had to
            # fault in ran up to 4x slower, for whichever server went first (see
            # cp_in): the same amount is written and freed first.
            dst = os.path.join(scratch, f"out-{s.name}.bin")
            _touch_memory(dst, cp_size)
            t0 = time.perf_counter()
            _run(["nfs-cp", s.url(f"/copy{copies[s.name]}.bin"), dst])
            elapsed = time.perf_counter() - t0
            os.unlink(dst)
            return cp_size / elapsed / 1e6

        def ls(s: Server) -> float:
            t0 = time.perf_counter()
            out = _run(["nfs-ls", s.url("/many")])
            elapsed = time.perf_counter() - t0
            if len(out.splitlines()) != files:
                raise RuntimeError(f"{s.name}: nfs-ls listed {len(out.splitlines())} files")
            return elapsed

        rows = [
            Row("4 KiB QD32 read", "IOPS", lambda s: qemu(s, 4096, ops4k, 32, False)),
            Row("4 KiB QD32 write", "IOPS", lambda s: qemu(s, 4096, ops4k, 32, True)),
            Row("128 KiB seq read", "MB/s", lambda s: qemu(s, 131072, ops128k, 16, False)),
            Row("128 KiB seq write", "MB/s", lambda s: qemu(s, 131072, ops128k, 16, True)),
            Row(f"nfs-cp {cp_size >> 20} MiB in", "MB/s", cp_in),
            Row(f"nfs-cp {cp_size >> 20} MiB out", "MB/s", cp_out),
            Row(f"nfs-ls {files} files", "s", ls, higher_better=False),
        ]
        if args.rows:
            rows = [r for r in rows if re.search(args.rows, r.name)]
        servers = [s for s in everyone if args.only in (None, s.name)]
        if any(r.name.startswith(("4 KiB", "128 KiB")) for r in rows):
            # bench.img is sparse: the first pass over it fills page-cache pages
            # (first-touch memory for the VM too), which made each server's first
            # qemu row about half as fast as its others.  One unmeasured sequential
            # read of what the qemu rows touch (the 128 KiB rows' 512 MiB) first.
            for s in servers:
                qemu(s, 131072, ops128k, 16, False)
        for run in range(args.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            for row in rows:
                for s in order:
                    # Write back the previous row's dirty pages (1 GiB after nfs-cp in)
                    # first, so they do not slow down whichever server comes next.
                    os.sync()
                    c0 = _cpu_seconds(s)
                    v = row.measure(s)
                    cpu = _cpu_seconds(s) - c0
                    s.results.setdefault(row.name, []).append(v)
                    s.cpu.setdefault(row.name, []).append(cpu)
                    print(f"  {row.name} {s.name}: {_fmt(v, row.unit)} "
                          f"(server CPU {cpu * 1000:.0f} ms)", file=sys.stderr, flush=True)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        if args.only:
            _report_one(rows, servers[0], args.runs)
        else:
            _report(rows, st, ga, args.runs, un if args.unfs3 else None)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        pm.stop()
        if args.cprofile and os.path.exists(args.cprofile):
            from storaged.bench.iscsi import format_cprofile
            print("\n" + format_cprofile(args.cprofile), file=sys.stderr)
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


def _touch_memory(path: str, size: int) -> None:
    """Write ``size`` bytes to ``path`` and delete it: the pages nfs-cp then takes
    have been faulted in by the VM (a tmpfs scratch file)."""
    block = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    os.unlink(path)


def _cpu_seconds(s: Server) -> float:
    """CPU time of a server process, all its threads, including threads that have
    exited (utime + stime of /proc/PID/stat, in clock ticks: 10 ms).  Summing the
    live threads' schedstat instead lost the time of ganesha's exited workers and
    could give a row a negative figure."""
    if s.proc is None:
        return 0.0
    try:
        with open(f"/proc/{s.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1000:.0f} ms"
    if unit == "IOPS":
        return f"{v:,.0f}"
    return f"{v:,.0f}"


def _report_one(rows: list[Row], s: Server, runs: int) -> None:
    print(f"NFSv3 over TCP on 127.0.0.1, {s.name} only, medians of {runs} runs")
    for row in rows:
        vals = s.results[row.name]
        print(f"{row.name:<26} {row.unit:<5} {_fmt(statistics.median(vals), row.unit):>12}  "
              f"({', '.join(_fmt(v, row.unit) for v in vals)})")


def _report(rows: list[Row], st: Server, ga: Server, runs: int,
            un: Server | None = None) -> None:
    """The table of medians with a ratio column per peer (ganesha, and unfs3 if
    it ran), the CPU table, then ``min ratio`` lines: ganesha's last."""
    peers = [ga] + ([un] if un is not None else [])
    print(f"NFSv3 over TCP on 127.0.0.1, medians of {runs} alternating runs")
    print(f"{'test':<26} {'unit':<5} {'storaged':>12}"
          + "".join(f" {p.name:>12} {'ratio':>7}" for p in peers))
    ratios: dict[str, list[float]] = {p.name: [] for p in peers}
    for row in rows:
        a = statistics.median(st.results[row.name])
        line = f"{row.name:<26} {row.unit:<5} {_fmt(a, row.unit):>12}"
        for p in peers:
            b = statistics.median(p.results[row.name])
            ratio = (a / b) if row.higher_better else (b / a)
            ratios[p.name].append(ratio)
            line += f" {_fmt(b, row.unit):>12} {ratio:>7.2f}"
        print(line)
    if all(s.cpu.get(r.name) for s in (st, *peers) for r in rows):
        # Less sensitive to other load on the machine than wall-clock figures.
        print("server CPU per run of the row (median, ms; ratio = peer/storaged)")
        for row in rows:
            a = statistics.median(st.cpu[row.name]) * 1000
            line = f"{row.name:<26} {'ms':<5} {a:>12,.0f}"
            for p in peers:
                b = statistics.median(p.cpu[row.name]) * 1000
                line += f" {b:>12,.0f} {(b / a if a else 0):>7.2f}"
            print(line)
    for p in reversed(peers):  # ganesha's line is the last line
        print(f"min ratio storaged/{p.name}: {min(ratios[p.name]):.2f}")
