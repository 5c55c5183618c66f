"""``config save`` / ``config restore`` / ``ls`` cover every kind of configuration.

The CLI runs as a subprocess (as an admin runs it, each command a fresh
interpreter), so a section that only appears when some module happens to be
imported would be missing here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import stat
import subprocess
import sys

import pytest

import storaged
from storaged.registry import CONFIG_KINDS, OPERATION_MODULES, RECORD_KINDS
from storaged.state import Record

IQN = "iqn.2026-12.com.example:backup"
INIT = "iqn.1993-08.org.debian:01:backupclient"
SECRET = "backup-s3cret-pw"


def storaged_cli(state: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "storaged", "--dir", state, *args],
                       capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, f"storaged {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture
def configured(tmp_path):
    """A state directory with one of every kind of configuration."""
    state = str(tmp_path / "state")
    members = [str(tmp_path / f"m{i}.img") for i in range(4)]
    share = tmp_path / "share"
    share.mkdir()
    steps = [
        ("raid", "create", "--level", "5", "--name", "vol", "--size", "8M", *members),
        ("raid", "backstore", "rdisk", "vol"),
        ("backstore", "create", "fdisk", str(tmp_path / "f.img"), "--size", "4M"),
        ("target", "create", IQN, "--portal", "127.0.0.1:3260"),
        ("lun", "add", IQN, "rdisk"),
        ("lun", "add", IQN, "fdisk"),
        ("acl", "add", IQN, INIT),
        ("chap", "set", IQN, "--initiator", INIT, "--user", "u1", "--password", SECRET),
        ("alua", "group", "create", "7", "--state", "standby", "--port", f"{IQN},1"),
        ("nfs", "export", "add", "/ex", str(share), "--ro"),
        ("nfs", "listen", "127.0.0.1:20490"),
        ("cluster", "init", "c1", "--node", "1=127.0.0.1:7871", "--node", "2=127.0.0.1:7872",
         "--id", "2"),
        ("settings", "set", "nop_interval=9"),
    ]
    for step in steps:
        storaged_cli(state, *step)
    return state


@pytest.mark.slow
def test_save_holds_every_section_and_restores_on_a_fresh_directory(configured, tmp_path):
    backup = str(tmp_path / "save.json")
    r = storaged_cli(configured, "config", "save", backup)
    assert "1 raid array" in r.stdout and "1 nfs export" in r.stdout and "cluster" in r.stdout
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    with open(backup) as f:
        text = f.read()
    data = json.loads(text)
    assert SECRET in text
    assert {c.CONFIG_SECTION for c in CONFIG_KINDS} <= set(data)
    assert [a["name"] for a in data["raid_arrays"]] == ["vol"]
    assert [e["path"] for e in data["nfs_exports"]] == ["/ex"]
    assert data["nfs_settings"]["listen"] == "127.0.0.1:20490"
    assert data["cluster"]["name"] == "c1" and data["cluster_node"] == {"node_id": 2}
    assert [g["id"] for g in data["alua_groups"]] == [7]

    fresh = str(tmp_path / "fresh")
    r = storaged_cli(fresh, "config", "restore", backup)
    assert "Restored" in r.stdout and "1 raid array" in r.stdout
    before = json.loads(storaged_cli(configured, "ls", "--json").stdout)
    after = json.loads(storaged_cli(fresh, "ls", "--json").stdout)
    assert after == before
    again = str(tmp_path / "again.json")
    storaged_cli(fresh, "config", "save", again)
    with open(again) as f:
        assert json.load(f) == data  # serials, WWNs, export ids and handle keys kept


@pytest.mark.slow
def test_ls_shows_raid_arrays_and_cluster(configured):
    out = storaged_cli(configured, "ls").stdout
    assert "raid arrays (1)" in out and "vol: raid5" in out and "backstore rdisk" in out
    assert "cluster c1: 2 nodes" in out and "node 2: 127.0.0.1:7872 votes=1  (this host)" in out
    assert "nfs exports (1)" in out


@pytest.mark.slow
def test_restore_checks_new_sections_all_or_nothing(configured, tmp_path):
    backup = str(tmp_path / "save.json")
    storaged_cli(configured, "config", "save", backup)
    with open(backup) as f:
        data = json.load(f)
    bad = json.loads(json.dumps(data))
    bad["raid_arrays"][0]["level"] = 7
    bad["nfs_exports"].append(dict(bad["nfs_exports"][0], path="/ex/inner",
                                   export_id=bad["nfs_exports"][0]["export_id"]))
    bad["cluster"]["token_ms"] = "soon"
    bad["targets"][0]["luns"]["5"] = "ghost"
    path = str(tmp_path / "bad.json")
    with open(path, "w") as f:
        json.dump(bad, f)
    fresh = str(tmp_path / "fresh")
    storaged_cli(fresh, "backstore", "create", "keep", str(tmp_path / "k.img"), "--size", "1M")
    r = storaged_cli(fresh, "config", "restore", path, ok=False)
    assert r.returncode == 1
    err = r.stderr
    assert "raid array #1: level must be one of" in err
    assert "nfs export /ex/inner would nest with export /ex" in err
    assert "export_id" in err and "cluster: " in err and "token_ms" in err
    assert f"target {IQN}: lun 5 refers to missing backstore 'ghost'" in err
    desc = json.loads(storaged_cli(fresh, "ls", "--json").stdout)
    assert [b["name"] for b in desc["backstores"]] == ["keep"]  # nothing changed
    assert desc["raid_arrays"] == [] and desc["nfs"]["exports"] == [] and desc["cluster"] is None

    # A raid backstore must name an array the restored config has.
    orphan = json.loads(json.dumps(data))
    orphan["raid_arrays"] = []
    with open(path, "w") as f:
        json.dump(orphan, f)
    r = storaged_cli(fresh, "config", "restore", path, ok=False)
    assert "backstore 'rdisk': raid array 'vol' is not in the config" in r.stderr


@pytest.mark.slow
def test_older_file_without_new_sections_leaves_them_alone(configured, tmp_path):
    old = {"format": "storaged-config", "version": 1, "settings": {}, "backstores": [],
           "targets": []}
    path = str(tmp_path / "old.json")
    with open(path, "w") as f:
        json.dump(old, f)
    # The RAID backstore goes (backstores are in every file), the array stays.
    storaged_cli(configured, "config", "restore", path)
    desc = json.loads(storaged_cli(configured, "ls", "--json").stdout)
    assert desc["backstores"] == [] and desc["targets"] == []
    assert [a["name"] for a in desc["raid_arrays"]] == ["vol"]
    assert [e["path"] for e in desc["nfs"]["exports"]] == ["/ex"]
    assert desc["cluster"]["name"] == "c1"


def _package_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(storaged.__path__, "storaged.")
            if not m.name.startswith("storaged.bench") and m.name != "storaged.__main__"]


def test_registry_lists_every_record_kind_and_operation_module():
    classes: set[type[Record]] = set()
    op_modules: set[str] = set()
    for name in _package_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # an optional compiled part not built here
            if "_fastio" in str(e) or "_pureraid" in str(e):
                continue
            raise
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Record) and obj.RECORD_KIND and obj.__module__ == name:
                classes.add(obj)
        path = getattr(module, "__file__", "") or ""
        if path.endswith(".py"):
            with open(path, encoding="utf-8") as f:
                if "\n@_op(" in f.read():
                    op_modules.add(name)
    assert classes == set(RECORD_KINDS)
    assert op_modules == set(OPERATION_MODULES)


def test_duplicates_are_named_the_way_each_kind_is():
    from storaged.control.backup import parse_config

    raid = {"name": "a", "uuid": "x", "level": 1, "members": ["/a"]}
    errors = parse_config({"alua_groups": [{"id": 3}, {"id": 3}], "raid_arrays": [raid, raid],
                           "targets": [{"iqn": IQN}, {"iqn": IQN}]})[1]
    assert errors == [f"target {IQN} is defined twice", "alua group 3 is defined twice",
                      "raid array 'a' is defined twice"]
