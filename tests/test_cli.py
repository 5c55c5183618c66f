"""Tests for the storaged CLI (click CliRunner against a temporary --dir)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import types

import pytest
from click.testing import CliRunner

import storaged
from storaged.cli import cli, socket_path
from storaged.control import start_control_server, stop_control_server
from storaged.control.backup import export_config
from storaged.state import Store, Target

IQN = "iqn.2024-01.com.example:store1"
INIT = "iqn.1993-08.org.debian:01:client1"
SECRET = "initiator-secret-1"
MUTUAL = "target-secret-22"


@pytest.fixture
def env(tmp_path):
    """Run the CLI against tmp_path/state; returns run(*args, input=None) -> Result."""
    state = str(tmp_path / "state")
    runner = CliRunner()

    def run(*args, input=None, code=0):
        result = runner.invoke(cli, ["--dir", state, *args], input=input)
        assert result.exit_code == code, (result.output, result.stderr, result.exception)
        return result

    run.state = state
    run.tmp = tmp_path
    return run


def snapshot(state):
    with Store(state) as s:
        return export_config(s)


def build(env):
    env("backstore", "create", "disk0", str(env.tmp / "disk0.img"), "--size", "16M")
    env("target", "create", IQN, "--portal", "127.0.0.1:3260")
    env("lun", "add", IQN, "disk0")
    env("acl", "add", IQN, INIT)
    env("chap", "set", IQN, "--user", "alice", "--password", SECRET, "--mutual-user", "tgt",
        "--mutual-password", MUTUAL, "--initiator", INIT)


def test_full_setup_and_ls(env):
    build(env)
    r = env("ls")
    out = r.output
    assert SECRET not in out and MUTUAL not in out
    assert "disk0  file " + str(env.tmp / "disk0.img") + "  16.0MiB" in out
    assert f"o- {IQN}  tpgt=1  acl-only  queue_depth=128" in out
    assert "o- 127.0.0.1:3260" in out
    assert f"o- lun0 -> disk0 ({env.tmp / 'disk0.img'})" in out
    assert f"o- {INIT}  chap: user=alice (mutual: tgt)" in out
    assert "o- chap: none" in out
    desc = json.loads(env("ls", "--json").output)
    assert desc["targets"][0]["luns"] == [
        {"lun": 0, "backstore": "disk0", "path": str(env.tmp / "disk0.img")}]
    assert SECRET not in json.dumps(desc)
    with Store(env.state) as s, s.read() as txn:
        assert txn.get(Target, IQN).acls[INIT].chap.password == SECRET
    assert os.path.getsize(env.tmp / "disk0.img") == 16 << 20


def test_target_verbs(env):
    env("target", "create", IQN)
    assert "open access" in env("target", "open", IQN).output
    assert f"{IQN}  tpgt=1  open access" in env("ls").output
    env("target", "close", IQN)
    env("target", "set", IQN, "MaxRecvDataSegmentLength=262144", "queue_depth=32",
        "ImmediateData=no")
    env("portal", "add", IQN, "[::1]:3261")
    env("portal", "remove", IQN, "0.0.0.0:3260")
    with Store(env.state) as s, s.read() as txn:
        t = txn.get(Target, IQN)
    assert t.open_access is False
    assert t.params == {"ImmediateData": "No", "MaxRecvDataSegmentLength": "262144"}
    assert t.queue_depth == 32 and t.portals == ["[::1]:3261"]
    env("backstore", "create", "d1", str(env.tmp / "d1.img"), "--size", "1M",
        "--block-size", "4096", "--read-only", "--no-write-cache")
    assert "d1  file" in env("backstore", "ls").output
    env("lun", "add", IQN, "d1", "--lun", "7")
    env("lun", "remove", IQN, "7")
    env("backstore", "delete", "d1")
    env("acl", "add", IQN, INIT)
    env("chap", "set", IQN, "--user", "bob", "--password", SECRET)
    env("chap", "clear", IQN)
    env("acl", "remove", IQN, INIT)
    env("target", "delete", IQN)
    assert snapshot(env.state)["targets"] == []


def test_chap_secret_from_file_and_prompt(env):
    env("target", "create", IQN)
    secret_file = env.tmp / "secret"
    secret_file.write_text(SECRET + "\n")
    env("chap", "set", IQN, "--user", "u", "--password-file", str(secret_file))
    with Store(env.state) as s, s.read() as txn:
        assert txn.get(Target, IQN).chap.password == SECRET
    r = env("chap", "set", IQN, "--user", "v", input=f"{MUTUAL}\n{MUTUAL}\n")
    assert MUTUAL not in r.output  # hidden prompt: never echoed
    with Store(env.state) as s, s.read() as txn:
        assert txn.get(Target, IQN).chap.password == MUTUAL
    env("chap", "set", IQN, "--user", "u", "--password", "x" * 12, "--password-file",
        str(secret_file), code=2)


def test_config_save_restore_round_trip(env):
    build(env)
    before = snapshot(env.state)
    tree = env("ls").output
    backup = str(env.tmp / "backup.json")
    env("config", "save", backup)
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    with open(backup) as f:
        assert SECRET in f.read()  # backups carry secrets (hence 0600)
    env("chap", "clear", IQN, "--initiator", INIT)
    env("lun", "remove", IQN, "0")
    env("target", "delete", IQN)
    env("backstore", "delete", "disk0")
    assert snapshot(env.state)["targets"] == []
    assert "Restored 1 backstore, 1 target from" in env("config", "restore", backup).output
    assert snapshot(env.state) == before
    assert env("ls").output == tree


def test_config_restore_errors_change_nothing(env):
    build(env)
    before = snapshot(env.state)
    bad = json.loads(json.dumps(before))
    bad["targets"][0]["luns"]["3"] = "ghost"
    bad["targets"][0]["portals"].append("not-a-portal")
    bad["backstores"][0]["block_size"] = 1000
    path = env.tmp / "bad.json"
    path.write_text(json.dumps(bad))
    r = env("config", "restore", str(path), code=1)
    assert r.stderr.startswith("storaged: error: config has 3 errors:")
    assert f"target {IQN}: lun 3 refers to missing backstore 'ghost'" in r.stderr
    assert "not-a-portal" in r.stderr
    assert "block_size must be 512 or 4096" in r.stderr
    assert snapshot(env.state) == before
    path.write_text("{oops")
    assert "invalid JSON" in env("config", "restore", str(path), code=1).stderr
    assert "cannot read" in env("config", "restore", str(env.tmp / "none.json"), code=1).stderr


@pytest.mark.parametrize("args,message", [
    (["backstore", "create", "disk0", "{tmp}/other.img", "--size", "1M"],
     "backstore 'disk0' already exists"),
    (["backstore", "create", "new", "{tmp}/x.img"], "size required to create"),
    (["backstore", "delete", "disk0"], f"in use by target {IQN} lun 0"),
    (["target", "create", "iqn.20-01.bad"], "invalid iqn name"),
    (["lun", "add", IQN, "nope"], "backstore 'nope' does not exist"),
    (["lun", "add", "iqn.2024-01.com.example:ghost", "disk0"], "does not exist"),
    (["portal", "add", IQN, "::1:3260"], "brackets"),
    (["acl", "add", IQN, INIT], "already has an ACL"),
    (["chap", "set", IQN, "--user", "u", "--password", "short"], "at least 12 bytes"),
    (["target", "set", IQN, "MaxBurstLength=1"], "MaxBurstLength must be 512"),
    (["target", "set", IQN, "queue_depth=16", "Nonsense=1"], "unknown iSCSI parameter"),
])
def test_config_errors_exit_1_and_change_nothing(env, args, message):
    build(env)
    before = snapshot(env.state)
    r = env(*[a.replace("{tmp}", str(env.tmp)) for a in args], code=1)
    assert r.stderr.startswith("storaged: error: ")
    assert message in r.stderr
    assert r.stdout == ""
    assert snapshot(env.state) == before
    assert not os.path.exists(env.tmp / "x.img")


@pytest.mark.parametrize("args", [
    ["lun", "add", IQN, "disk0", "--lun", "x"],
    ["lun", "add", IQN, "disk0", "--lun", "16384"],
    ["target", "set", IQN, "noequals"],
    ["backstore", "create", "d", "/tmp/x", "--block-size", "1000"],
    ["chap", "set", IQN, "--password", "x" * 12],
    ["chap", "set", IQN, "--user", "u", "--password", "x" * 12, "--mutual-password", "y" * 12],
    ["frobnicate"],
])
def test_usage_errors_exit_2(env, args):
    build(env)
    before = snapshot(env.state)
    env(*args, code=2)
    assert snapshot(env.state) == before


def test_dir_from_environment(tmp_path):
    state = str(tmp_path / "envstate")
    r = CliRunner().invoke(cli, ["target", "create", IQN], env={"STORAGED_DIR": state})
    assert r.exit_code == 0, r.output
    assert [t["iqn"] for t in snapshot(state)["targets"]] == [IQN]


def test_cli_routes_to_running_daemon(env):
    """With a daemon listening on <dir>/control.sock the CLI goes through it (live)."""
    short = tempfile.mkdtemp(prefix="sdcli")  # unix socket paths are limited to 108 bytes
    try:
        _routes_to_daemon(env, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _routes_to_daemon(env, state):
    store = Store(state)
    changes: list[int] = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    path = socket_path(state)
    holder = {}

    async def start():
        holder["server"] = await start_control_server(path, store, lambda: changes.append(1),
                                                      {"status": lambda args: {"live": True}})
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()),
                                              loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        runner = CliRunner()
        r = runner.invoke(cli, ["--dir", state, "target", "create", IQN])
        assert r.exit_code == 0, r.output
        r = runner.invoke(cli, ["--dir", state, "lun", "add", IQN, "nope"])
        assert r.exit_code == 1 and "storaged: error: backstore 'nope'" in r.stderr
        assert IQN in runner.invoke(cli, ["--dir", state, "ls"]).output
        assert changes == [1]  # the daemon saw exactly the one successful change
        with store.read() as txn:
            assert txn.keys(Target) == [IQN]
    finally:
        asyncio.run_coroutine_threadsafe(stop_control_server(holder["server"], path),
                                         loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        store.close()


@pytest.fixture
def fake_daemon(monkeypatch):
    calls = []
    mod = types.ModuleType("storaged.daemon")
    mod.serve = lambda directory, metrics=None: calls.append(("serve", directory, metrics))
    mod.demo = lambda directory, iscsi=None, metrics=None: calls.append(
        ("demo", directory, iscsi, metrics))
    monkeypatch.setitem(sys.modules, "storaged.daemon", mod)
    monkeypatch.setattr(storaged, "daemon", mod, raising=False)
    return calls


def test_serve_and_demo_delegate_to_daemon(fake_daemon, monkeypatch):
    monkeypatch.delenv("STORAGED_DIR", raising=False)
    runner = CliRunner()
    assert runner.invoke(cli, ["serve", "--metrics", "127.0.0.1:9100"]).exit_code == 0
    assert runner.invoke(cli, ["--dir", "/srv/st", "serve"]).exit_code == 0
    assert runner.invoke(cli, ["demo"]).exit_code == 0
    assert runner.invoke(cli, ["demo", "--dir", "/tmp/d", "--iscsi", "127.0.0.1:3261"]
                         ).exit_code == 0
    assert runner.invoke(cli, ["--dir", "/srv/st", "demo"]).exit_code == 0
    assert fake_daemon == [
        ("serve", "/var/lib/storaged", "127.0.0.1:9100"),
        ("serve", "/srv/st", None),
        ("demo", "./storaged-demo", "127.0.0.1:3260", None),
        ("demo", "/tmp/d", "127.0.0.1:3261", None),
        ("demo", "/srv/st", "127.0.0.1:3260", None),
    ]


def test_iscsi_verbs_also_under_storaged_iscsi(env):
    out = env("iscsi", "backstore", "create", "d1", str(env.tmp / "d1.img"), "--size", "1M").output
    assert out == f"Created backstore d1 (file {env.tmp / 'd1.img'}, 1.0MiB).\n"
    env("iscsi", "target", "create", IQN, "--portal", "127.0.0.1:3260")
    assert env("iscsi", "lun", "add", IQN, "d1").output == f"Target {IQN}: lun0 -> d1.\n"
    assert "lun0 -> d1" in env("ls").output  # the same store as the top-level verbs
    r = env("iscsi", "target", "delete", "iqn.2024-01.com.example:nope", code=1)
    assert "storaged: error:" in r.stderr
