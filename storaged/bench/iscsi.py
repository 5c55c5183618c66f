"""storaged vs tgt on loopback, side by side in one run.

``python -m storaged.bench iscsi [--runs N] [--seconds S] [--rows REGEX] ...``

Starts storaged (port 3293) and tgtd (port 3294, control port 3294) on
127.0.0.1, each exporting its own copy of one 1 GiB file of identical
pseudo-random content (written and fsynced up front, so the page cache is
warm), then for every row alternates runs against the two targets:

* ``qemu-img bench`` 4 KiB reads and writes at QD32, 128 KiB sequential reads
  and writes at QD16, 4 KiB reads and writes at QD1;
* ``iscsi-perf`` 4 KiB random reads at QD32;
* every row with header digests off and on (CRC32C; libiscsi, and so QEMU,
  supports HeaderDigest only, not DataDigest);
* the qemu-img rows again with O_DIRECT backing: a third 1 GiB file per
  target, ``storaged backstore create --direct`` against tgt's
  ``--bsoflags direct`` LUN (a storaged without ``--direct`` shows those
  rows for tgt only, ratio ``n/a``).

Each row reports the median of ``--runs`` runs (default 3).  A calibration
run on each target first sizes the qemu-img request count so a run lasts
about ``--seconds``; it also warms both targets up.  Runs alternate
storaged/tgt and swap the order every round so noise hits both alike.

It also reports each daemon's RSS with no sessions and with 64 idle
logged-in sessions, and the CPU seconds (utime+stime from /proc/PID/stat)
each daemon spends per GB moved in the 128 KiB rows.

The table's last line is ``min ratio storaged/tgt: X.XX`` (storaged figure
divided by tgt figure; higher is better for storaged; ``n/a`` rows are
ignored).

Profiling storaged while the selected rows run (reports go to stderr):
``--cprofile FILE`` runs the daemon under cProfile and lists the functions
(Python and C builtins such as ``os.pread`` or ``transport.writelines``) by
own time; ``--perf FILE`` samples it with ``perf record`` and splits CPU time
between the kernel, the interpreter and extension modules; ``--py-spy FILE``
records collapsed stacks for a flame graph.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

HOST = "127.0.0.1"
STORAGED_PORT = 3293
TGT_PORT = 3294
STORAGED_IQN = "iqn.2026-11.org.storaged:bench"
TGT_IQN = "iqn.2026-11.org.storaged:tgtbench"
BENCH_INITIATOR = "iqn.2026-11.org.storaged:bench-initiator"
GiB = 1 << 30
KiB = 1024
IDLE_SESSIONS = 64

STORAGED = "storaged"
TGT = "tgt"
TARGETS = (STORAGED, TGT)


class BenchError(RuntimeError):
    """A daemon or a client tool failed; the message says which and why."""


# ----------------------------------------------------------------- rows

@dataclass(frozen=True)
class Case:
    """One table row: a client tool, an I/O shape and a target variant."""

    label: str
    tool: str          # "qemu" (qemu-img bench) or "perf" (iscsi-perf)
    size: int          # bytes per request
    depth: int         # requests in flight
    write: bool = False
    digest: bool = False   # HeaderDigest=CRC32C
    direct: bool = False   # O_DIRECT backing instead of the page cache

    @property
    def name(self) -> str:
        """Row name shown in the table."""
        extra = [x for x, on in (("hdgst", self.digest), ("O_DIRECT", self.direct)) if on]
        return self.label + (f", {', '.join(extra)}" if extra else "")

    @property
    def unit(self) -> str:
        """``MB/s`` for the large sequential rows, ``IOPS`` for the rest."""
        return "MB/s" if self.size >= 64 * KiB else "IOPS"

    def value(self, ops_per_second: float) -> float:
        """The row's figure (in :attr:`unit`) for a measured request rate."""
        if self.unit == "MB/s":
            return ops_per_second * self.size / 1e6
        return ops_per_second


BASE_CASES = (
    Case("4k read QD32", "qemu", 4 * KiB, 32),
    Case("4k write QD32", "qemu", 4 * KiB, 32, write=True),
    Case("128k seq read QD16", "qemu", 128 * KiB, 16),
    Case("128k seq write QD16", "qemu", 128 * KiB, 16, write=True),
    Case("4k read QD1", "qemu", 4 * KiB, 1),
    Case("4k write QD1", "qemu", 4 * KiB, 1, write=True),
    Case("iscsi-perf 4k rand read QD32", "perf", 4 * KiB, 32),
)


def build_cases(digests: bool = True, direct: bool = True,
                rows: str | None = None) -> list[Case]:
    """All rows in run order: page cache, then header digests, then O_DIRECT.

    ``rows`` is a regular expression matched (search) against row names.
    """
    cases = list(BASE_CASES)
    if digests:
        cases += [Case(c.label, c.tool, c.size, c.depth, c.write, digest=True)
                  for c in BASE_CASES]
    if direct:
        cases += [Case(c.label, c.tool, c.size, c.depth, c.write, direct=True)
                  for c in BASE_CASES if c.tool == "qemu"]
    if rows:
        pat = re.compile(rows)
        cases = [c for c in cases if pat.search(c.name)]
    return cases


# -------------------------------------------------------------- parsing

_QEMU_RE = re.compile(r"Run completed in ([0-9]+(?:\.[0-9]+)?) seconds")
_PERF_RE = re.compile(r"iops average (\d+)")


def parse_qemu_bench(output: str) -> float:
    """Seconds of I/O from ``qemu-img bench`` output ("Run completed in X seconds.")."""
    m = _QEMU_RE.search(output)
    if m is None:
        raise BenchError(f"no 'Run completed' line in qemu-img output: {output[-300:]!r}")
    return float(m.group(1))


def parse_iscsi_perf(output: str) -> float:
    """Average IOPS from ``iscsi-perf`` output (its last ``iops average N`` figure).

    iscsi-perf redraws its progress line with carriage returns; the final
    summary after Ctrl-C or ``-t`` is the last match.
    """
    found = _PERF_RE.findall(output)
    if not found:
        raise BenchError(f"no 'iops average' in iscsi-perf output: {output[-300:]!r}")
    return float(found[-1])


def parse_proc_stat(text: str, clk_tck: int) -> float:
    """CPU seconds (utime + stime, all threads) from a /proc/PID/stat line."""
    fields = text.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clk_tck


def parse_vmrss(text: str) -> int:
    """Resident set size in bytes from /proc/PID/status."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/PID/status")


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process (with all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        return parse_proc_stat(f.read(), os.sysconf("SC_CLK_TCK"))


def rss_bytes(pid: int) -> int:
    """Current resident set size of a process."""
    with open(f"/proc/{pid}/status") as f:
        return parse_vmrss(f.read())


# ------------------------------------------------------------- results

@dataclass
class Sample:
    """One run: its figure, requests, bytes moved and the daemon's CPU time."""

    value: float
    ops: int
    nbytes: int
    cpu: float
    seconds: float


@dataclass
class RowResult:
    """Per-target samples of one row."""

    case: Case
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def median(self, target: str) -> float | None:
        """Median figure for ``target``, or None if it was not run."""
        got = self.samples.get(target)
        return statistics.median(s.value for s in got) if got else None

    def cpu_per_gb(self, target: str) -> float | None:
        """Daemon CPU seconds per GB (1e9 bytes) moved over all runs."""
        got = self.samples.get(target)
        if not got:
            return None
        nbytes = sum(s.nbytes for s in got)
        return sum(s.cpu for s in got) / (nbytes / 1e9) if nbytes else None


def ratio(storaged: float | None, tgt: float | None) -> float | None:
    """storaged / tgt, or None when either side is missing."""
    if storaged is None or tgt is None or tgt <= 0:
        return None
    return storaged / tgt


def fmt_value(value: float | None, unit: str) -> str:
    """A table cell: ``54,321 IOPS`` / ``2,301 MB/s`` / ``-``."""
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}"


def fmt_ratio(value: float | None) -> str:
    """Ratio cell: ``1.23`` or ``n/a``."""
    return "n/a" if value is None else f"{value:.2f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def min_ratio(results: Iterable[RowResult]) -> float | None:
    """Smallest storaged/tgt ratio over rows that have both figures."""
    ratios = [r for r in (ratio(x.median(STORAGED), x.median(TGT)) for x in results)
              if r is not None]
    return min(ratios) if ratios else None


def format_results(results: Sequence[RowResult], resources: Sequence[Sequence[str]] = (),
                   runs: int | None = None) -> str:
    """The report: the row table, the resource table, then the min-ratio line last."""
    rows = []
    for r in results:
        s, t = r.median(STORAGED), r.median(TGT)
        rows.append([r.case.name, fmt_value(s, r.case.unit), fmt_value(t, r.case.unit),
                     fmt_ratio(ratio(s, t))])
    title = "row" if runs is None else f"row (median of {runs})"
    parts = [render_table([title, STORAGED, TGT, "storaged/tgt"], rows)]
    if resources:
        parts.append(render_table(["resource", STORAGED, TGT], resources))
    m = min_ratio(results)
    parts.append(f"min ratio storaged/tgt: {fmt_ratio(m)}")
    return "\n\n".join(parts)


def resource_rows(results: Sequence[RowResult], rss: dict[str, tuple[int, int]],
                  sessions: int = IDLE_SESSIONS) -> list[list[str]]:
    """Rows of the resource table: RSS idle/with sessions, CPU s per GB moved."""
    out: list[list[str]] = []

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / (1 << 20):.1f} MiB"

    if rss:
        out.append(["RSS, no sessions"] + [mib(rss[t][0]) if t in rss else "-" for t in TARGETS])
        out.append([f"RSS, {sessions} idle sessions"]
                   + [mib(rss[t][1]) if t in rss else "-" for t in TARGETS])
        out.append(["RSS per idle session"]
                   + [f"{(rss[t][1] - rss[t][0]) / sessions / 1024:.0f} KiB" if t in rss
                      else "-" for t in TARGETS])
    for r in results:
        if r.case.unit != "MB/s":
            continue
        cells = []
        for t in TARGETS:
            v = r.cpu_per_gb(t)
            cells.append("-" if v is None else f"{v:.2f}")
        out.append([f"CPU s/GB, {r.case.name}", *cells])
    return out


def plan_count(case: Case, rates: Iterable[float], seconds: float) -> int:
    """Requests for a run of about ``seconds``, from calibration rates (requests/s).

    Uses the geometric mean of the targets' rates, so neither run is much
    shorter or longer than asked; at least 4 x depth requests.
    """
    rs = [r for r in rates if r > 0]
    if not rs:
        raise BenchError(f"no calibration rate for {case.name}")
    mean = math.exp(sum(math.log(r) for r in rs) / len(rs))
    return max(4 * case.depth, round(mean * seconds))


def probe_count(case: Case) -> int:
    """Requests of the calibration/warm-up run (well under a second on tgt)."""
    if case.depth == 1 or case.size >= 64 * KiB:
        return 1500
    return 8000


# ------------------------------------------------------------- clients

@dataclass
class Endpoint:
    """A running target as the clients see it."""

    name: str
    port: int
    iqn: str
    lun: int
    direct_lun: int | None
    pid: int
    state_dir: str | None = None   # storaged: its --dir, for live `target set`
    digest: bool | None = None     # target-side HeaderDigest setting now in force

    def lun_for(self, case: Case) -> int | None:
        """The LUN a row runs against (None: this target cannot run it)."""
        return self.direct_lun if case.direct else self.lun


def qemu_command(ep: Endpoint, case: Case, count: int) -> list[str]:
    """``qemu-img bench`` against the endpoint through QEMU's libiscsi driver."""
    lun = ep.lun_for(case)
    opts = ",".join([
        "driver=iscsi", "transport=tcp", f"portal={HOST}:{ep.port}", f"target={ep.iqn}",
        f"lun={lun}", f"header-digest={'crc32c' if case.digest else 'none'}",
        f"initiator-name={BENCH_INITIATOR}",
    ])
    cmd = ["qemu-img", "bench", "-c", str(count), "-d", str(case.depth), "-s", str(case.size)]
    if case.write:
        cmd.append("-w")
    return cmd + ["--image-opts", opts]


def perf_command(ep: Endpoint, case: Case, seconds: int) -> list[str]:
    """``iscsi-perf`` random reads for ``seconds`` (libiscsi URL syntax)."""
    lun = ep.lun_for(case)
    url = f"iscsi://{HOST}:{ep.port}/{ep.iqn}/{lun}"
    if case.digest:
        url += "?header_digest=crc32c"
    return ["iscsi-perf", "-i", BENCH_INITIATOR, "-m", str(case.depth),
            "-b", str(case.size // 512), "-r", "-t", str(seconds), url]


def set_header_digest(ep: Endpoint, on: bool) -> None:
    """Make the target itself require (or refuse) HeaderDigest=CRC32C.

    iscsi-perf always offers ``None,CRC32C`` and tgt answers ``None`` to a
    QEMU offer of ``CRC32C`` unless configured for it, so the digest rows
    set the key on the target side as well as in QEMU's options.
    """
    if ep.digest is on:
        return
    value = "CRC32C" if on else "None"
    if ep.name == TGT:
        _tgtadm(ep.port, "--op", "update", "--mode", "target", "--tid", "1",
                "--name", "HeaderDigest", "--value", value)
    else:
        assert ep.state_dir is not None
        p = subprocess.run([sys.executable, "-m", "storaged", "--dir", ep.state_dir, "target",
                            "set", ep.iqn, f"HeaderDigest={value}"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"storaged target set HeaderDigest={value}: {p.stderr.strip()}")
    ep.digest = on


def _run_tool(cmd: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           errors="replace")
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{cmd[0]} timed out after {timeout:.0f}s: {' '.join(cmd)}") from e
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-500:]}")
    return p.stdout + p.stderr


def run_once(ep: Endpoint, case: Case, count: int, seconds: float) -> Sample:
    """One measured run of ``case`` against ``ep``; ``count`` is for qemu-img."""
    cpu0 = cpu_seconds(ep.pid)
    if case.tool == "qemu":
        out = _run_tool(qemu_command(ep, case, count), timeout=60 + 20 * seconds)
        secs = parse_qemu_bench(out)
        ops = count
        rate = count / secs if secs > 0 else 0.0
    else:
        secs = max(1, round(seconds))
        out = _run_tool(perf_command(ep, case, secs), timeout=60 + 4 * secs)
        rate = parse_iscsi_perf(out)
        ops = int(rate * secs)
    cpu = cpu_seconds(ep.pid) - cpu0
    return Sample(case.value(rate), ops, ops * case.size, cpu, secs)


# ------------------------------------------------------------- daemons

def port_free(port: int) -> bool:
    """True if nothing listens on HOST:port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Wait until HOST:port accepts connections (or the daemon died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} during startup")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


def storaged_supports_direct() -> bool:
    """True if ``storaged backstore create`` has a ``--direct`` (O_DIRECT) option."""
    p = subprocess.run([sys.executable, "-m", "storaged", "backstore", "create", "--help"],
                       capture_output=True, text=True)
    return re.search(r"--direct\b", p.stdout) is not None


@contextmanager
def storaged_daemon(workdir: str, image: str, direct_image: str | None,
                    port: int = STORAGED_PORT, cprofile: str | None = None,
                    extra_env: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """Configure a fresh state dir with the CLI, run ``storaged serve``, stop it after.

    With ``cprofile`` the daemon runs under ``python -m cProfile -o cprofile``;
    the profile is written when it stops.  ``extra_env`` is added to the
    daemon's environment only (not to the CLI calls or the clients).
    """
    state = os.path.join(workdir, "storaged-state")
    os.makedirs(state, exist_ok=True)
    env = dict(os.environ, STORAGED_LOG="WARNING")
    base = [sys.executable, "-m", "storaged", "--dir", state]

    def cli(*args: str) -> None:
        p = subprocess.run(base + list(args), capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise BenchError(f"storaged {' '.join(args)}: {p.stderr.strip()}")

    cli("backstore", "create", "bench", image)
    cli("target", "create", STORAGED_IQN, "--portal", f"{HOST}:{port}")
    cli("lun", "add", STORAGED_IQN, "bench", "--lun", "0")
    direct_lun = None
    if direct_image is not None:
        cli("backstore", "create", "benchdirect", direct_image, "--direct")
        cli("lun", "add", STORAGED_IQN, "benchdirect", "--lun", "1")
        direct_lun = 1
    cli("target", "open", STORAGED_IQN)
    log = open(os.path.join(workdir, "storaged.log"), "wb")
    serve = base + ["serve"]
    if cprofile:
        serve[1:1] = ["-m", "cProfile", "-o", os.path.abspath(cprofile)]
    proc = subprocess.Popen(serve, env={**env, **(extra_env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(port, proc, "storaged")
        yield Endpoint(STORAGED, port, STORAGED_IQN, 0, direct_lun, proc.pid, state_dir=state)
    finally:
        _stop(proc)
        log.close()


def _tgtadm(port: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["tgtadm", "-C", str(port), "--lld", "iscsi", *args],
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise BenchError(f"tgtadm {' '.join(args)}: {(p.stderr or p.stdout).strip()}")
    return p


# tgt's stock values cut Data-In at 8 KiB (MaxXmitDataSegmentLength) and
# solicit every write with R2T (InitialR2T=Yes, FirstBurstLength 64 KiB);
# these match what storaged offers (storaged.iscsi.params.TARGET_DEFAULTS),
# so both targets negotiate the same session with the same initiator.
TGT_TUNING = {
    "MaxRecvDataSegmentLength": "262144",
    "MaxXmitDataSegmentLength": "262144",
    "FirstBurstLength": "262144",
    "MaxBurstLength": "16776192",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
}


@contextmanager
def tgt_daemon(workdir: str, image: str, direct_image: str, port: int = TGT_PORT,
               tuning: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """Run ``tgtd -f`` on its own control port with LUN 1 (cached) and LUN 2 (O_DIRECT).

    ``tuning`` sets target parameters (default :data:`TGT_TUNING`; pass ``{}``
    for tgt's stock values).  tgtd ignores SIGTERM; it is stopped with
    ``tgtadm --op delete --mode system`` after deleting the target, and
    killed if that fails.
    """
    log = open(os.path.join(workdir, "tgtd.log"), "wb")
    proc = subprocess.Popen(["tgtd", "-f", "-C", str(port), "--iscsi", f"portal={HOST}:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while _tgtadm(port, "--op", "show", "--mode", "target", check=False).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("tgtd did not start (see tgtd.log)")
            time.sleep(0.1)
        _tgtadm(port, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        _tgtadm(port, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                "-b", image)
        _tgtadm(port, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "2",
                "-b", direct_image, "--bsoflags", "direct")
        for key, value in (TGT_TUNING if tuning is None else tuning).items():
            _tgtadm(port, "--op", "update", "--mode", "target", "--tid", "1",
                    "--name", key, "--value", value)
        _tgtadm(port, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        wait_listening(port, proc, "tgtd")
        yield Endpoint(TGT, port, TGT_IQN, 1, 2, proc.pid)
    finally:
        if proc.poll() is None:
            _tgtadm(port, "--op", "delete", "--mode", "target", "--tid", "1", "--force",
                    check=False)
            subprocess.run(["tgtadm", "-C", str(port), "--op", "delete", "--mode", "system"],
                           capture_output=True)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def make_backing(paths: Sequence[str], size: int, chunk: int = 16 << 20) -> None:
    """Write identical pseudo-random content to every path, then fsync them.

    Fully allocated, on disk (for the O_DIRECT LUNs) and in the page cache.
    """
    rnd = os.urandom(chunk)
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in paths]
    try:
        off = 0
        while off < size:
            n = min(chunk, size - off)
            # Vary each chunk a little so no two chunks are identical.
            block = (off // chunk).to_bytes(8, "little") + rnd[8:n]
            for fd in fds:
                os.pwrite(fd, block, off)
            off += n
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------- idle sessions

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError("target closed the connection during login")
        buf += chunk
    return bytes(buf)


def login_session(port: int, target: str, isid: int, initiator: str = BENCH_INITIATOR,
                  timeout: float = 10.0) -> socket.socket:
    """Open one TCP connection and log in a normal session (no auth, no digests).

    The socket is returned open: the session stays logged in and idle until
    it is closed.
    """
    from storaged.iscsi import text
    from storaged.iscsi.pdu import BHS_LEN, Op, Pdu, build, pad_len

    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        stages = [
            (0, 1, [("InitiatorName", initiator), ("TargetName", target),
                    ("SessionType", "Normal"), ("AuthMethod", "None")]),
            (1, 3, [("HeaderDigest", "None"), ("DataDigest", "None"),
                    ("MaxRecvDataSegmentLength", "262144"), ("ErrorRecoveryLevel", "0"),
                    ("ImmediateData", "Yes"), ("InitialR2T", "Yes")]),
        ]
        expstatsn = 0
        itt = 1
        for csg, nsg, pairs in stages:
            for _attempt in range(4):
                data = text.encode(pairs)
                hdr = build(Op.LOGIN_REQ, flags=0x80 | (csg << 2) | nsg, data_len=len(data),
                            lun=isid << 16, itt=itt, w24=1, w28=expstatsn, immediate=True)
                sock.sendall(hdr + data + bytes(pad_len(len(data))))
                itt += 1
                rhdr = _recv_exact(sock, BHS_LEN)
                rsp = Pdu(rhdr)
                if rsp.data_len:
                    _recv_exact(sock, rsp.data_len + pad_len(rsp.data_len))
                if rsp.w36 >> 16:
                    raise BenchError(f"login to {target} failed: status 0x{rsp.w36 >> 16:04x}")
                expstatsn = (rsp.w24 + 1) & 0xFFFFFFFF
                if rsp.flags & 0x80:
                    break
                pairs = []  # target not ready to transit yet: ask again
            else:
                raise BenchError(f"login to {target} did not leave stage {csg}")
        return sock
    except BaseException:
        sock.close()
        raise


def count_sessions(ep: Endpoint) -> int:
    """Logged-in sessions as the target itself reports them."""
    if ep.name == TGT:
        out = _tgtadm(ep.port, "--op", "show", "--mode", "target").stdout
        return len(re.findall(r"^\s*I_T nexus: \d+", out, re.MULTILINE))
    from storaged.control.client import call

    assert ep.state_dir is not None
    status = call(os.path.join(ep.state_dir, "control.sock"), "status", {})
    return len(status["sessions"])


def measure_idle_sessions(ep: Endpoint, count: int = IDLE_SESSIONS,
                          settle: float = 1.0) -> tuple[int, int]:
    """RSS of the daemon before and while ``count`` idle sessions are logged in."""
    time.sleep(settle)
    before = rss_bytes(ep.pid)
    with ExitStack() as stack:
        for i in range(count):
            sock = login_session(ep.port, ep.iqn, 0x23BE00000000 + i)
            stack.callback(sock.close)
        time.sleep(settle)
        during = rss_bytes(ep.pid)
        seen = count_sessions(ep)
        if seen < count:
            raise BenchError(f"{ep.name} reports {seen} sessions, expected {count}")
    time.sleep(settle)  # let the daemon notice the closes
    return before, during


# ------------------------------------------------------------ profiling

def _short_path(path: str) -> str:
    """``storaged/iscsi/pdu.py``, ``asyncio/runners.py``, ``uvloop/__init__.py``."""
    m = re.search(r"/lib/python3\.\d+/(?:site-packages/)?(.*)$", path)
    if m:
        return m.group(1)
    i = path.rfind("/storaged/")
    return path[i + 1:] if i >= 0 else path


_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> str:
    m = _FRAME_RE.match(frame.strip())
    if m is None:
        return frame.strip()
    return f"{m.group('func')} ({_short_path(m.group('file'))})"


# Waits py-spy does not always recognise as idle (a thread-pool worker
# blocked on its queue is sampled as running inside a VM): the last Python
# frame, or a native frame near the leaf.
IDLE_PY_FRAMES = frozenset({
    "_worker (concurrent/futures/thread.py)",
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
})
IDLE_NATIVE_FRAMES = ("epoll_wait", "epoll_pwait", "_queue_SimpleQueue_get",
                      "PyThread_acquire_lock_timed", "pthread_cond_timedwait")


def is_idle(frames: Sequence[str]) -> bool:
    """True for a sample of a thread waiting for work (event loop poll, idle worker)."""
    last_py = next((f for f in reversed(frames) if ".py)" in f), None)
    if last_py in IDLE_PY_FRAMES:
        return True
    return any(f.startswith(IDLE_NATIVE_FRAMES) for f in frames[-4:])


def summarize_collapsed(lines: Iterable[str], top: int = 15
                        ) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Self and inclusive sample counts per function from collapsed stacks.

    Each line is ``frame;frame;...;leaf COUNT`` (py-spy ``--format raw``,
    flamegraph.pl input).  Idle samples (:func:`is_idle`) are left out.
    Returns (busy samples, top self, top inclusive).
    """
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame_key(f) for f in stack.split(";") if f]
        # py-spy prepends a process/thread frame; skip non-function frames.
        frames = [f for f in frames if "(" in f]
        if not frames or is_idle(frames):
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    return total, self_c.most_common(top), incl.most_common(top)


def format_profile(total: int, self_top: Sequence[tuple[str, int]],
                   incl_top: Sequence[tuple[str, int]]) -> str:
    """Two small tables: hottest functions by self time and by inclusive time."""
    def rows(items: Sequence[tuple[str, int]]) -> list[list[str]]:
        return [[f"{100 * n / total:.1f}%" if total else "-", name] for name, n in items]

    return "\n\n".join([
        f"py-spy: {total} busy samples of storaged (idle waits left out)",
        render_table(["self", "function"], rows(self_top)),
        render_table(["inclusive", "function"], rows(incl_top)),
    ])


# The event loop's own time (epoll wait, socket reads, callback dispatch in
# uvloop's compiled core) shows up as the own time of the Python frame that
# entered the loop (uvloop methods are not traced as C calls); it is mostly
# waiting.
LOOP_FRAMES = ("run (asyncio/runners.py:", "select (selectors.py:",
               "run_forever (asyncio/base_events.py:", "_run_once (asyncio/base_events.py:",
               "<method 'select' of 'select.epoll' objects>")


def cprofile_rows(path: str, top: int = 25) -> tuple[float, float, list[list[str]]]:
    """Top functions of a cProfile dump by own time.

    Returns (busy seconds, loop seconds, rows of [self %, self s, calls,
    us/call, cumulative %, function]).  Busy time is all own time except the
    event loop's core (:data:`LOOP_FRAMES`), which is mostly waiting;
    percentages are of busy time.  Compiled (Cython) functions such as
    uvloop's ``writelines`` or ``_fastio`` codecs are not traced: their time
    is the caller's own time.
    """
    st = pstats.Stats(path)
    entries = []
    loop = 0.0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore
        name = func if file == "~" else f"{func} ({_short_path(file)}:{line})"
        if name.startswith(LOOP_FRAMES):
            loop += tt
            continue
        entries.append((tt, nc, ct, name))
    busy = sum(e[0] for e in entries)
    entries.sort(reverse=True)
    rows = []
    for tt, nc, ct, name in entries[:top]:
        rows.append([f"{100 * tt / busy:.1f}%" if busy else "-", f"{tt:.2f}", f"{nc:,}",
                     f"{1e6 * tt / nc:.2f}" if nc else "-",
                     f"{100 * ct / busy:.0f}%" if busy else "-", name])
    return busy, loop, rows


def format_cprofile(path: str, top: int = 25) -> str:
    """cProfile report: own-time table of the hottest functions."""
    busy, loop, rows = cprofile_rows(path, top)
    head = (f"cProfile: {busy:.2f} s busy in the event-loop thread, "
            f"{loop:.2f} s in the loop's own C core (mostly idle, left out)")
    return head + "\n\n" + render_table(
        ["self", "self s", "calls", "us/call", "cum", "function"], rows)


@contextmanager
def perf_record(pid: int, output: str, freq: int = 999) -> Iterator[None]:
    """``perf record -g`` (cpu-clock: works in VMs) of ``pid`` while in the block."""
    proc = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(freq), "-g",
                             "-p", str(pid), "-o", output],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    time.sleep(0.5)
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise BenchError(f"perf record failed: {err.strip()[-300:]}")
    try:
        yield
    finally:
        _stop(proc, signal.SIGINT, grace=60)


def format_perf(path: str, top: int = 25) -> str:
    """CPU split by DSO (kernel / libpython / extensions) and the top symbols."""
    def report(sort: str) -> list[str]:
        p = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", sort,
                            "--stdio", "-g", "none"], capture_output=True, text=True)
        return [ln.rstrip() for ln in p.stdout.splitlines()
                if ln.strip() and not ln.startswith("#")]
    return "\n".join(["perf: CPU by DSO", *report("dso")[:8], "",
                      "perf: top symbols", *report("dso,sym")[:top]])


@contextmanager
def py_spy(pid: int, output: str, binary: str, rate: int = 250,
           native: bool = False) -> Iterator[None]:
    """Record ``pid`` with py-spy into ``output`` (collapsed stacks) while in the block.

    Python frames only, the process is not paused (``--nonblocking``): pausing
    it, and ``--native`` unwinding, slow storaged down by a third or more and
    charge much of the sampling stop to whatever syscall was running.
    """
    cmd = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
           "-o", output]
    cmd.append("--native" if native else "--nonblocking")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    time.sleep(1.0)
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise BenchError(f"py-spy failed: {err.strip()[-300:]}")
    try:
        yield
    finally:
        _stop(proc, signal.SIGINT, grace=30)


# ----------------------------------------------------------------- main

def machine_facts() -> list[str]:
    """nproc, CPU, kernel, Python, uvloop, fast path, peer versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed (asyncio loop)"
    from storaged import fastio
    impl = fastio.IMPLEMENTATION
    if impl == "compiled":
        try:
            import _fastio._crc as crc
            impl += f" (crc32c {crc.backend()})"
        except (ImportError, AttributeError):
            pass

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "missing"
        return out.splitlines()[0] if out else "?"

    pkgs = version(["dpkg-query", "-W", "-f", "${Package} ${Version}, ",
                    "tgt", "qemu-utils", "libiscsi-bin"]).rstrip(", ")
    return [
        f"nproc: {os.cpu_count()}, CPU: {cpu}",
        f"kernel: {platform.release()}, Python {platform.python_version()}, uvloop {uv}",
        f"storaged fast path: {impl}",
        f"peers: {pkgs}",
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]


def _require_tools(names: Iterable[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} "
                         "(Debian packages tgt, qemu-utils, qemu-block-extra, libiscsi-bin)")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_bench(args: argparse.Namespace) -> int:
    """Set up, run every row alternating targets, print the report."""
    cases = build_cases(digests=not args.no_digest, direct=not args.no_direct, rows=args.rows)
    if not cases:
        raise BenchError(f"no rows match {args.rows!r}")
    targets = [t for t in TARGETS if args.only in (None, t)]
    tools = ["qemu-img", "iscsi-perf"] + (["tgtd", "tgtadm"] if TGT in targets else [])
    _require_tools(tools)
    for t, port in ((STORAGED, args.storaged_port), (TGT, args.tgt_port)):
        if t in targets and not port_free(port):
            raise BenchError(f"port {port} for {t} is in use")
    if args.perf:
        _require_tools(["perf"])
    spy_bin = None
    if args.py_spy:
        spy_bin = args.py_spy_bin or shutil.which("py-spy")
        if spy_bin is None:
            raise BenchError("py-spy not found (pip install py-spy, or --py-spy-bin)")

    facts = machine_facts()
    print("\n".join(facts), flush=True)
    workdir = tempfile.mkdtemp(prefix="storaged-bench-", dir=args.workdir)
    want_direct = any(c.direct for c in cases)
    sd_direct = want_direct and STORAGED in targets and storaged_supports_direct()
    if want_direct and not sd_direct and STORAGED in targets:
        print("storaged has no O_DIRECT backstore option: O_DIRECT rows run on tgt only "
              "(ratio n/a)", flush=True)
    try:
        with ExitStack() as stack:
            images = {STORAGED: os.path.join(workdir, "storaged.img"),
                      TGT: os.path.join(workdir, "tgt.img")}
            direct_images = {TGT: os.path.join(workdir, "tgt-direct.img")}
            if sd_direct:
                direct_images[STORAGED] = os.path.join(workdir, "storaged-direct.img")
            paths = [images[t] for t in targets]
            paths += [p for t, p in direct_images.items() if t in targets]
            _log(f"writing {len(paths)} x {args.size / GiB:g} GiB backing files in {workdir}")
            make_backing(paths, args.size)
            eps: dict[str, Endpoint] = {}
            if STORAGED in targets:
                eps[STORAGED] = stack.enter_context(storaged_daemon(
                    workdir, images[STORAGED], direct_images.get(STORAGED),
                    args.storaged_port, cprofile=args.cprofile,
                    extra_env=dict(kv.split("=", 1) for kv in args.storaged_env)))
            if TGT in targets:
                eps[TGT] = stack.enter_context(tgt_daemon(
                    workdir, images[TGT], direct_images[TGT], args.tgt_port,
                    tuning={} if args.tgt_stock else None))
            rss: dict[str, tuple[int, int]] = {}
            if args.sessions:
                for t, ep in eps.items():
                    rss[t] = measure_idle_sessions(ep, args.sessions)
                    _log(f"{t}: RSS {rss[t][0] >> 20} MiB idle, {rss[t][1] >> 20} MiB with "
                         f"{args.sessions} sessions")
            if args.py_spy and STORAGED in eps:
                stack.enter_context(py_spy(eps[STORAGED].pid, args.py_spy, spy_bin,
                                           native=args.py_spy_native))
            if args.perf and STORAGED in eps:
                stack.enter_context(perf_record(eps[STORAGED].pid, args.perf))
            results = [run_row(case, eps, args) for case in cases]
        _log("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        report = format_results(results, resource_rows(results, rss, args.sessions), args.runs)
        print()
        print(report, flush=True)
        if args.py_spy and os.path.exists(args.py_spy):
            with open(args.py_spy) as f:
                _log("\n" + format_profile(*summarize_collapsed(f, args.top)))
        if args.cprofile and os.path.exists(args.cprofile):
            _log("\n" + format_cprofile(args.cprofile, args.top))
        if args.perf and os.path.exists(args.perf):
            _log("\n" + format_perf(args.perf, args.top))
        return 0
    finally:
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_row(case: Case, eps: dict[str, Endpoint], args: argparse.Namespace) -> RowResult:
    """Calibrate, then ``args.runs`` rounds alternating the targets."""
    result = RowResult(case)
    active = [ep for ep in eps.values() if ep.lun_for(case) is not None]
    count = 0
    for ep in active:
        set_header_digest(ep, case.digest)
    if case.tool == "qemu" and active:
        rates = []
        for ep in active:
            probe = probe_count(case)
            s = run_once(ep, case, probe, args.seconds)
            rates.append(probe / s.seconds if s.seconds > 0 else 0.0)
        count = plan_count(case, rates, args.seconds)
    for i in range(args.runs):
        order = active if i % 2 == 0 else active[::-1]
        for ep in order:
            s = run_once(ep, case, count, args.seconds)
            result.samples.setdefault(ep.name, []).append(s)
    cells = []
    for t in TARGETS:
        got = result.samples.get(t)
        if got:
            runs = " ".join(f"{s.value:,.0f}" for s in got)
            busy = sum(s.cpu for s in got) / max(sum(s.seconds for s in got), 1e-9)
            cells.append(f"{t} {fmt_value(result.median(t), case.unit)} "
                         f"[{runs}; CPU {100 * busy:.0f}%]")
    r = ratio(result.median(STORAGED), result.median(TGT))
    _log(f"{case.name}: {', '.join(cells)}, ratio {fmt_ratio(r)}")
    return result


def _env_pair(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m storaged.bench iscsi``."""
    ap = argparse.ArgumentParser(prog="python -m storaged.bench iscsi",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per row and target (median)")
    ap.add_argument("--seconds", type=float, default=3.0, help="approximate length of a run")
    ap.add_argument("--rows", metavar="REGEX", help="only rows whose name matches")
    ap.add_argument("--only", choices=TARGETS, help="run one target only (no ratios)")
    ap.add_argument("--no-digest", action="store_true", help="skip the header-digest rows")
    ap.add_argument("--no-direct", action="store_true", help="skip the O_DIRECT rows")
    ap.add_argument("--sessions", type=int, default=IDLE_SESSIONS,
                    help="idle sessions for the RSS figure (0: skip)")
    ap.add_argument("--size", type=int, default=GiB, help="backing file size in bytes")
    ap.add_argument("--storaged-port", type=int, default=STORAGED_PORT)
    ap.add_argument("--tgt-port", type=int, default=TGT_PORT,
                    help="tgtd portal and control port")
    ap.add_argument("--tgt-stock", action="store_true",
                    help="leave tgt's stock session parameters (8 KiB Data-In, InitialR2T=Yes)")
    ap.add_argument("--storaged-env", metavar="KEY=VALUE", action="append", default=[],
                    type=_env_pair, help="extra environment for the storaged daemon only "
                    "(repeatable), e.g. GLIBC_TUNABLES=... or STORAGED_NO_EXTENSIONS=1")
    ap.add_argument("--workdir", help="parent directory for the temporary files")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files and logs")
    ap.add_argument("--cprofile", metavar="FILE",
                    help="run storaged under cProfile, dump to FILE, list its top functions")
    ap.add_argument("--perf", metavar="FILE",
                    help="perf record storaged during the rows, show the kernel/user split")
    ap.add_argument("--py-spy", metavar="FILE",
                    help="record storaged with py-spy (collapsed stacks) during the rows")
    ap.add_argument("--py-spy-bin", metavar="PATH", help="py-spy executable")
    ap.add_argument("--py-spy-native", action="store_true", help="include native frames")
    ap.add_argument("--top", type=int, default=25, help="functions to list in profiles")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m storaged.bench iscsi``."""
    args = parser().parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:
        print("--runs must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return run_bench(args)
    except BenchError as e:
        print(f"bench iscsi: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench iscsi: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
