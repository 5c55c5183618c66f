"""QEMU's iSCSI driver (a real initiator): copy an image in and compare it back."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import DEMO_IQN, require_tool, running

pytestmark = pytest.mark.peer

SIZE = 256 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "random.img"
    with open(path, "wb") as f:
        for _ in range(SIZE // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return str(path)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    tool = require_tool("qemu-img", "qemu-utils (and qemu-block-extra for iscsi://)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("digest", ["none", "crc32c"])
def test_convert_and_compare(tmp_path, image, digest):
    with running(str(tmp_path / "demo"), log_level="INFO") as d:
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{d.port},target={DEMO_IQN},"
                f"lun=0,header-digest={digest}")
        src = f"driver=raw,file.filename={image}"
        r = qemu_img("convert", "-n", "--image-opts", src, "--target-image-opts", opts)
        assert r.returncode == 0, r.stderr
        r = qemu_img("compare", "--image-opts", src, opts)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "identical" in r.stdout
        # A changed byte must be noticed: the comparison can fail.
        with open(image, "r+b") as f:
            f.seek(12345)
            old = f.read(1)
            f.seek(12345)
            f.write(bytes([old[0] ^ 0xFF]))
        try:
            r = qemu_img("compare", "--image-opts", src, opts)
            assert r.returncode == 1, r.stdout + r.stderr
        finally:
            with open(image, "r+b") as f:
                f.seek(12345)
                f.write(old)
        log = d.output()
    # The daemon logs each login's negotiated digests.
    assert f"hd={digest == 'crc32c'}" in log
    assert "Traceback" not in log
