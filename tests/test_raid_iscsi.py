"""End to end: a RAID-6 LUN served over iSCSI survives losing two members, twice.

qemu-img (QEMU's iSCSI initiator) writes a random image into a RAID-6 LUN;
two members are failed through the live daemon and ``qemu-img compare``
must still match; the spares are rebuilt, two other members are failed, and
the image still matches.  Finally the daemon is restarted (arrays are
assembled from the state store) and the image matches again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from storaged.raid.manage import size_for_capacity
from tests.support import free_port, require_tool, running, storaged

pytestmark = pytest.mark.peer

SIZE = 256 << 20
IQN = "iqn.2026-11.org.storaged:raid6"


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    tool = require_tool("qemu-img", "qemu-utils (and qemu-block-extra for iscsi://)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=600)


def status(directory: str) -> dict:
    return json.loads(storaged("raid", "status", "vol", "--json", directory=directory).stdout)[0]


def wait_rebuilt(directory: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(directory)
        if st["sync"] is None and "recovering" not in st["state"]:
            return st
        time.sleep(0.5)
    raise AssertionError(f"rebuild did not finish: {status(directory)}")


@pytest.mark.slow
def test_raid6_lun_survives_two_failures_twice(tmp_path):
    require_tool("mdadm", "mdadm")
    image = tmp_path / "random.img"
    with open(image, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    state = str(tmp_path / "state")
    os.makedirs(state)
    members = [str(tmp_path / f"disk{i}") for i in range(8)]
    per = size_for_capacity(SIZE, 6, 6, chunk=64 * 1024)
    storaged("raid", "create", "--level", "6", "--chunk", "64K", "--spares", "2",
             "--size", str(per), "--name", "vol", *members, directory=state)
    storaged("raid", "backstore", "lun0", "vol", directory=state)
    port = free_port()
    storaged("target", "create", IQN, "--portal", f"127.0.0.1:{port}", directory=state)
    storaged("lun", "add", IQN, "lun0", "--lun", "0", directory=state)
    storaged("target", "open", IQN, directory=state)

    opts = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={IQN},lun=0"
    src = f"driver=raw,file.filename={image}"

    def compare() -> None:
        r = qemu_img("compare", "--image-opts", src, opts)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "identical" in r.stdout

    with running(state, port=port, demo=False, log_level="INFO") as d:
        r = qemu_img("convert", "-n", "--image-opts", src, "--target-image-opts", opts)
        assert r.returncode == 0, r.stderr
        compare()
        # Two members fail: the spares start rebuilding, slowly while we read.
        storaged("raid", "speed", "vol", "--min", "1000", "--max", "1000", directory=state)
        storaged("raid", "fail", "vol", members[0], directory=state)
        storaged("raid", "fail", "vol", members[1], directory=state)
        st = status(state)
        assert st["degraded"] == 2 and "recovering" in st["state"]
        compare()
        storaged("raid", "speed", "vol", "--min", "10000000", "--max", "10000000",
                 directory=state)
        st = wait_rebuilt(state)
        assert st["slots"] == "UUUUUU"
        storaged("raid", "fail", "vol", members[2], directory=state)
        storaged("raid", "fail", "vol", members[3], directory=state)
        st = status(state)
        assert st["slots"].count("_") == 2
        compare()
        out = storaged("raid", "check", "vol", "--no-wait", directory=state, check=False)
        assert out.returncode == 1 and "degraded" in out.stderr
        log = d.output()
    assert "Traceback" not in log
    # Restart: the array is assembled from the store, still degraded, same data.
    with running(state, port=port, demo=False):
        assert status(state)["slots"].count("_") == 2
        compare()
    for m in members[4:]:
        out = subprocess.run(["mdadm", "--examine", m], capture_output=True, text=True)
        assert "- correct" in out.stdout and "raid6" in out.stdout
