"""Test fence agent: ``python tests/cluster_fence.py RUNDIR NODE``.

Power-fences a worker process: SIGKILLs the pid in RUNDIR/pid-NODE, waits
until it is gone (or a zombie), then records the CLOCK_MONOTONIC time in
RUNDIR/fenced-NODE and exits 0 (fenced).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def main() -> int:
    rundir, node = sys.argv[1], sys.argv[2]
    with open(os.path.join(rundir, f"pid-{node}")) as f:
        pid = int(f.read())
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while not dead(pid):
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.005)
    with open(os.path.join(rundir, f"fenced-{node}"), "w") as f:
        f.write(str(time.monotonic_ns()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
