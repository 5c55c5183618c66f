"""Hot replace (md's want_replacement): copy a live member onto a new one, then swap.

Redundancy never drops while the copy runs: the old member keeps serving,
the replacement receives every write, and another member may fail in the
meantime.  The swapped-in member must then carry the slot on its own
(checked by failing another member and reading everything back), and
mdadm --examine must show it in the old member's role.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from storaged.raid import RaidError, assemble, create
from storaged.raid.manage import open_member
from storaged.raid.members import FAULTY, IN_SYNC, RECOVERING, REPLACING
from tests.support import require_tool

FAST = 10**9
SHAPES = [(1, 2), (5, 4), (6, 5), (10, 4)]


def _setup(tmp_path, level: int, n: int):  # noqa: ANN001, ANN202
    paths = [str(tmp_path / f"d{i}") for i in range(n)]
    arr = create("rp", paths, level, chunk=16 * 1024, size=3 << 20, start_worker=False)
    arr.speed_limit_min = arr.speed_limit_max = FAST
    data = bytearray(os.urandom(arr.size))
    arr.write(0, bytes(data))
    return arr, paths, data


def _state(arr, path: str) -> str:  # noqa: ANN001
    return [m for m in arr.members if m.path == path][0].state


@pytest.mark.peer
@pytest.mark.parametrize("level,n", SHAPES)
def test_hot_replace_keeps_redundancy(tmp_path, level: int, n: int) -> None:
    arr, paths, data = _setup(tmp_path, level, n)
    new = str(tmp_path / "new")
    arr.replace(paths[1], open_member(new, create_size=3 << 20), new)
    assert _state(arr, new) == REPLACING and _state(arr, paths[1]) == IN_SYNC
    assert arr.degraded() == 0 and "replacing" in [m["state"] for m in arr.status()["members"]]
    blob = os.urandom(20000)                  # written to old and replacement alike
    arr.write(7000, blob)
    data[7000:7000 + len(blob)] = blob
    arr.run_pending()
    assert _state(arr, new) == IN_SYNC and _state(arr, paths[1]) == FAULTY
    assert [m.slot for m in arr.members if m.path == new] == [1]
    arr.remove(paths[1])
    # The new member now carries slot 1 alone: lose a partner and read everything.
    arr.fail(paths[0])
    arr.run_pending()
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()
    out = subprocess.run([require_tool("mdadm", "mdadm"), "--examine", new],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Device Role : Active device 1" in out.stdout


def test_old_member_failing_mid_replace_turns_into_recovery(tmp_path) -> None:
    arr, paths, data = _setup(tmp_path, 5, 4)
    new = str(tmp_path / "new")
    arr.replace(paths[2], open_member(new, create_size=3 << 20), new)
    arr.fail(paths[2])
    assert _state(arr, new) == RECOVERING and arr.degraded() == 1
    arr.run_pending()
    assert _state(arr, new) == IN_SYNC and arr.degraded() == 0
    arr.fail(paths[0])
    arr.run_pending()
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()


def test_another_member_failing_mid_replace_is_survived(tmp_path) -> None:
    arr, paths, data = _setup(tmp_path, 5, 4)
    new = str(tmp_path / "new")
    arr.replace(paths[1], open_member(new, create_size=3 << 20), new)
    arr.fail(paths[3])                          # old member 1 still serves
    assert not arr.failed and arr.read(0, arr.size) == bytes(data)
    arr.run_pending()
    assert _state(arr, new) == IN_SYNC
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()


def test_replace_resumes_after_crash(tmp_path) -> None:
    arr, paths, data = _setup(tmp_path, 6, 5)
    new = str(tmp_path / "new")
    arr.replace(paths[4], open_member(new, create_size=3 << 20), new)
    arr.abandon()
    arr = assemble(paths + [new], start_worker=False)
    arr.speed_limit_min = arr.speed_limit_max = FAST
    assert _state(arr, new) == REPLACING and _state(arr, paths[4]) == IN_SYNC
    arr.run_pending()
    assert _state(arr, new) == IN_SYNC
    arr.fail(paths[0])
    arr.fail(paths[1])
    arr.run_pending()
    assert arr.read(0, arr.size) == bytes(data)
    arr.close()


def test_replace_refusals(tmp_path) -> None:
    arr, paths, _ = _setup(tmp_path, 5, 3)
    arr.fail(paths[0])
    with pytest.raises(RaidError, match="not an in-sync member"):
        arr.replace(paths[0], open_member(str(tmp_path / "x"), create_size=3 << 20),
                    str(tmp_path / "x"))
    arr.close()
