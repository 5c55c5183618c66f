"""Benchmarks: ``python -m storaged.bench NAME [ARGS...]``.

Each entry of :data:`BENCHMARKS` maps a name to ``(module, description)``;
the module must define ``main(argv: list[str]) -> int | None``.  Add new
benchmarks (iscsi, nfs, dlm ...) by adding an entry here.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "raid": ("storaged.bench.raid", "RAID parity vs ISA-L and memcpy; RAID-5/6 I/O vs raw"),
    "crc": ("storaged.bench.crc", "CRC32C, BHS and CDB codecs: compiled vs pure Python"),
    "iscsi": ("storaged.bench.iscsi", "storaged vs tgt on loopback (qemu-img bench, iscsi-perf)"),
    "nfs": ("storaged.bench.nfs", "NFSv3: storaged vs nfs-ganesha (qemu-img, nfs-cp, nfs-ls)"),
    "dlm": ("storaged.bench.dlm", "DLM lock+unlock pairs/s and latency vs etcd 3.4"),
    "initiator": ("storaged.bench.initiator", "storaged initiator vs libiscsi (qemu-img bench)"),
    "fence": ("storaged.bench.fence", "fence_storaged: request to refused I/O / agent success"),
    "clusterfs": ("storaged.bench.clusterfs", "cluster filesystem (local, 2-node) vs bindfs"),
}


def usage() -> str:
    lines = ["usage: python -m storaged.bench NAME [ARGS...]", "", "benchmarks:"]
    width = max(map(len, BENCHMARKS), default=0)
    for name, (_, desc) in sorted(BENCHMARKS.items()):
        lines.append(f"  {name:<{width}}  {desc}")
    return "\n".join(lines)


def run(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with its own command-line arguments."""
    module, _ = BENCHMARKS[name]
    rc = importlib.import_module(module).main(argv)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(name, rest)
