"""Micro-benchmark of the fast path: compiled _fastio vs the pure reference.

``python -m storaged.bench crc [--seconds S] [--no-pure]`` prints ns per call
and throughput for crc32c on 48 B (a header digest), 8 KiB and 1 MiB, next
to the PyPI ``crc32c`` package when it is installed, then the BHS and CDB
codecs.  Numbers for docs/benchmarks.md come from here.
"""

from __future__ import annotations

import argparse
import os
import platform
import timeit
from collections.abc import Callable

from storaged import _purefastio

SIZES = (48, 8 * 1024, 1024 * 1024)


def _time(stmt: str, env: dict, seconds: float) -> float:
    """Best-of-3 seconds per run of ``stmt``, each repeat lasting about ``seconds``.

    A statement string (not a lambda) keeps the harness overhead to ~10 ns.
    """
    timer = timeit.Timer(stmt, globals=env)
    number, elapsed = 1, 0.0
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= seconds / 5 or number >= 1 << 24:
            break
        number *= 2 if elapsed == 0 else max(2, min(10, int(seconds / 5 / elapsed) + 1))
    number = max(1, int(number * seconds / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=3, number=number)) / number


def _fmt_ns(sec: float | None) -> str:
    if sec is None:
        return "-"
    ns = sec * 1e9
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:,.1f} us"
    return f"{ns:,.0f} ns"


def _fmt_rate(sec: float | None, size: int) -> str:
    if sec is None:
        return "-"
    rate = size / sec
    return f"{rate / 1e9:.2f} GB/s" if rate >= 1e8 else f"{rate / 1e6:.2f} MB/s"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench crc", description=__doc__)
    ap.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    ap.add_argument("--no-pure", action="store_true", help="skip the (slow) pure path")
    args = ap.parse_args(argv)

    try:
        import _fastio
        import _fastio._crc as _crc
    except ImportError as exc:
        _fastio = _crc = None
        print(f"compiled _fastio not available ({exc}); run `pip install -e .`")
    try:
        import crc32c as pypi_crc32c
    except ImportError:
        pypi_crc32c = None

    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{platform.processor() or platform.platform()}")
    if _crc is not None:
        print(f"_fastio crc32c backend: {_crc.backend()}")
    if pypi_crc32c is not None:
        print(f"PyPI crc32c {getattr(pypi_crc32c, '__version__', '?')}, "
              f"hardware_based={getattr(pypi_crc32c, 'hardware_based', '?')}")
    print()

    impls: list[tuple[str, Callable | None]] = [
        ("_fastio", _fastio.crc32c if _fastio else None),
        ("_fastio sw", _crc._crc32c_sw if _crc else None),
        ("PyPI crc32c", pypi_crc32c.crc32c if pypi_crc32c else None),
        ("pure", None if args.no_pure else _purefastio.crc32c),
    ]
    impls = [(n, f) for n, f in impls if f is not None]
    rows = []
    for size in SIZES:
        data = os.urandom(size)
        row = [f"crc32c {size:,} B"]
        for _, fn in impls:
            secs = args.seconds if fn is not _purefastio.crc32c or size < 1 << 20 else 0.0
            t = _time("fn(data)", {"fn": fn, "data": data}, secs)
            row.append(f"{_fmt_ns(t)} ({_fmt_rate(t, size)})")
        rows.append(row)
    print(_table(["CRC32C", *[n for n, _ in impls]], rows))
    print()

    fields = (0x01, False, 0xC1, 0, 0, 0, 4096, 0x0001000000000000, 0x14, 4096, 0x20,
              0x18, 0x2A000000, 0x00001000, 0x00000800, 0)
    bhs = _purefastio.encode_bhs(*fields)
    cdb = bhs[32:48]
    target = bytearray(64)
    codecs: list[tuple[str, object]] = []
    if _fastio is not None:
        codecs.append(("_fastio", _fastio))
    codecs.append(("pure", _purefastio))
    args16 = ", ".join(f"f{i}" for i in range(16))
    env: dict[str, object] = {f"f{i}": v for i, v in enumerate(fields)}
    env.update(bhs=bhs, cdb=cdb, target=target)
    rows = []
    for label, func, stmt in (
        ("decode_bhs", "decode_bhs", "fn(bhs)"),
        ("encode_bhs", "encode_bhs", f"fn({args16})"),
        ("encode_bhs_into", "encode_bhs_into", f"fn(target, 8, {args16})"),
        ("scsi_rw_decode (10)", "scsi_rw_decode", "fn(cdb)"),
    ):
        rows.append([label, *[_fmt_ns(_time(stmt, {**env, "fn": getattr(m, func)},
                                            args.seconds)) for _, m in codecs]])
    print(_table(["codec (ns/call)", *[n for n, _ in codecs]], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
