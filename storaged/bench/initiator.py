"""storaged's initiator vs libiscsi against the same storaged target.

``python -m storaged.bench initiator [--rounds N] [--seconds S]``

One storaged daemon serves a LUN on 127.0.0.1; each row runs the same I/O
shape through libiscsi (``qemu-img bench`` with QEMU's iscsi driver, a
subprocess) and through storaged's initiator (``RemoteBlockDevice``'s
async API in this process, the same depth of commands in flight),
alternating which goes first every round.  Both issue sequential requests
like ``qemu-img bench`` does.  The table shows medians; the last line is
``min ratio storaged/libiscsi: X.XX`` (higher is better for storaged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

from storaged.bench.iscsi import (
    STORAGED_IQN,
    BenchError,
    make_backing,
    parse_qemu_bench,
    render_table,
    storaged_daemon,
)

KiB = 1024
SIZE = 256 << 20
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Row:
    label: str
    size: int
    depth: int
    write: bool = False

    @property
    def unit(self) -> str:
        return "MB/s" if self.size >= 64 * KiB else "IOPS"

    def value(self, ops: int, seconds: float) -> float:
        rate = ops / seconds
        return rate * self.size / 1e6 if self.unit == "MB/s" else rate


ROWS = (
    Row("4k read QD32", 4 * KiB, 32),
    Row("4k write QD32", 4 * KiB, 32, True),
    Row("128k seq read QD16", 128 * KiB, 16),
    Row("128k seq write QD16", 128 * KiB, 16, True),
    Row("4k read QD1", 4 * KiB, 1),
    Row("4k write QD1", 4 * KiB, 1, True),
)


def run_libiscsi(port: int, row: Row, count: int) -> float:
    opts = (f"driver=iscsi,transport=tcp,portal={HOST}:{port},target={STORAGED_IQN},lun=0,"
            "initiator-name=iqn.2026-11.org.storaged:bench-libiscsi")
    cmd = ["qemu-img", "bench", "-c", str(count), "-d", str(row.depth), "-s", str(row.size)]
    if row.write:
        cmd.append("-w")
    p = subprocess.run(cmd + ["--image-opts", opts], capture_output=True, text=True,
                       timeout=600)
    if p.returncode:
        raise BenchError(f"qemu-img bench: {p.stderr.strip()[-300:]}")
    return row.value(count, parse_qemu_bench(p.stdout))


def run_storaged(dev, row: Row, count: int) -> float:
    payload = os.urandom(row.size)
    span = SIZE // row.size

    async def worker(next_op: list[int]) -> None:
        while next_op[0] < count:
            i = next_op[0]
            next_op[0] += 1
            off = (i % span) * row.size
            if row.write:
                await dev.awrite(off, payload)
            else:
                await dev.aread(off, row.size)

    async def run() -> float:
        t0 = time.perf_counter()
        shared = [0]
        await asyncio.gather(*(worker(shared) for _ in range(row.depth)))
        return time.perf_counter() - t0

    seconds = dev.submit(run()).result(600)
    return row.value(count, seconds)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench initiator",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5, help="target seconds per run")
    ap.add_argument("--port", type=int, default=0, help="storaged portal port (0: free)")
    args = ap.parse_args(argv)
    from storaged.initiator.device import RemoteBlockDevice

    port = args.port
    if not port:
        import socket
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="storaged-bench-ini-") as work:
        image = os.path.join(work, "lun.img")
        make_backing([image], SIZE)
        with storaged_daemon(work, image, None, port=port):
            dev = RemoteBlockDevice(f"iscsi://{HOST}:{port}/{STORAGED_IQN}/0"
                                    "?initiator=iqn.2026-11.org.storaged:bench-storaged")
            try:
                table = []
                ratios = []
                for row in ROWS:
                    # Size the run from a short probe on libiscsi.
                    probe = 2000 if row.size < 64 * KiB else 400
                    if row.depth == 1:
                        probe //= 4
                    rate = run_libiscsi(port, row, probe)
                    ops_rate = rate * 1e6 / row.size if row.unit == "MB/s" else rate
                    count = max(200, int(ops_rate * args.seconds))
                    ours, theirs = [], []
                    for r in range(args.rounds):
                        order = [0, 1] if r % 2 == 0 else [1, 0]
                        for which in order:
                            if which == 0:
                                ours.append(run_storaged(dev, row, count))
                            else:
                                theirs.append(run_libiscsi(port, row, count))
                    a, b = statistics.median(ours), statistics.median(theirs)
                    ratios.append(a / b)
                    table.append([row.label, row.unit, f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}"])
                    print(f"  {row.label}: storaged {a:,.0f} libiscsi {b:,.0f} {row.unit}",
                          flush=True)
            finally:
                dev.close()
    print(render_table(["row", "unit", "storaged", "libiscsi", "ratio"], table))
    print(f"min ratio storaged/libiscsi: {min(ratios):.2f}")
    return 0
