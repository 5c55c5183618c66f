"""mdadm --examine (Debian's mdadm) reads the superblocks storaged writes.

For every level: create an array of sparse members plus a spare, then check
what mdadm reports for every member: level, raid devices, chunk, layout,
array UUID, name, device role, state, events and "Checksum : ... - correct".
A failed member must show up as missing in the survivors' Array State.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from storaged.raid import assemble, create
from storaged.raid.superblock import Superblock, calc_sb_1_csum, mdadm_uuid
from tests.support import require_tool

LEVELS = [(0, 3, None), (1, 2, None), (4, 4, None), (5, 4, "left-symmetric"),
          (5, 3, "right-asymmetric"), (6, 5, "left-symmetric"), (6, 4, "parity-last"),
          (10, 4, None)]
LAYOUT_TEXT = {None: None, "left-symmetric": "left-symmetric",
               "right-asymmetric": "right-asymmetric", "parity-last": "parity-last"}


def mdadm() -> str:
    return require_tool("mdadm", "mdadm")


def examine(path: str) -> dict[str, str]:
    out = subprocess.run([mdadm(), "--examine", path], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    fields: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:\s*(.*)$", line)
        if m:
            fields.setdefault(m.group(1), m.group(2).strip())
    return fields


@pytest.mark.peer
@pytest.mark.parametrize("level,n,layout", LEVELS)
def test_mdadm_examine_every_member(tmp_path, level, n, layout):
    spares = 0 if level == 0 else 1
    paths = [str(tmp_path / f"d{i}") for i in range(n + spares)]
    arr = create(f"vol{level}", paths, level, chunk=64 * 1024, layout=layout, spares=spares,
                 size=6 << 20)
    uuid = arr.uuid
    arr.close()
    for i, p in enumerate(paths):
        f = examine(p)
        assert f["Magic"] == "a92b4efc"
        assert f["Version"] == "1.2"
        assert f["Raid Level"] == f"raid{level}"
        assert f["Raid Devices"] == str(n)
        assert f["Array UUID"] == uuid
        assert f["Name"].split()[0].endswith(f"vol{level}")
        assert f["Data Offset"] == "2048 sectors"
        assert f["Super Offset"] == "8 sectors"
        assert f["State"] == "clean"
        assert re.fullmatch(r"[0-9a-f]{1,8} - correct", f["Checksum"]), f["Checksum"]
        if level == 1:
            assert "Chunk Size" not in f
        else:
            assert f["Chunk Size"] == "64K"
        if LAYOUT_TEXT[layout]:
            assert f["Layout"] == LAYOUT_TEXT[layout]
        if level == 10:
            assert f["Layout"] == "near=2"
        if i < n:
            assert f["Device Role"] == f"Active device {i}"
        else:
            assert f["Device Role"] == "spare"
        assert f["Array State"].split()[0] == "A" * n


@pytest.mark.peer
def test_mdadm_sees_failed_member(tmp_path):
    paths = [str(tmp_path / f"d{i}") for i in range(4)]
    arr = create("deg", paths, 5, chunk=64 * 1024, size=6 << 20, start_worker=False)
    arr.write(0, b"x" * 4096)
    before = arr.events
    arr.fail(paths[2])
    assert arr.events > before
    arr.close()
    f = examine(paths[0])
    assert f["Array State"].split()[0] == "AA.A"
    assert int(f["Events"]) == arr.events
    assert f["Checksum"].endswith("- correct")
    arr2 = assemble(paths, start_worker=False)
    assert arr2.status()["slots"] == "UU_U"
    assert arr2.read(0, 4096) == b"x" * 4096
    arr2.close()


def test_checksum_is_mds(tmp_path):
    """calc_sb_1_csum: 32-bit LE word sum (sb_csum as 0) folded once; odd max_dev adds a u16."""
    sb = Superblock(set_uuid=bytes(range(16)), set_name="x", level=5, layout=2, size=2048,
                    chunksize=128, raid_disks=3, dev_roles=[0, 1, 2], max_dev=3)
    raw = sb.encode()
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 256 + 4, 4)]
    words[216 // 4] = 0
    total = sum(words[:64]) + int.from_bytes(raw[256:260], "little") \
        + int.from_bytes(raw[260:262], "little")
    assert calc_sb_1_csum(raw, 3) == ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF
    back = Superblock.decode(raw)
    assert back.dev_roles == [0, 1, 2] and back.level == 5 and back.chunksize == 128
    assert mdadm_uuid(bytes(range(16))) == "00010203:04050607:08090a0b:0c0d0e0f"
