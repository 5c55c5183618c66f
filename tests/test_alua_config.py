"""ALUA configuration: the alua_group record, the alua_* operations (offline,
on the store) and the ``storaged alua`` CLI."""

from __future__ import annotations

import json

import pytest

from storaged.control.ops import ConfigError, apply
from storaged.state import AluaGroup, Store, ValidationError
from tests.support import storaged

IQN = "iqn.2026-11.org.test:alua"


def test_record_normalizes_and_rejects():
    g = AluaGroup(id=2, state="ANO", ports=[f"{IQN.upper()} , 3"])
    g.validate()
    assert g.state == "active/non-optimized" and g.ports == [f"{IQN},3"]
    for bad in (dict(id=0), dict(id=2, state="sleepy"), dict(id=2, ports=["no-tpgt"]),
                dict(id=2, ports=[f"{IQN},0"]), dict(id=2, ports=[f"{IQN},1", f"{IQN},1"]),
                dict(id=2, transition_time=256), dict(id=2, remote="yes")):
        with pytest.raises(ValidationError):
            AluaGroup(**bad).validate()
    assert AluaGroup.from_dict(g.to_dict()) == g


def test_operations_offline(tmp_path):
    with Store(str(tmp_path)) as store:
        apply(store, "target_create", {"iqn": IQN, "portals": ["127.0.0.1:3405"]})
        r = apply(store, "alua_ls")
        assert r == {"live": False, "groups": [{
            "id": 1, "state": "active/optimized", "preferred": False, "remote": False,
            "explicit": True, "transition_time": 0, "ports": []}]}
        apply(store, "alua_group_create", {"id": 2, "state": "standby", "remote": True,
                                           "ports": [f"{IQN},2"]})
        with pytest.raises(ConfigError, match="already in group 2"):
            apply(store, "alua_group_create", {"id": 3, "ports": [f"{IQN},2"]})
        with pytest.raises(ConfigError, match="local target port"):
            apply(store, "alua_group_create", {"id": 3, "remote": True, "ports": [f"{IQN},1"]})
        with pytest.raises(ConfigError, match="already exists"):
            apply(store, "alua_group_create", {"id": 1})
        with pytest.raises(ConfigError, match="does not exist"):
            apply(store, "alua_group_set", {"id": 5, "state": "standby"})
        with pytest.raises(ConfigError, match="cannot be remote"):
            apply(store, "alua_group_set", {"id": 1, "remote": True})
        a = apply(store, "alua_group_set", {"id": 1, "state": "standby", "preferred": True})
        b = apply(store, "alua_group_set", {"id": 1, "state": "standby"})
        assert a["state"] == b["state"] == "standby"
        with store.read() as txn:                    # every set is a new revision
            assert txn.get(AluaGroup, "1").revision == 2
        apply(store, "alua_group_set", {"id": 2, "remove_ports": [f"{IQN},2"]})
        with pytest.raises(ConfigError, match="not in group"):
            apply(store, "alua_group_set", {"id": 2, "remove_ports": [f"{IQN},2"]})
        apply(store, "alua_group_remove", {"id": 2})
        with pytest.raises(ConfigError, match="does not exist"):
            apply(store, "alua_group_remove", {"id": 2})
        apply(store, "alua_group_remove", {"id": 1})  # back to the default
        assert apply(store, "alua_ls")["groups"][0]["state"] == "active/optimized"


def test_cli_offline(tmp_path):
    d = str(tmp_path)
    storaged("target", "create", IQN, "--portal", "127.0.0.1:3406", directory=d)
    storaged("target", "set", IQN, "tpgt=4", directory=d)
    out = storaged("alua", "group", "create", "2", "--remote", "--state", "standby",
                   "--port", f"{IQN},5", directory=d).stdout
    assert "Created target port group 2 (standby)" in out
    r = storaged("alua", "group", "create", "3", "--remote", "--port", f"{IQN},4",
                 directory=d, check=False)
    assert r.returncode == 1 and "local target port" in r.stderr
    storaged("alua", "group", "set", "1", "--state", "ano", "--preferred", directory=d)
    text = storaged("alua", "ls", directory=d).stdout
    assert "group 1: active/non-optimized preferred" in text
    assert "group 2: standby remote" in text and "daemon not running" in text
    data = json.loads(storaged("alua", "group", "ls", "--json", directory=d).stdout)
    assert [(g["id"], g["state"]) for g in data["groups"]] == [
        (1, "active/non-optimized"), (2, "standby")]


def test_config_save_restore_keeps_groups(tmp_path):
    with Store(str(tmp_path / "a")) as store:
        apply(store, "alua_group_create", {"id": 7, "remote": True, "state": "standby",
                                           "ports": [f"{IQN},2"]})
        apply(store, "alua_group_set", {"id": 1, "preferred": True})
        saved = apply(store, "export_config")
    assert [g["id"] for g in saved["alua_groups"]] == [1, 7]
    with Store(str(tmp_path / "b")) as other:
        apply(other, "alua_group_create", {"id": 9})
        apply(other, "import_config", {"data": saved})
        groups = apply(other, "alua_ls")["groups"]
        assert [(g["id"], g["state"], g["preferred"]) for g in groups] == [
            (1, "active/optimized", True), (7, "standby", False)]
        bad = dict(saved, alua_groups=[{"id": 3, "state": "sideways"}])
        with pytest.raises(ConfigError, match="alua group #1"):
            apply(other, "import_config", {"data": bad})
        # A config without groups (an older file) restores the default.
        apply(other, "import_config", {"data": {k: v for k, v in saved.items()
                                                if k != "alua_groups"}})
        assert [g["id"] for g in apply(other, "alua_ls")["groups"]] == [1]
