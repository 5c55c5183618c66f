"""``storaged fs grow`` and ``fs add-journal`` through the CLI, online on a FUSE mount."""

from __future__ import annotations

import json
import os

import pytest

from tests import test_clusterfs_fuse as fuse_tests
from tests.test_clusterfs_fuse import mount_pids, need_fuse, storaged, teardown_mount

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(120)]
two_nodes = fuse_tests.two_nodes  # the two-cluster-node mounts of the FUSE tests


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, STORAGED_FS_RUNDIR=str(tmp_path / "run"))
    os.makedirs(e["STORAGED_FS_RUNDIR"])
    yield e


def test_grow_online_on_a_mount_then_files_in_the_new_space_check_clean(tmp_path, env):
    need_fuse()
    img, mnt = str(tmp_path / "img"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    storaged("fs", "mkfs", img, "--journals", "1", "--journal-blocks", "64", env=env)
    r = storaged("fs", "grow", img, env=env, check=False)
    assert r.returncode == 1 and "nothing to grow" in r.stderr  # offline, did not grow
    pids: list[int] = []
    try:
        storaged("fs", "mount", img, mnt, "-o", "local", env=env)
        pids = mount_pids(env)
        before = os.statvfs(mnt)
        with open(img, "r+b") as f:
            f.truncate(40 << 20)  # the LUN grew
        r = storaged("fs", "grow", img, "--json", env=env)
        out = json.loads(r.stdout)
        assert out["online"] == os.path.realpath(mnt) and out["new_blocks"] == 10240
        after = os.statvfs(mnt)
        assert after.f_blocks == 10240 and after.f_bfree - before.f_bfree == out["added_free"]
        payload = os.urandom(24 << 20)  # more than the filesystem held before
        with open(os.path.join(mnt, "big"), "wb") as f:
            f.write(payload)
        r = storaged("fs", "grow", img, env=env, check=False)
        assert r.returncode == 1 and "nothing to grow" in r.stderr
        storaged("fs", "umount", mnt, env=env)
    finally:
        teardown_mount(mnt, env, pids)
    r = storaged("fs", "check", img, env=env)
    assert "0 problem(s)" in r.stdout
    try:
        storaged("fs", "mount", img, mnt, "-o", "local", env=env)
        pids = mount_pids(env)
        with open(os.path.join(mnt, "big"), "rb") as f:
            assert f.read() == payload
        storaged("fs", "umount", mnt, env=env)
    finally:
        teardown_mount(mnt, env, pids)


def test_add_journal_offline_and_online_and_refusal(tmp_path, env):
    need_fuse()
    img, mnt = str(tmp_path / "img"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(6 << 20)
    storaged("fs", "mkfs", img, "--journals", "1", "--journal-blocks", "128", env=env)
    r = storaged("fs", "add-journal", img, env=env)
    assert "added journal(s) 1 offline; 2 journals in all" in r.stdout
    pids: list[int] = []
    try:
        storaged("fs", "mount", img, mnt, "-o", "local", env=env)
        pids = mount_pids(env)
        r = storaged("fs", "add-journal", img, "--count", "2", env=env)
        assert "added journal(s) 2, 3 online" in r.stdout
        r = storaged("fs", "add-journal", img, "--count", "20", env=env, check=False)
        assert r.returncode == 1 and "no space for 20 journal(s)" in r.stderr
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"still writable")
        storaged("fs", "umount", mnt, env=env)
    finally:
        teardown_mount(mnt, env, pids)
    r = storaged("fs", "check", img, "--json", env=env)
    rep = json.loads(r.stdout)
    assert rep["problems"] == [] and rep["used_blocks"] >= 3 * 128


def test_grow_on_one_cluster_node_the_other_sees_the_space(two_nodes, env):
    img, (m1, m2) = two_nodes
    before = os.statvfs(m2)
    with open(img, "r+b") as f:
        f.truncate(256 << 20)
    r = storaged("fs", "grow", img, "--json", env=env)
    out = json.loads(r.stdout)
    assert out["new_groups"] > out["old_groups"] and out["online"]
    after = os.statvfs(m2)
    assert after.f_blocks == 65536 and after.f_bfree - before.f_bfree == out["added_free"]
    payload = os.urandom(1 << 20)
    with open(os.path.join(m2, "late"), "wb") as f:
        f.write(payload)
    with open(os.path.join(m1, "late"), "rb") as f:
        assert f.read() == payload
