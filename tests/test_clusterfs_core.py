"""clusterfs core in memory: format golden bytes, POSIX semantics and errnos, crashes."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from storaged.clusterfs.format import INODE, JOURNAL_HEADER, RGRP, SUPERBLOCK, FormatError
from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.locks import LocalLocks, WouldBlock
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import MkfsError, check, mkfs

SB_GOLDEN = bytes.fromhex(
    "5344434c555346530100000000100000004000000000000002000000000200000100000000000000"
    "010400000000000008000000000800000304000000000000000102030405060708090a0b0c0d0e0f"
    "7368617265640000000000000000000000000000000000000000000000000000f2df2bf6")
SB_FIELDS = dict(version=1, block_size=4096, total_blocks=16384, journals=2,
                 journal_blocks=512, journal_start=1, rg_start=1025, rg_count=8, rg_data=2048,
                 root_ino=1027, uuid=bytes(range(16)), label=b"shared".ljust(32, b"\0"))


def test_superblock_golden_bytes_and_offsets():
    assert SUPERBLOCK.pack(SB_FIELDS) == SB_GOLDEN
    got = SUPERBLOCK.unpack(SB_GOLDEN)
    assert {k: got[k] for k in SB_FIELDS} == SB_FIELDS
    # the offsets of docs/clusterfs.md's table
    assert (SUPERBLOCK.offsets["root_ino"], SUPERBLOCK.offsets["uuid"],
            SUPERBLOCK.offsets["crc"], SUPERBLOCK.size) == (56, 64, 112, 116)
    bad = bytearray(SB_GOLDEN)
    bad[20] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        SUPERBLOCK.unpack(bytes(bad))
    with pytest.raises(FormatError, match="magic"):
        SUPERBLOCK.unpack(b"X" + SB_GOLDEN[1:])


def test_other_structures_golden_bytes():
    assert RGRP.pack(dict(index=3, data_start=7177, data_blocks=2048, free=2000)).hex() == \
        "5344524703000000091c00000000000000080000d007000057f3b391"
    assert JOURNAL_HEADER.pack(dict(slot=1, seq=9, flags=1)).hex() == \
        "53444a480100000009000000000000000100000030749436"
    ino = INODE.pack(dict(mode=0o100644, uid=1000, gid=100, nlink=1, size=5, blocks=1,
                          atime_ns=1, mtime_ns=2, ctime_ns=3, generation=4))
    assert ino[:32].hex() == ("5344494ea4810000e8030000640000000100000000000000"
                              "0500000000000000")
    assert ino[-4:].hex() == "943feab2" and len(ino) == 128
    assert INODE.offsets["xattr_block"] == 72 and INODE.offsets["parent"] == 80


def new_fs(size: int = 32 << 20, bs: int = 4096, journals: int = 2, rg_data: int = 1024,
           dev: MemoryBlockDevice | None = None) -> ClusterFS:
    dev = dev or MemoryBlockDevice(size)
    mkfs(dev, journals, block_size=bs, rg_data=rg_data, journal_blocks=64)
    return ClusterFS(dev, LocalLocks()).mount()


def err(code: int, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, f"{fn.__name__}{args}: {e.value}"


def test_posix_errors():
    fs = new_fs()
    fs.mkdir("/d", 0o755)
    fs.create("/d/f", 0o644)
    err(errno.EEXIST, fs.create, "/d/f", 0o644)
    err(errno.EEXIST, fs.mkdir, "/d", 0o755)
    err(errno.ENOENT, fs.getattr, "/nope")
    err(errno.ENOENT, fs.create, "/nope/f", 0o644)
    err(errno.ENOTDIR, fs.create, "/d/f/x", 0o644)
    err(errno.ENOTDIR, fs.readdir, "/d/f")
    err(errno.ENOTDIR, fs.rmdir, "/d/f")
    err(errno.EISDIR, fs.unlink, "/d")
    err(errno.EISDIR, fs.read, "/d", 10, 0)
    err(errno.ENOTEMPTY, fs.rmdir, "/d")
    err(errno.ENAMETOOLONG, fs.create, "/" + "a" * 256, 0o644)
    fs.create("/" + "a" * 255, 0o644)
    err(errno.EINVAL, fs.rename, "/d", "/d/sub")
    err(errno.EPERM, fs.link, "/d", "/d2")
    err(errno.EEXIST, fs.link, "/d/f", "/d/f")
    err(errno.EINVAL, fs.readlink, "/d/f")
    err(errno.ENODATA, fs.getxattr, "/d/f", "user.x")
    fs.setxattr("/d/f", "user.x", b"1", 1)
    err(errno.EEXIST, fs.setxattr, "/d/f", "user.x", b"2", 1)
    err(errno.ENODATA, fs.setxattr, "/d/f", "user.y", b"2", 2)
    err(errno.ENODATA, fs.removexattr, "/d/f", "user.y")
    fs.mkdir("/e", 0o755)
    fs.create("/e/g", 0o644)
    err(errno.EISDIR, fs.rename, "/d/f", "/e")
    err(errno.ENOTDIR, fs.rename, "/e", "/d/f")
    fs.mkdir("/x", 0o755)
    err(errno.ENOTEMPTY, fs.rename, "/x", "/e")


def test_files_links_symlinks_rename_and_attributes():
    fs = new_fs()
    fs.mkdir("/a", 0o755)
    fs.mkdir("/b", 0o700)
    fs.create("/a/f", 0o600, uid=5, gid=6)
    fs.write("/a/f", b"one", 0)
    fs.link("/a/f", "/b/hard")
    assert fs.getattr("/a/f")["st_nlink"] == 2
    assert fs.read("/b/hard", 100, 0) == b"one"
    fs.unlink("/a/f")
    assert fs.getattr("/b/hard")["st_nlink"] == 1 and fs.read("/b/hard", 9, 0) == b"one"
    fs.symlink("/a/ln", "../b/hard")
    assert fs.readlink("/a/ln") == "../b/hard"
    assert stat.S_ISLNK(fs.getattr("/a/ln")["st_mode"])
    # rename a directory across directories: link counts and '..' follow
    fs.mkdir("/a/sub", 0o755)
    assert fs.getattr("/a")["st_nlink"] == 3
    fs.rename("/a/sub", "/b/sub")
    assert fs.getattr("/a")["st_nlink"] == 2 and fs.getattr("/b")["st_nlink"] == 3
    sub = dict((n, i) for n, i, _ in fs.readdir("/b/sub"))
    assert sub[".."] == fs.getattr("/b")["st_ino"]
    # rename over an existing file replaces it atomically
    fs.create("/b/t", 0o644)
    fs.write("/b/t", b"old", 0)
    fs.rename("/b/hard", "/b/t")
    assert fs.read("/b/t", 9, 0) == b"one"
    assert sorted(n for n, _, _ in fs.readdir("/b")) == [".", "..", "sub", "t"]
    fs.chmod("/b/t", 0o640)
    fs.chown("/b/t", 1000, -1)
    fs.utimens("/b/t", 1_000_000_000, 2_000_000_000)
    st = fs.getattr("/b/t")
    assert stat.S_IMODE(st["st_mode"]) == 0o640 and stat.S_ISREG(st["st_mode"])
    assert (st["st_uid"], st["st_gid"]) == (1000, 6)
    assert (st["st_atime_ns"], st["st_mtime_ns"]) == (1_000_000_000, 2_000_000_000)
    fs.setxattr("/b/t", "user.k", b"v" * 100)
    fs.setxattr("/b/t", "user.j", b"")
    assert sorted(fs.listxattr("/b/t")) == ["user.j", "user.k"]
    fs.removexattr("/b/t", "user.k")
    assert fs.listxattr("/b/t") == ["user.j"]
    fs.umount()
    assert check(fs.dev).problems == []


def test_sparse_files_truncate_and_block_tree():
    # 512-byte blocks: 46 direct pointers, 64 per block, so the double-indirect
    # tree starts at 55 KiB and is cheap to cover.
    fs = new_fs(size=8 << 20, bs=512, rg_data=4096)
    fs.create("/keep", 0o644)  # the root directory's first bucket stays allocated
    free0 = fs.statfs()["f_bfree"]
    fs.create("/s", 0o644)
    fs.write("/s", b"end", 1 << 20)
    st = fs.getattr("/s")
    assert st["st_size"] == (1 << 20) + 3 and st["st_blocks"] <= 8  # data + 3 map blocks
    assert fs.read("/s", 10, 1000) == bytes(10)
    assert fs.read("/s", 10, (1 << 20) - 2) == b"\0\0end"
    data = random.Random(1).randbytes(200_000)
    fs.create("/big", 0o644)
    fs.write("/big", data, 0)
    assert fs.read("/big", 300_000, 0) == data
    fs.truncate("/big", 30_001)  # into the direct range: frees both trees
    assert fs.read("/big", 10**6, 0) == data[:30_001]
    fs.truncate("/big", 40_000)  # grow: the new tail reads as zeros
    assert fs.read("/big", 10**6, 0) == data[:30_001] + bytes(9_999)
    fs.unlink("/big")
    fs.unlink("/s")
    assert fs.statfs()["f_bfree"] == free0
    fs.umount()
    assert check(fs.dev).problems == []


def test_hashed_directory_stays_one_bucket_per_lookup():
    fs = new_fs(size=64 << 20, rg_data=8192)
    fs.mkdir("/big", 0o755)
    n = 4000
    for i in range(n):
        fs.create(f"/big/file-{i:06d}", 0o644)
    names = {e[0] for e in fs.readdir("/big")}
    assert len(names) == n + 2 and "file-003999" in names
    depth = fs.run(lambda t: fs.walk(t, ["big"]).f["dir_depth"])
    assert depth >= 5
    dev = fs.dev
    reads = []
    orig = dev.read
    dev.read = lambda off, ln: reads.append(off) or orig(off, ln)
    fs.getattr("/big/file-001234")
    dev.read = orig
    assert len(reads) == 5  # root inode + bucket, /big inode + one bucket, the file: no scan
    for i in range(0, n, 2):
        fs.unlink(f"/big/file-{i:06d}")
    assert len(fs.readdir("/big")) == n // 2 + 2
    err(errno.ENOENT, fs.getattr, "/big/file-000000")
    fs.umount()
    assert check(dev).problems == []


def test_mkfs_refuses_a_formatted_device_and_check_repairs():
    dev = MemoryBlockDevice(16 << 20)
    mkfs(dev, 1, rg_data=1024, journal_blocks=64)
    with pytest.raises(MkfsError, match="already holds a clusterfs filesystem"):
        mkfs(dev, 1)
    ext4 = MemoryBlockDevice(16 << 20)
    ext4.write(1080, b"\x53\xef")
    with pytest.raises(MkfsError, match="ext2/3/4"):
        mkfs(ext4, 1)
    with pytest.raises(MkfsError, match="need at least"):
        mkfs(MemoryBlockDevice(1 << 20), 4, force=True)
    fs = ClusterFS(dev, LocalLocks()).mount()
    fs.create("/f", 0o644)
    fs.write("/f", b"x" * 10000, 0)
    fs.umount()
    assert check(dev).problems == []
    # corrupt: clear the bitmap bit of a used block, and break a link count
    g = fs.geo
    bm = g.rg_block(0) + 1
    raw = bytearray(dev.read(bm * 4096, 4096))
    raw[0] &= ~2 & 0xFF
    dev.write(bm * 4096, bytes(raw))
    rep = check(dev)
    assert any("bitmap differs" in p for p in rep.problems)
    rep = check(dev, repair=True)
    assert rep.repaired
    assert check(dev).problems == []
    # a corrupt inode gives EIO, not a crash
    ino = ClusterFS(dev, LocalLocks()).mount()
    f_ino = ino.getattr("/f")["st_ino"]
    raw = bytearray(dev.read(f_ino * 4096, 4096))
    raw[30] ^= 0xFF
    dev.write(f_ino * 4096, bytes(raw))
    err(errno.EIO, ino.getattr, "/f")
    err(errno.EIO, ino.read, "/f", 1, 0)


def test_journal_slots_are_claimed_and_released():
    dev = MemoryBlockDevice(16 << 20)
    mkfs(dev, 2, rg_data=1024, journal_blocks=64)
    locks = LocalLocks()
    a = ClusterFS(dev, locks).mount()
    b = ClusterFS(dev, locks).mount()
    assert (a.slot, b.slot) == (0, 1)
    err(errno.EBUSY, ClusterFS(dev, locks).mount)
    b.umount()
    c = ClusterFS(dev, locks).mount()
    assert c.slot == 1
    with pytest.raises(WouldBlock):
        locks.lock(a.jname(0), "EX", noqueue=True)


def workload(fs: ClusterFS, rng: random.Random, files: dict, inflight: set) -> None:
    """Metadata and data operations.  ``files`` holds what returned (so is durable);
    ``inflight`` the names the operation under way touches (either outcome is right)."""
    fs.mkdir("/w", 0o755)
    for i in range(60):
        name = f"/w/f{i}"
        body = rng.randbytes(rng.randint(1, 20000))
        inflight.update({name})
        fs.create(name, 0o644)
        fs.write(name, body, 0)
        files[name] = body
        if i % 7 == 3:
            inflight.update({name, name + "r"})
            fs.rename(name, name + "r")
            files[name + "r"] = files.pop(name)
        if i % 5 == 4 and files:
            victim = rng.choice(sorted(files))
            inflight.update({victim})
            fs.unlink(victim)
            del files[victim]
        inflight.clear()


@pytest.mark.parametrize("seed", range(12))
def test_crash_at_random_point_then_replay_is_consistent(seed):
    rng = random.Random(seed)
    dev = MemoryBlockDevice(32 << 20)
    mkfs(dev, 2, rg_data=1024, journal_blocks=64)
    fs = ClusterFS(dev, LocalLocks()).mount()
    dev.fail_after = rng.randint(5, 1200)
    files: dict = {}
    inflight: set = set()
    with pytest.raises(OSError) as e:
        workload(fs, rng, files, inflight)
    assert e.value.errno == errno.EIO and fs.withdrawn  # the node withdrew
    dev.fail_after = None
    err(errno.EIO, fs.create, "/after", 0o644)  # and stays withdrawn
    image = dev.crash_image(rng)  # only what was flushed, plus a torn tail
    fs2 = ClusterFS(image, LocalLocks()).mount()  # claims slot 0 again: replays it
    for name, body in files.items():
        if name not in inflight:
            assert fs2.read(name, 1 << 20, 0) == body
    listed = {"/w/" + n for n, _, _ in fs2.readdir("/w")} - {"/w/.", "/w/.."}
    assert set(files) - inflight <= listed <= set(files) | inflight
    fs2.umount()
    rep = check(image)
    assert rep.problems == [], rep.problems


@pytest.mark.parametrize("seed", range(int(os.environ.get("CLUSTERFS_FUZZ", "30"))))
def test_fuzzed_metadata_gives_errnos_or_check_problems_never_a_crash(seed):
    rng = random.Random(seed)
    dev = MemoryBlockDevice(8 << 20)
    mkfs(dev, 1, block_size=512, rg_data=4096, journal_blocks=64)
    fs = ClusterFS(dev, LocalLocks()).mount()
    fs.mkdir("/d", 0o755)
    for i in range(40):
        fs.create(f"/d/f{i}", 0o644)
        fs.write(f"/d/f{i}", bytes([i]) * rng.randint(0, 3000), 0)
    fs.symlink("/d/l", "f1")
    fs.setxattr("/d/f2", "user.a", b"x")
    fs.umount()
    rep = check(dev)
    assert rep.problems == []
    # metadata blocks: superblock, journal, group headers and bitmaps, inodes, buckets
    g = fs.geo
    meta = [0, g.journal_block(0), g.journal_block(0) + 1, g.rg_block(0), g.rg_block(0) + 1]
    meta += [g.root_ino] + [ino for _, ino, _ in fs.readdir("/d")]
    meta += [b for b in range(g.rg_block(0) + 2, g.rg_block(0) + 200)]
    for _ in range(rng.randint(1, 6)):
        blk = rng.choice(meta)
        raw = bytearray(dev.read(blk * 512, 512))
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(512)] = rng.randrange(256)
        dev.write(blk * 512, bytes(raw))
    try:
        fs2 = ClusterFS(dev, LocalLocks()).mount()
    except (OSError, FormatError):
        fs2 = None
    if fs2 is not None:
        for op in (lambda: fs2.readdir("/d"), lambda: fs2.getattr("/d/f3"),
                   lambda: fs2.read("/d/f5", 4096, 0), lambda: fs2.readlink("/d/l"),
                   lambda: fs2.create("/d/new", 0o644), lambda: fs2.unlink("/d/f7"),
                   lambda: fs2.write("/d/f9", b"z" * 700, 100),
                   lambda: fs2.rename("/d/f10", "/moved"), lambda: fs2.statfs(),
                   lambda: fs2.listxattr("/d/f2"), lambda: fs2.truncate("/d/f11", 1)):
            try:
                op()
            except OSError:
                pass  # EIO, ENOENT...: fine; anything else fails the test
    rep = check(dev)
    check(dev, repair=True)  # repair must not crash either
    assert isinstance(rep.problems, list)
