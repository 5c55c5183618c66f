"""``storaged lab`` end to end (root): up, the scenarios, down.

The checks here are made from outside the scenario code: the storage
nodes' own ``fence status``, the acknowledged-write checker reading the LUN
through the CLI (and catching a forged acknowledgement), and after ``lab
down``: no namespace with the lab's prefix, nothing mounted under DIR, no
process of the lab (by pid and by command line), DIR gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.support import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.root, pytest.mark.peer, pytest.mark.slow]


def _env() -> dict[str, str]:
    # The lab's processes run `python -m storaged` / fence_storaged: this checkout's code.
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def lab(*args: str, directory: str, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "storaged", "lab", *args, "--dir", directory],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"storaged lab {' '.join(args)} exited {r.returncode}:\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _tools() -> None:
    require_tool("ip", "iproute2")
    require_tool("nsenter", "util-linux")
    require_tool("fusermount3", "fuse3")


def _lab_processes(directory: str) -> list[int]:
    """Pids whose command line names ``directory`` (any process of the lab)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if directory in cmd and not zombie:
            found.append(int(pid))
    return found


def _netns(prefix: str) -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith(prefix)]


def _mounts_under(directory: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(directory + "/")]


def assert_nothing_left(directory: str, lab_id: str) -> None:
    assert _netns(f"{lab_id}-") == []
    assert _mounts_under(directory) == []
    assert _lab_processes(directory) == []
    assert not os.path.exists(directory)


@pytest.fixture
def lab_dir(tmp_path):
    """A lab directory and id; whatever the test leaves is removed afterwards."""
    _tools()
    lab_id = f"lab{os.getpid() % 100000}"
    directory = str(tmp_path / "lab")
    yield directory, lab_id
    if os.path.exists(directory):
        lab("down", "--id", lab_id, directory=directory, check=False)
    for pid in _lab_processes(directory):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for m in _mounts_under(directory):
        subprocess.run(["umount", "-l", m], capture_output=True)
    for ns in _netns(f"{lab_id}-"):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


FIGURE = re.compile(r"^figure (?P<name>.+?)\s+(?P<s>\d+\.\d{3}) s", re.M)


def _figures(out: str) -> dict[str, float]:
    return {m["name"].strip(): float(m["s"]) for m in FIGURE.finditer(out)}


def test_lab_up_split_brain_down(lab_dir, tmp_path):
    directory, lab_id = lab_dir
    t0 = time.monotonic()
    lab("up", "--storage", "2", "--nodes", "2", "--id", lab_id, directory=directory)
    up_s = time.monotonic() - t0
    st = json.loads(lab("status", "--json", directory=directory).stdout)
    nodes = {n["node"]: n for n in st["nodes"]}
    assert set(nodes) == {"s1", "s2", "c1", "c2"}
    assert all(p["alive"] for n in nodes.values() for p in n["processes"])
    for c in ("c1", "c2"):
        assert nodes[c]["mounted"] and nodes[c]["cluster"]["view"]["quorate"]
        assert nodes[c]["fenced_by"] == []
    # the storage nodes' own cluster, and the floating portal on exactly one of them
    for s in ("s1", "s2"):
        assert nodes[s]["cluster"]["view"]["quorate"], nodes[s]["cluster"]
        assert nodes[s]["cluster"]["view"]["members"] == [1, 2]
    assert st["vip_holders"] == ["s1"] and nodes["s1"]["holds_vip"]
    assert st["vip"] in _addresses(f"{lab_id}-s1") and st["vip"] not in _addresses(
        f"{lab_id}-s2")
    assert "lab" in lab("status", directory=directory).stdout  # the rich table renders
    # lab exec: inside c1's network namespace, with the host's files
    ex = subprocess.run([sys.executable, "-m", "storaged", "lab", "exec", "--dir", directory,
                         "c1", "--", "sh", "-c", "ip -br addr show eth0; ls " + directory],
                        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=30)
    assert ex.returncode == 0 and "10.250.0.21/24" in ex.stdout and "shared.img" in ex.stdout
    assert "10.250.0.21" not in subprocess.run(["ip", "-br", "addr"], capture_output=True,
                                               text=True).stdout  # not in the host's netns

    out_json = str(tmp_path / "split.json")
    r = lab("scenario", "split-brain", "--json", out_json, directory=directory)
    print(r.stdout)
    figs = _figures(r.stdout)
    assert {"detection c1", "detection c2", "fence", "recovery"} <= set(figs), r.stdout
    assert 0 < figs["fence"] < 15
    res = json.load(open(out_json))
    assert res["ok"] and res["access"] == {"c1": True, "c2": False}

    # lab status must not block on the cut-off node's mount (it waits for locks forever)
    after = json.loads(lab("status", "--json", directory=directory, timeout=30).stdout)
    seen = {n["node"]: n for n in after["nodes"]}
    assert seen["c2"]["fenced_by"] == ["s1", "s2"] and seen["c1"]["fenced_by"] == []
    assert seen["c1"]["cluster"]["view"]["members"] == [1]

    # From outside the scenario: each storage node's own record.
    for s in ("s1", "s2"):
        state = os.path.join(directory, s)
        for node, rc in (("c1", 0), ("c2", 2)):
            p = subprocess.run([sys.executable, "-m", "storaged", "--dir", state, "fence",
                                "status", node], capture_output=True, text=True, cwd=ROOT,
                               env=_env())
            assert p.returncode == rc, (s, node, p.stdout, p.stderr)
    pids = [p["pid"] for n in nodes.values() for p in n["processes"]]

    t0 = time.monotonic()
    lab("down", directory=directory)
    down_s = time.monotonic() - t0
    assert_nothing_left(directory, lab_id)
    assert not any(os.path.exists(f"/proc/{p}/cmdline") and _lab_processes(directory)
                   for p in pids)
    print(f"lab up {up_s:.1f} s, lab down {down_s:.1f} s")


def _addresses(netns: str) -> str:
    """``ip -o addr`` of ``netns``'s eth0, read by the test itself."""
    return subprocess.run(["ip", "-n", netns, "-o", "-4", "addr", "show", "dev", "eth0"],
                          capture_output=True, text=True).stdout


def test_lab_failover_and_checker(lab_dir, tmp_path):
    directory, lab_id = lab_dir
    acks = str(tmp_path / "acks")  # outside the lab
    lab("up", "--storage", "2", "--nodes", "3", "--id", lab_id, directory=directory)
    r = lab("scenario", "failover", "--acks", acks, "--seconds", "2",
            "--json", str(tmp_path / "f.json"), directory=directory)
    print(r.stdout)
    figs = _figures(r.stdout)
    assert {"detection", "fence", "lock recovery", "journal replay",
            "survivor I/O gap"} <= set(figs), r.stdout
    # the portal failover ran: a measured figure, not n/a
    assert {"portal failover", "portal I/O gap"} <= set(figs), r.stdout
    assert 0 < figs["portal failover"] < 15 and figs["portal failover"] <= figs[
        "portal I/O gap"]
    res = json.load(open(tmp_path / "f.json"))
    assert res["ok"] and res["late_acks"] == 0
    assert res["portal"]["from"] == "s1" and res["portal"]["to"] == "s2"
    # From outside the scenario: the address is on s2 only; s1 is dead and its port down.
    vip = "10.250.0.10/"
    assert vip in _addresses(f"{lab_id}-s2")
    sw = subprocess.run(["ip", "-n", f"{lab_id}-sw", "-o", "link", "show", "s1"],
                        capture_output=True, text=True).stdout
    assert "<" in sw and "UP" not in sw.split("<", 1)[1].split(">", 1)[0].split(","), sw
    st = json.loads(lab("status", "--json", directory=directory).stdout)
    assert st["vip_holders"] == ["s2"]
    alive = {n["node"]: [p["alive"] for p in n["processes"]] for n in st["nodes"]}
    assert alive["s1"] == [False] and alive["s2"] == [True]

    # The checker, run through the CLI (not the scenario), reads the LUN over iSCSI.
    c = lab("check", "--acks", acks, directory=directory)
    m = re.search(r"check: (\d+)/(\d+) acknowledged writes verified", c.stdout)
    assert m and m[1] == m[2] and int(m[2]) > 10, c.stdout
    per_node = json.loads(c.stdout.split("CHECK-JSON ", 1)[1])["per_node"]
    acked = {n for n in ("c1", "c2", "c3")
             if any('"error"' not in ln for ln in open(os.path.join(acks, f"{n}.jsonl")))}
    assert {"c1", "c2"} <= acked and set(per_node) == acked  # the victim's via replay
    # ... and it does catch a lost write.
    forged = str(tmp_path / "forged")
    shutil.copytree(acks, forged)
    with open(os.path.join(forged, "c1.jsonl"), "a") as f:
        f.write(json.dumps({"node": "c1", "i": 999999, "file": "w-c1/rec-999999",
                            "sha256": "0" * 64, "t": time.time()}) + "\n")
    bad = lab("check", "--acks", forged, directory=directory, check=False)
    assert bad.returncode == 1 and "LOST: /w-c1/rec-999999" in bad.stdout, bad.stdout

    lab("down", directory=directory)
    assert_nothing_left(directory, lab_id)
    assert os.listdir(acks)  # the writers' logs outside the lab are kept


def test_lab_down_after_a_crashed_up(lab_dir):
    directory, lab_id = lab_dir
    proc = subprocess.Popen([sys.executable, "-m", "storaged", "lab", "up", "--dir", directory,
                             "--id", lab_id, "--storage", "1", "--nodes", "2"], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    sock = os.path.join(directory, "s1", "control.sock")
    deadline = time.monotonic() + 60
    while not os.path.exists(sock) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(sock), "the storage daemon never started"
    proc.send_signal(signal.SIGKILL)  # lab up dies half-way: daemons and namespaces left
    proc.wait(10)
    assert _netns(f"{lab_id}-") and _lab_processes(directory)
    again = lab("up", "--id", lab_id, directory=directory, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    lab("down", directory=directory)
    assert_nothing_left(directory, lab_id)


def test_lab_cli_errors(tmp_path):
    missing = lab("status", directory=str(tmp_path / "none"), check=False)
    assert missing.returncode == 1 and "no lab in" in missing.stderr
    bad = lab("up", "--nodes", "1", directory=str(tmp_path / "x"), check=False)
    assert bad.returncode == 1 and "2 to 8 cluster nodes" in bad.stderr
    assert not os.path.exists(tmp_path / "x")
