"""storaged's initiator against real targets: storaged's own daemon and tgt.

Data written through our initiator is checked by an independent initiator
(QEMU's libiscsi driver, ``qemu-img compare``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from storaged.block.base import BlockDeviceError
from storaged.initiator.device import FencedError, RemoteBlockDevice, fence_scsi_key
from tests.support import DEMO_IQN, Daemon, free_port, require_tool, running, storaged

pytestmark = [pytest.mark.peer, pytest.mark.slow]

SIZE = 32 << 20
SECRET = "initiator-secret-1"
MUTUAL = "target-secret-22"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "random.img"
    path.write_bytes(os.urandom(SIZE))
    return str(path)


def qemu_compare(image: str, port: int, iqn: str, lun: int, digest: str = "none",
                 same: bool = True) -> None:
    tool = require_tool("qemu-img", "qemu-utils (and qemu-block-extra for iscsi://)")
    # raw,size= limits the comparison to the image's length of the bigger LUN.
    opts = (f"driver=raw,size={SIZE},file.driver=iscsi,file.transport=tcp,"
            f"file.portal=127.0.0.1:{port},file.target={iqn},file.lun={lun},"
            f"file.header-digest={digest}")
    r = subprocess.run([tool, "compare", "--image-opts", f"driver=raw,file.filename={image}",
                        opts], capture_output=True, text=True, timeout=300)
    if same:
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    else:
        assert r.returncode == 1, r.stdout + r.stderr


def copy_in(dev: RemoteBlockDevice, image: str) -> None:
    with open(image, "rb") as f:
        off = 0
        while chunk := f.read(4 << 20):
            dev.write(off, chunk)
            off += len(chunk)
    dev.flush()


@pytest.fixture()
def daemon(tmp_path):
    with running(str(tmp_path / "demo")) as d:
        yield d


@pytest.mark.parametrize("digest", ["None", "CRC32C"])
def test_round_trip_storaged(daemon, image, digest):
    url = f"{daemon.url}?header_digest={digest}&data_digest={digest}"
    with RemoteBlockDevice(url) as dev:
        assert dev.client.params["HeaderDigest"] == digest
        assert dev.client.params["DataDigest"] == digest
        assert dev.size == 1 << 30 and dev.block_size == 512
        assert len(dev.identity) == 32 and dev.identity.startswith("6")
        copy_in(dev, image)
        with open(image, "rb") as f:
            assert dev.read(5 << 20, 1 << 20) == f.read(6 << 20)[5 << 20:]
        dev.discard(SIZE, 1 << 20)
        assert dev.read(SIZE, 4096) == bytes(4096)
        assert dev.compare_and_write(SIZE, bytes(512), b"a" * 512)
        assert not dev.compare_and_write(SIZE, bytes(512), b"b" * 512)
    qemu_compare(image, daemon.port, DEMO_IQN, 0, digest.lower())
    with RemoteBlockDevice(url) as dev:       # the comparison can fail
        dev.write(SIZE - 512, b"z" * 512, fua=True)
    qemu_compare(image, daemon.port, DEMO_IQN, 0, digest.lower(), same=False)


def test_lun_reset_reports_unit_attention(daemon):
    with RemoteBlockDevice(daemon.url) as dev:
        dev.write(0, b"r" * 4096)
        dev.unit_attentions.clear()       # the power-on one seen at open
        dev.lun_reset()
        assert dev.read(0, 4096) == b"r" * 4096
        # SAM-5: the reset leaves a unit attention (29h/xx), reported and retried.
        assert any(asc == 0x29 for asc, _ in dev.unit_attentions), dev.unit_attentions


def test_chap_one_way_mutual_and_wrong_secret(daemon):
    d = daemon.directory
    storaged("chap", "set", DEMO_IQN, "--user", "bob", "--password", SECRET,
             "--mutual-user", "tgt", "--mutual-password", MUTUAL, directory=d)
    base = daemon.url.replace("iscsi://", f"iscsi://bob%{SECRET}@")
    with RemoteBlockDevice(f"{base}?target_user=tgt&target_password={MUTUAL}") as dev:
        assert dev.read(0, 512) is not None
    with pytest.raises(BlockDeviceError, match="mutual"):
        RemoteBlockDevice(f"{base}?target_password=not-the-secret1")
    storaged("chap", "set", DEMO_IQN, "--user", "bob", "--password", SECRET, directory=d)
    with RemoteBlockDevice(base) as dev:          # one-way
        assert len(dev.read(0, 4096)) == 4096
    wrong = daemon.url.replace("iscsi://", "iscsi://bob%wrong-secret-99@")
    with pytest.raises(BlockDeviceError, match="authentication failed.*0x0201"):
        RemoteBlockDevice(wrong)
    with pytest.raises(BlockDeviceError, match="0x0201"):
        RemoteBlockDevice(daemon.url)             # no credentials at all


def test_target_restart_during_write_loop(tmp_path):
    """Kill -9 the target mid-loop and restart it: the loop continues and
    every acknowledged (FUA) write reads back."""
    port = free_port()
    dmn = Daemon(str(tmp_path / "demo"), port).start()
    acked: dict[int, bytes] = {}
    errors: list[Exception] = []
    try:
        dev = RemoteBlockDevice(dmn.url + "?replacement_timeout=30&noop_interval=1"
                                "&noop_timeout=1")
        stop = threading.Event()

        def loop() -> None:
            i = 0
            try:
                while not stop.is_set():
                    data = os.urandom(64 << 10)
                    dev.write(i * (64 << 10), data, fua=True)
                    acked[i] = data
                    i += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(1.0)
        before = len(acked)
        dmn.kill()
        time.sleep(0.5)
        dmn = Daemon(str(tmp_path / "demo"), port).start()
        time.sleep(2.0)
        stop.set()
        t.join(60)
        assert not errors, errors
        assert dev.client.reconnects >= 1
        assert len(acked) > before > 0
        for i, data in acked.items():
            assert dev.read(i * (64 << 10), len(data)) == data, i
        dev.close()
    finally:
        dmn.stop()


def test_reservation_fences_the_other_node(daemon):
    a = RemoteBlockDevice(daemon.url + "?initiator=iqn.2026-11.test:node1")
    b = RemoteBlockDevice(daemon.url + "?initiator=iqn.2026-11.test:node2")
    try:
        ka, kb = fence_scsi_key("demo", 1), fence_scsi_key("demo", 2)
        assert f"{ka:08x}".endswith("0001") and f"{kb:08x}".endswith("0002")
        a.unfence(ka)
        b.unfence(kb)
        assert sorted(a.read_keys()) == sorted([ka, kb])
        b.write(0, b"b" * 4096)
        a.preempt(ka, kb)                # node1 fences node2
        with pytest.raises(FencedError):
            b.write(0, b"c" * 4096)
        a.write(0, b"a" * 4096)
        assert b.read(0, 4096) == b"a" * 4096   # WE-RO: reads still allowed
        # The preempted node saw the unit attention "registrations preempted".
        assert (0x2A, 0x05) in b.unit_attentions or (0x2A, 0x04) in b.unit_attentions
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------- tgt
TGT_IQN = "iqn.2026-11.org.storaged:tgtpeer"


@dataclass
class Tgt:
    port: int
    ctl: int
    iqn: str = TGT_IQN
    lun: int = 1
    proc: subprocess.Popen | None = None
    img: object = None


def tgtadm(ctl: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["tgtadm", "-C", str(ctl), "--lld", "iscsi", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 or not check, r.stderr
    return r


def start_tgtd(tmp_path, img, port: int, ctl: int) -> subprocess.Popen:
    """tgtd on its own portal and control number with LUN 1 on ``img``."""
    tgtd = require_tool("tgtd", "tgt")
    require_tool("tgtadm", "tgt")
    log = open(tmp_path / "tgtd.log", "ab")  # noqa: SIM115 - kept by the process
    proc = subprocess.Popen([tgtd, "-f", "-C", str(ctl), "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 15
    while tgtadm(ctl, "--op", "show", "--mode", "target", check=False).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, "tgtd did not start"
        time.sleep(0.1)
    tgtadm(ctl, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
    tgtadm(ctl, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
           "-b", str(img))
    tgtadm(ctl, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
    return proc


def stop_tgtd(proc: subprocess.Popen, ctl: int) -> None:
    if proc.poll() is None:
        tgtadm(ctl, "--op", "delete", "--mode", "target", "--tid", "1", "--force", check=False)
        subprocess.run(["tgtadm", "-C", str(ctl), "--op", "delete", "--mode", "system"],
                       capture_output=True, timeout=30)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture()
def tgt(tmp_path):
    """tgtd with stock parameters (InitialR2T=Yes, 8 KiB segments: the R2T
    path), LUN 1 on a 64 MiB file."""
    img = tmp_path / "lun1.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    ep = Tgt(free_port(), random.randrange(2000, 9000))  # -C: a small instance number
    ep.proc = start_tgtd(tmp_path, img, ep.port, ep.ctl)
    ep.img = img
    try:
        yield ep
    finally:
        stop_tgtd(ep.proc, ep.ctl)


@pytest.mark.parametrize("digest", ["None", "CRC32C"])
def test_round_trip_tgt(tgt, image, digest):
    if digest != "None":
        for key in ("HeaderDigest", "DataDigest"):
            tgtadm(tgt.ctl, "--op", "update", "--mode", "target", "--tid", "1",
                   "--name", key, "--value", "CRC32C,None")
    url = (f"iscsi://127.0.0.1:{tgt.port}/{tgt.iqn}/{tgt.lun}"
           f"?header_digest={digest}&data_digest={digest}")
    with RemoteBlockDevice(url) as dev:
        assert dev.client.params["HeaderDigest"] == digest
        assert dev.client.params["InitialR2T"] == "Yes"
        assert dev.size == 64 << 20 and dev.identifiers
        copy_in(dev, image)
        with open(image, "rb") as f:
            assert dev.read(0, SIZE) == f.read()
    qemu_compare(image, tgt.port, tgt.iqn, tgt.lun, digest.lower())


def test_chap_tgt(tgt):
    p, c = tgt.port, tgt.ctl
    tgtadm(c, "--op", "new", "--mode", "account", "--user", "bob", "--password", SECRET)
    tgtadm(c, "--op", "new", "--mode", "account", "--user", "tgt", "--password", MUTUAL)
    tgtadm(c, "--op", "bind", "--mode", "account", "--tid", "1", "--user", "bob")
    base = f"iscsi://bob%{SECRET}@127.0.0.1:{p}/{tgt.iqn}/{tgt.lun}"
    with RemoteBlockDevice(base) as dev:
        assert len(dev.read(0, 4096)) == 4096
    with pytest.raises(BlockDeviceError, match="0x0201"):
        RemoteBlockDevice(base.replace(SECRET, "wrong-secret-99"))
    tgtadm(c, "--op", "bind", "--mode", "account", "--tid", "1", "--user", "tgt", "--outgoing")
    with RemoteBlockDevice(f"{base}?target_user=tgt&target_password={MUTUAL}") as dev:
        assert len(dev.read(0, 4096)) == 4096
    with pytest.raises(BlockDeviceError, match="mutual"):
        RemoteBlockDevice(f"{base}?target_user=tgt&target_password=not-the-secret1")


def test_connection_drop_during_write_loop_tgt(tgt):
    """Abort the TCP connection under a write loop: the session is
    reinstated with the same ISID and the unanswered writes are resent."""
    url = f"iscsi://127.0.0.1:{tgt.port}/{tgt.iqn}/{tgt.lun}"
    with RemoteBlockDevice(url) as dev:
        isid = dev.client.opt.isid
        futs = []
        blobs = [os.urandom(256 << 10) for _ in range(64)]
        for i, blob in enumerate(blobs):
            futs.append(dev.submit(dev.awrite(i * len(blob), blob)))
            if i in (20, 45):
                dev._lt.loop.call_soon_threadsafe(dev.client.drop_connection)
        for f in futs:
            f.result(60)
        assert dev.client.reconnects >= 1 and dev.client.opt.isid == isid
        for i, blob in enumerate(blobs):
            assert dev.read(i * len(blob), len(blob)) == blob, i


def test_hung_target_noop_timeout_and_replacement_timeout(tmp_path):
    """SIGSTOP the target: the NOP-Out ping times out, reconnecting fails
    until replacement_timeout, and the write fails with that reason; after
    SIGCONT the next write logs in again and succeeds."""
    with running(str(tmp_path / "demo")) as d:
        dev = RemoteBlockDevice(d.url + "?noop_interval=0.5&noop_timeout=0.5"
                                "&replacement_timeout=2&login_timeout=0.5")
        try:
            dev.write(0, b"1" * 4096)
            d.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                with pytest.raises(BlockDeviceError, match="replacement timeout"):
                    dev.write(0, b"2" * 4096)
                assert time.monotonic() - t0 < 15
            finally:
                d.proc.send_signal(signal.SIGCONT)
            dev.write(4096, b"3" * 4096)
            assert dev.read(4096, 4096) == b"3" * 4096
            assert dev.client.reconnects >= 1
        finally:
            dev.close()


def test_tgt_restart_during_write_loop(tgt, tmp_path):
    """kill -9 tgtd under a FUA write loop and start it again on the same
    file: the loop continues and every acknowledged write reads back."""
    url = (f"iscsi://127.0.0.1:{tgt.port}/{tgt.iqn}/{tgt.lun}"
           "?noop_interval=1&noop_timeout=1&replacement_timeout=30&login_timeout=2")
    acked: dict[int, bytes] = {}
    done = [0]          # writes acknowledged in all
    errors: list[Exception] = []
    with RemoteBlockDevice(url) as dev:
        stop = threading.Event()

        def loop() -> None:
            i = 0
            try:
                while not stop.is_set():
                    data = os.urandom(64 << 10)
                    dev.write((i % 900) * (64 << 10), data, fua=True)
                    acked[i % 900] = data
                    i += 1
                    done[0] = i
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=loop)
        t.start()
        try:
            time.sleep(1.0)
            before = done[0]
            tgt.proc.kill()
            tgt.proc.wait(5)
            time.sleep(0.5)
            tgt.proc = start_tgtd(tmp_path, tgt.img, tgt.port, tgt.ctl)
            restarted = done[0]
            time.sleep(2.0)
        finally:
            stop.set()
            t.join(60)
        assert not errors, errors
        assert dev.client.reconnects >= 1 and before > 0
        assert done[0] > restarted        # the loop went on after the restart
        for i, data in acked.items():
            assert dev.read(i * (64 << 10), len(data)) == data, i
