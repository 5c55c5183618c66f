"""The NFS benchmark's parsing and report (the run itself: python -m storaged.bench nfs)."""

from __future__ import annotations

from storaged.bench import BENCHMARKS
from storaged.bench.nfs import Row, Server, _report, parse_qemu_bench


def test_registered():
    assert BENCHMARKS["nfs"][0] == "storaged.bench.nfs"


def test_parse_qemu_bench():
    out = ("Sending 1000 requests, 4096 bytes each, 32 in parallel\n"
           "Run completed in 0.250 seconds.\n")
    assert parse_qemu_bench(out) == 0.25


def test_report_ratios(capsys):
    st = Server("storaged", "/e", "/tmp/a", 1, 1)
    ga = Server("ganesha", "/g", "/tmp/b", 2, 3)
    rows = [Row("iops", "IOPS", lambda s: 0.0), Row("ls", "s", lambda s: 0.0, False)]
    st.results = {"iops": [100, 300, 200], "ls": [0.02, 0.03, 0.05]}
    ga.results = {"iops": [100, 100, 100], "ls": [0.01, 0.01, 0.01]}
    _report(rows, st, ga, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "min ratio storaged/ganesha: 0.33"
    assert "2.00" in lines[2]


def test_report_cpu_table_keeps_last_line(capsys):
    st = Server("storaged", "/e", "/tmp/a", 1, 1)
    ga = Server("ganesha", "/g", "/tmp/b", 2, 3)
    rows = [Row("ls", "s", lambda s: 0.0, False)]
    st.results, ga.results = {"ls": [0.04]}, {"ls": [0.03]}
    st.cpu, ga.cpu = {"ls": [0.02, 0.01, 0.03]}, {"ls": [0.05, 0.04, 0.06]}
    _report(rows, st, ga, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "min ratio storaged/ganesha: 0.75"
    assert lines[-2].split()[-3:] == ["20", "50", "2.50"]


def test_report_with_unfs3_has_its_column_and_line_before_ganeshas(capsys):
    st = Server("storaged", "/e", "/tmp/a", 1, 1)
    ga = Server("ganesha", "/g", "/tmp/b", 2, 3)
    un = Server("unfs3", "/u", "/tmp/c", 4, 5)
    rows = [Row("iops", "IOPS", lambda s: 0.0)]
    st.results, ga.results, un.results = {"iops": [90]}, {"iops": [30]}, {"iops": [100]}
    _report(rows, st, ga, 1, un)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["test", "unit", "storaged", "ganesha", "ratio", "unfs3",
                                "ratio"]
    assert lines[2].split()[-4:] == ["30", "3.00", "100", "0.90"]
    assert lines[-2:] == ["min ratio storaged/unfs3: 0.90", "min ratio storaged/ganesha: 3.00"]
