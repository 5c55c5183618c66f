"""The clusterfs benchmark: its report, and one tiny run of all three sides."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from storaged.bench import BENCHMARKS
from storaged.bench.clusterfs import ROWS, report
from tests.support import require_tool
from tests.test_clusterfs_fuse import need_fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_and_report_ratios():
    assert BENCHMARKS["clusterfs"][0] == "storaged.bench.clusterfs"
    n = len(ROWS)
    lines = report({"local": [50.0] * n, "cluster": [25.0] * n, "bindfs": [100.0] * n})
    assert lines[-1] == "min ratio storaged/bindfs: 0.25"
    assert lines[1].split()[-2:] == ["0.50", "0.25"]


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_run_prints_every_row_and_the_ratio_line():
    need_fuse()
    require_tool("bindfs", "bindfs")
    r = subprocess.run([sys.executable, "-m", "storaged.bench", "clusterfs", "--runs", "1",
                        "--files", "20", "--mib", "1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"min ratio storaged/bindfs: \d+\.\d\d", lines[-1]), r.stdout
    for row in ROWS:
        assert any(line.startswith(row) for line in lines), r.stdout
    with open("/proc/self/mounts") as f:
        assert "storaged-bench-clusterfs-" not in f.read()  # every mount of the run is gone
