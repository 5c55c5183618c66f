"""``storaged lb``: the ipvsadm-shaped CLI, run as a subprocess on a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(d, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "storaged", "--dir", str(d), "lb", *args],
                          capture_output=True, text=True, input=stdin, timeout=60)


@pytest.fixture
def store(tmp_path):
    return tmp_path


def test_add_list_save_clear_restore(store):
    assert run(store, "-A", "-t", "127.0.0.1:3260", "-s", "sh", "-b", "sh-fallback",
               "-p").returncode == 0
    assert run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3261",
               "-w", "3", "-x", "100", "-y", "80").returncode == 0
    assert run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.3:3262").returncode == 0
    out = run(store, "-L", "-n").stdout.splitlines()
    assert out[3] == "TCP  127.0.0.1:3260 sh (sh-fallback) persistent 300"
    # ipvsadm lists the kernel's order: the newest real server first
    assert out[4].split()[:3] == ["->", "127.0.0.3:3262", "Redir"]
    assert out[5].split()[1:4] == ["127.0.0.2:3261", "Redir", "3"]
    saved = run(store, "-S").stdout
    assert saved.splitlines() == [
        "-A -t 127.0.0.1:3260 -s sh -b sh-fallback -p 300",
        "-a -t 127.0.0.1:3260 -r 127.0.0.2:3261 -w 3 -x 100 -y 80",
        "-a -t 127.0.0.1:3260 -r 127.0.0.3:3262 -w 1",
    ]
    assert run(store, "-C").returncode == 0
    assert run(store, "-S").stdout == ""
    assert run(store, "-R", stdin=saved).returncode == 0
    assert run(store, "-S").stdout == saved


def test_edit_and_delete(store):
    run(store, "-A", "-t", "127.0.0.1:3260")
    run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260", "-w", "2")
    assert run(store, "-e", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260",
               "-w", "0").returncode == 0
    assert run(store, "-E", "-t", "127.0.0.1:3260", "-s", "wrr", "-p", "60").returncode == 0
    assert run(store, "-S").stdout.splitlines() == [
        "-A -t 127.0.0.1:3260 -s wrr -p 60",
        "-a -t 127.0.0.1:3260 -r 127.0.0.2:3260 -w 0"]
    assert run(store, "-d", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260").returncode == 0
    assert run(store, "-D", "-t", "127.0.0.1:3260").returncode == 0
    assert run(store, "-S").stdout == ""


@pytest.mark.parametrize("args, message", [
    (["-A", "-t", "127.0.0.1:3260", "-s", "fastest"], "unknown scheduler 'fastest'"),
    (["-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260"], "no virtual service"),
    (["-A", "-t", "nohost:3260"], "invalid portal"),
    (["-A", "-t", "127.0.0.1:3260", "--pe", "sip"], "unknown persistence engine"),
])
def test_errors(store, args, message):
    r = run(store, *args)
    assert r.returncode == 1 and "storaged: error:" in r.stderr and message in r.stderr


def test_duplicate_and_bad_weight(store):
    run(store, "-A", "-t", "127.0.0.1:3260")
    r = run(store, "-A", "-t", "127.0.0.1:3260")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260", "-w", "70000")
    assert r.returncode == 1 and "weight must be an integer 0..65535" in r.stderr
    r = run(store, "-R", stdin="-a -t 127.0.0.5:3260 -r 127.0.0.2:3260\n")
    assert r.returncode == 1 and "before its -A line" in r.stderr
    assert run(store, "-S").stdout == "-A -t 127.0.0.1:3260 -s wlc\n"  # untouched


def test_config_save_carries_services(store):
    run(store, "-A", "-t", "127.0.0.1:3260", "-s", "lblcr")
    run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3260")
    r = subprocess.run([sys.executable, "-m", "storaged", "--dir", str(store), "config", "save",
                        str(store / "cfg.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads((store / "cfg.json").read_text())
    assert data["lb_services"][0]["scheduler"] == "lblcr"
    assert data["lb_services"][0]["reals"][0]["portal"] == "127.0.0.2:3260"
    assert os.path.exists(store / "cfg.json")


def test_redirect_kind_saved_and_json_without_daemon(store):
    assert run(store, "-A", "-t", "127.0.0.1:3260", "-s", "rr",
               "--redirect", "permanent").returncode == 0
    assert run(store, "-a", "-t", "127.0.0.1:3260", "-r", "127.0.0.2:3261").returncode == 0
    saved = run(store, "-S").stdout
    assert saved.splitlines()[0] == "-A -t 127.0.0.1:3260 -s rr --redirect permanent"
    assert "redirect permanent" in run(store, "-L").stdout
    out = json.loads(run(store, "-L", "--json").stdout)
    assert out["live"] is False
    [real] = out["services"][0]["reals"]
    assert (real["portal"], real["active"], real["inactive"], real["up"]) == \
        ("127.0.0.2:3261", 0, 0, True)
    assert run(store, "-C").returncode == 0
    assert run(store, "-R", stdin=saved).returncode == 0 and run(store, "-S").stdout == saved
    r = run(store, "-E", "-t", "127.0.0.1:3260", "--redirect", "sideways")
    assert r.returncode == 2 and "sideways" in r.stderr
