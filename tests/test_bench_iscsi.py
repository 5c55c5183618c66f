"""Smoke tests of the iSCSI benchmark's parsing, planning and report code.

No daemons and no timing: the benchmark itself is ``python -m storaged.bench
iscsi`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from storaged.bench import BENCHMARKS
from storaged.bench import iscsi as bench
from storaged.bench.iscsi import STORAGED, TGT, BenchError, Case, RowResult, Sample

QEMU_OUT = (
    "Sending 20000 read requests, 4096 bytes each, 32 in parallel "
    "(starting at offset 0, step size 4096)\n"
    "Run completed in 0.580 seconds.\n"
)

PERF_OUT = (
    "iscsi-perf version 0.1 - (c) 2014-2015 by Peter Lieven\n\n"
    "connected to iscsi://127.0.0.1:3294/iqn.x:t/1\n"
    "performing RANDOM READ with 32 parallel requests\n\n"
    "00:00:01 - lba 48418, iops current 46303 (180 MB/s), iops average 46303 (180 MB/s), "
    "in_flight 32, busy 0        \r"
    "00:00:02 - lba 98558, iops current 47247 (184 MB/s), iops average 46775 (182 MB/s), "
    "in_flight 32, busy 0        \r\n"
    "iops average 45111 (176 MB/s)                                \n\nfinished.\n"
)


def test_registered() -> None:
    assert BENCHMARKS["iscsi"][0] == "storaged.bench.iscsi"


def test_parse_tool_output() -> None:
    assert bench.parse_qemu_bench(QEMU_OUT) == pytest.approx(0.58)
    assert bench.parse_iscsi_perf(PERF_OUT) == 45111
    with pytest.raises(BenchError):
        bench.parse_qemu_bench("qemu-img: Could not open 'iscsi://': failed")
    with pytest.raises(BenchError):
        bench.parse_iscsi_perf("connected\n")


def test_parse_proc() -> None:
    # comm may contain spaces and parentheses; utime/stime are fields 14/15.
    stat = "1234 (py (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 5 6 7"
    assert bench.parse_proc_stat(stat, 100) == pytest.approx(3.0)
    assert bench.parse_vmrss("Name:\tx\nVmRSS:\t   33792 kB\nThreads: 3\n") == 33792 * 1024
    with pytest.raises(BenchError):
        bench.parse_vmrss("Name:\tx\n")


def test_cases_and_commands() -> None:
    cases = bench.build_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 7 + 7 + 6
    assert "128k seq read QD16, hdgst" in names and "4k write QD1, O_DIRECT" in names
    assert not any(c.direct and c.tool == "perf" for c in cases)
    assert [c.name for c in bench.build_cases(digests=False, direct=False, rows="QD1$")] == [
        "4k read QD1", "4k write QD1"]
    ep = bench.Endpoint(TGT, 3294, "iqn.x:t", 1, 2, pid=1)
    w = Case("4k write QD32", "qemu", 4096, 32, write=True, digest=True, direct=True)
    cmd = bench.qemu_command(ep, w, 1000)
    assert cmd[:8] == ["qemu-img", "bench", "-c", "1000", "-d", "32", "-s", "4096"]
    assert "-w" in cmd and "lun=2" in cmd[-1] and "header-digest=crc32c" in cmd[-1]
    perf = bench.perf_command(ep, bench.BASE_CASES[-1], 3)
    assert perf[-1] == "iscsi://127.0.0.1:3294/iqn.x:t/1" and "-r" in perf
    sd = bench.Endpoint(STORAGED, 3293, "iqn.x:s", 0, None, pid=1)
    assert sd.lun_for(w) is None and sd.lun_for(bench.BASE_CASES[0]) == 0


def test_plan_count() -> None:
    case = bench.BASE_CASES[0]
    assert bench.plan_count(case, [10_000.0, 40_000.0], 3.0) == 60_000
    assert bench.plan_count(case, [1.0], 0.01) == 4 * case.depth
    with pytest.raises(BenchError):
        bench.plan_count(case, [0.0], 1.0)


def _row(case: Case, sd: list[float] | None, tgt: list[float] | None) -> RowResult:
    r = RowResult(case)
    for name, vals in ((STORAGED, sd), (TGT, tgt)):
        if vals is not None:
            r.samples[name] = [Sample(v, 10, 10 * case.size, 0.5, 1.0) for v in vals]
    return r


def test_report_table_and_min_ratio() -> None:
    read, seq = bench.BASE_CASES[0], bench.BASE_CASES[2]
    direct = Case(read.label, read.tool, read.size, read.depth, direct=True)
    results = [
        _row(read, [30.0, 10.0, 20.0], [10.0, 10.0, 40.0]),     # medians 20 / 10
        _row(seq, [1500.0, 900.0, 1000.0], [1000.0] * 3),       # 1000 / 1000
        _row(direct, None, [5.0, 6.0, 7.0]),                    # tgt only: n/a
    ]
    assert results[0].median(STORAGED) == 20.0
    assert bench.min_ratio(results) == pytest.approx(1.0)
    rss = {STORAGED: (32 << 20, 33 << 20), TGT: (4 << 20, 5 << 20)}
    resources = bench.resource_rows(results, rss, sessions=64)
    assert resources[0] == ["RSS, no sessions", "32.0 MiB", "4.0 MiB"]
    assert resources[2] == ["RSS per idle session", "16 KiB", "16 KiB"]
    # 1.5 CPU seconds over 3 x 10 x 128 KiB.
    cpu = 1.5 / (30 * seq.size / 1e9)
    assert resources[3] == [f"CPU s/GB, {seq.name}", f"{cpu:.2f}", f"{cpu:.2f}"]
    text = bench.format_results(results, resources, runs=3)
    lines = text.splitlines()
    assert lines[-1] == "min ratio storaged/tgt: 1.00"
    assert lines[0].split() == ["row", "(median", "of", "3)", "storaged", "tgt", "storaged/tgt"]
    row = next(ln for ln in lines if ln.startswith("4k read QD32 "))
    assert row.split()[-5:] == ["20", "IOPS", "10", "IOPS", "2.00"]
    assert next(ln for ln in lines if "O_DIRECT" in ln).split()[-4:] == ["-", "6", "IOPS", "n/a"]
    assert "1,000 MB/s" in text
    assert bench.format_results([results[2]]).splitlines()[-1] == "min ratio storaged/tgt: n/a"


def test_profile_summary() -> None:
    lines = [
        "process 1:\"python -m storaged serve\";run (uvloop/__init__.py:82);"
        "data_received (storaged/iscsi/server.py:60);receive_data "
        "(storaged/iscsi/connection.py:204) 30\n",
        "process 1:\"python -m storaged serve\";run (uvloop/__init__.py:82);"
        "data_received (storaged/iscsi/server.py:60);pump (storaged/iscsi/server.py:70) 10\n",
        # An idle thread-pool worker is left out.
        "process 1:\"x\";_bootstrap (threading.py:1);"
        "_worker (concurrent/futures/thread.py:81) 50\n",
        "garbage\n",
    ]
    total, self_top, incl_top = bench.summarize_collapsed(lines, top=3)
    assert total == 40
    assert self_top[0] == ("receive_data (storaged/iscsi/connection.py)", 30)
    assert incl_top[0][1] == 40
    out = bench.format_profile(total, self_top, incl_top)
    assert "75.0%" in out and "py-spy: 40 busy samples" in out


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err
