"""Tests for storaged.state: records, validation, the LMDB store and config export/import."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storaged.control.backup import export_config, import_config, save_config
from storaged.state import (
    Acl,
    Backstore,
    Chap,
    Record,
    Settings,
    StateError,
    Store,
    Target,
    ValidationError,
    effective_chap,
    initiator_allowed,
    load_config_file,
    normalize_iscsi_name,
    normalize_param,
    normalize_portal,
)
from storaged.state import store as store_mod

IQN = "iqn.2024-01.com.example:target1"
INIT = "iqn.1993-08.org.debian:01:abcdef"
SECRET = "s3cret-password"
MUTUAL = "other-s3cret-pw"


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_target() -> Target:
    return Target(
        iqn=IQN,
        portals=["127.0.0.1:3260", "[::1]:3261"],
        luns={0: "disk0", 5: "disk1"},
        open_access=False,
        acls={INIT: Acl(INIT, Chap("alice", SECRET, "tgt", MUTUAL))},
        chap=Chap("bob", SECRET),
        params={"MaxBurstLength": "1048576", "ImmediateData": "No"},
        queue_depth=64,
    )


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"))
    yield s
    s.close()


# ---------------------------------------------------------------- records

def test_target_round_trip_through_json():
    t = make_target()
    t.validate()
    data = json.loads(json.dumps(t.to_dict()))
    assert data["luns"] == {"0": "disk0", "5": "disk1"}
    back = Target.from_dict(data)
    assert back == t
    assert back.luns == {0: "disk0", 5: "disk1"}
    assert isinstance(back.acls[INIT], Acl) and back.acls[INIT].chap.mutual_user == "tgt"


def test_backstore_round_trip_and_generated_ids():
    a = Backstore(name="disk0", kind="file", path="/srv/a.img", size=1 << 20)
    b = Backstore(name="disk1", kind="file", path="/srv/b.img", size=1 << 20)
    a.validate()
    assert Backstore.from_dict(a.to_dict()) == a
    assert len(a.serial) == 16 and int(a.serial, 16) >= 0
    assert len(a.wwn) == 32 and a.wwn.startswith("6001405")
    int(a.wwn, 16)
    assert (a.serial, a.wwn) != (b.serial, b.wwn)
    assert (a.block_size, a.read_only, a.wce, a.online) == (512, False, True, True)


def test_settings_defaults_round_trip():
    s = Settings()
    assert (s.nop_interval, s.nop_timeout, s.default_portal) == (15, 30, "0.0.0.0:3260")
    assert Settings.from_dict({"nop_interval": 5}) == Settings(nop_interval=5)


def test_unknown_and_missing_fields_rejected():
    data = Backstore(name="d", kind="file", path="/x", size=512).to_dict()
    data["colour"] = "blue"
    with pytest.raises(ValidationError, match="unknown field 'colour' in backstore"):
        Backstore.from_dict(data)
    with pytest.raises(ValidationError, match="missing field 'iqn'"):
        Target.from_dict({"tpgt": 1})
    with pytest.raises(ValidationError, match="unknown field 'pass'"):
        Target.from_dict({"iqn": IQN, "chap": {"user": "u", "pass": "x" * 12}})


def test_validation_collects_every_problem():
    t = Target(iqn=IQN, tpgt=0, queue_depth=5000, portals=["nonsense"], luns={20000: "d"})
    with pytest.raises(ValidationError) as exc:
        t.validate()
    msgs = exc.value.errors
    assert any("tpgt" in m for m in msgs)
    assert any("queue_depth" in m for m in msgs)
    assert any("nonsense" in m for m in msgs)
    assert any("lun id" in m for m in msgs)
    assert len(msgs) == 4


def test_backstore_validation():
    with pytest.raises(ValidationError, match="multiple of block_size 4096"):
        Backstore(name="d", kind="file", path="/x", size=4096 + 512, block_size=4096).validate()
    with pytest.raises(ValidationError, match="must be > 0"):
        Backstore(name="d", kind="file", path="/x", size=0).validate()
    Backstore(name="d", kind="block", path="/dev/sdb", size=0).validate()  # whole device
    with pytest.raises(ValidationError, match="absolute"):
        Backstore(name="d", kind="file", path="rel.img", size=512).validate()
    with pytest.raises(ValidationError, match="invalid backstore name"):
        Backstore(name="bad name", kind="file", path="/x", size=512).validate()
    with pytest.raises(ValidationError, match="kind must be"):
        Backstore(name="d", kind="tape", path="/x", size=512).validate()
    with pytest.raises(ValidationError, match="read_only must be true or false"):
        Backstore(name="d", kind="file", path="/x", size=512, read_only=1).validate()
    with pytest.raises(ValidationError, match="wwn"):
        Backstore(name="d", kind="file", path="/x", size=512, wwn="1234").validate()


@pytest.mark.parametrize("name,canonical", [
    ("iqn.2024-01.com.example:t1", "iqn.2024-01.com.example:t1"),
    ("IQN.2024-01.COM.Example:Disk.1", "iqn.2024-01.com.example:disk.1"),
    ("iqn.1991-05.com.microsoft:win-host.corp", "iqn.1991-05.com.microsoft:win-host.corp"),
    ("iqn.2003-01.org.linux-iscsi.host", "iqn.2003-01.org.linux-iscsi.host"),
    ("eui.02004567A425678D", "eui.02004567a425678d"),
    ("naa.52004567BA64678D", "naa.52004567ba64678d"),
    ("naa.6001405abcdef0123456789abcdef012", "naa.6001405abcdef0123456789abcdef012"),
])
def test_iscsi_names_valid(name, canonical):
    assert normalize_iscsi_name(name) == canonical


@pytest.mark.parametrize("name,why", [
    ("iqn.2024-13.com.example", "month"),
    ("iqn.24-01.com.example", "expected iqn"),
    ("iqn.2024-01.com.ex_ample:t", "expected iqn"),
    ("iqn.2024-01.com.example:with space", "expected iqn"),
    ("iqn.2024-01.com.example:", "expected iqn"),
    ("eui.0200456", "16 hex"),
    ("naa.52004567BA64678D00", "16 or 32"),
    ("target1", "must start with"),
    ("iqn.2024-01.com.example:" + "a" * 200, "longer than 223"),
])
def test_iscsi_names_invalid(name, why):
    with pytest.raises(ValidationError, match=why):
        normalize_iscsi_name(name)


@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True),
                min_size=1, max_size=4),
       st.integers(1990, 2099), st.integers(1, 12),
       st.from_regex(r"[a-zA-Z0-9.:-]{1,20}", fullmatch=True))
def test_iqn_normalization_idempotent(labels, year, month, suffix):
    name = f"iqn.{year}-{month:02d}.{'.'.join(labels)}:{suffix}"
    once = normalize_iscsi_name(name)
    assert once == name.lower()
    assert normalize_iscsi_name(once) == once


@pytest.mark.parametrize("portal,canonical", [
    ("10.0.0.1:3260", "10.0.0.1:3260"),
    ("10.0.0.1", "10.0.0.1:3260"),
    ("[::1]:3261", "[::1]:3261"),
    ("[2001:DB8:0:0::1]", "[2001:db8::1]:3260"),
])
def test_portals_valid(portal, canonical):
    assert normalize_portal(portal) == canonical


@pytest.mark.parametrize("portal,why", [
    ("::1:3260", "brackets"),
    ("storage.example.com:3260", "expected IPv4"),
    ("10.0.0.1:0", "1-65535"),
    ("10.0.0.1:70000", "1-65535"),
    ("[::1", "expected"),
    ("[zz::1]:3260", "bad IPv6"),
])
def test_portals_invalid(portal, why):
    with pytest.raises(ValidationError, match=why):
        normalize_portal(portal)


def test_chap_rules():
    Chap("u", "x" * 12).validate()
    with pytest.raises(ValidationError, match="at least 12 bytes") as exc:
        Chap("u", "tiny-pw").validate()
    assert "tiny-pw" not in str(exc.value)  # the secret itself is never echoed
    with pytest.raises(ValidationError, match="longer than 255"):
        Chap("u", "x" * 256).validate()
    with pytest.raises(ValidationError, match="both mutual_user and mutual_password"):
        Chap("u", SECRET, mutual_user="t").validate()
    with pytest.raises(ValidationError, match="must differ"):
        Chap("u", SECRET, "t", SECRET).validate()
    with pytest.raises(ValidationError, match="non-empty"):
        Chap("", SECRET).validate()
    c = Chap("u", SECRET, "t", MUTUAL)
    assert c.describe() == "user=u (mutual: t)"
    assert SECRET not in c.describe() and MUTUAL not in c.describe()


def test_params_whitelist():
    assert normalize_param("maxrecvdatasegmentlength", "65536") == (
        "MaxRecvDataSegmentLength", "65536")
    assert normalize_param("InitialR2T", "no") == ("InitialR2T", "No")
    assert normalize_param("HeaderDigest", "crc32c, none") == ("HeaderDigest", "CRC32C,None")
    with pytest.raises(ValidationError, match="unknown iSCSI parameter 'Bogus'"):
        normalize_param("Bogus", "1")
    with pytest.raises(ValidationError, match=r"512\.\.16777215"):
        normalize_param("MaxBurstLength", "100")
    with pytest.raises(ValidationError, match="Yes or No"):
        normalize_param("ImmediateData", "maybe")
    with pytest.raises(ValidationError, match="CRC32C"):
        normalize_param("DataDigest", "MD5")
    t = Target(iqn=IQN, params={"firstburstlength": "1048576", "MaxBurstLength": "65536"})
    with pytest.raises(ValidationError, match="FirstBurstLength .* must not exceed"):
        t.validate()


def test_target_normalizes_in_place():
    t = Target(iqn="IQN.2024-01.COM.EXAMPLE:T", portals=["10.0.0.1"],
               acls={INIT.upper(): Acl(INIT.upper())}, params={"immediatedata": "false"})
    t.validate()
    assert t.iqn == "iqn.2024-01.com.example:t"
    assert t.portals == ["10.0.0.1:3260"]
    assert list(t.acls) == [INIT] and t.acls[INIT].initiator == INIT
    assert t.params == {"ImmediateData": "No"}


def test_target_rejects_duplicates():
    with pytest.raises(ValidationError, match="listed twice"):
        Target(iqn=IQN, portals=["10.0.0.1", "10.0.0.1:3260"]).validate()
    with pytest.raises(ValidationError, match="mapped twice"):
        Target(iqn=IQN, luns={0: "d", 1: "d"}).validate()
    with pytest.raises(ValidationError, match="does not match"):
        Target(iqn=IQN, acls={INIT: Acl("iqn.2000-01.com.other:x")}).validate()


def test_access_and_effective_chap():
    t = make_target()
    t.validate()
    other = "iqn.2000-01.com.other:host"
    assert initiator_allowed(t, INIT)
    assert not initiator_allowed(t, other)
    t.open_access = True
    assert initiator_allowed(t, other)
    assert effective_chap(t, INIT).user == "alice"   # own ACL credentials win
    assert effective_chap(t, other).user == "bob"    # falls back to target-wide
    t.acls[INIT].chap = None
    assert effective_chap(t, INIT).user == "bob"
    t.chap = None
    assert effective_chap(t, INIT) is None


# ------------------------------------------------------------------ store

def test_store_modes(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    old = os.umask(0)
    try:
        s = Store(str(d))
    finally:
        os.umask(old)
    try:
        assert mode(d) == 0o700
        assert mode(d / "state.lmdb") == 0o700
        for name in ("data.mdb", "lock.mdb"):
            assert mode(d / "state.lmdb" / name) == 0o600
    finally:
        s.close()


def test_store_crud_and_sorting(store):
    with store.write() as txn:
        for name in ("zeta", "alpha", "mid"):
            txn.put(Backstore(name=name, kind="file", path=f"/srv/{name}", size=4096))
        txn.put(Target(iqn=IQN))
    with store.read() as txn:
        assert [b.name for b in txn.list(Backstore)] == ["alpha", "mid", "zeta"]
        assert txn.keys(Target) == [IQN]
        assert txn.get(Backstore, "mid").path == "/srv/mid"
        assert txn.get(Backstore, "nope") is None
        assert txn.settings() == Settings()
    with store.write() as txn:
        assert txn.delete(Backstore, "mid") is True
        assert txn.delete(Backstore, "mid") is False
    with store.read() as txn:
        assert [b.name for b in txn.list(Backstore)] == ["alpha", "zeta"]
        assert txn.list(Target)[0].iqn == IQN  # kinds do not bleed into each other


def test_write_aborts_on_exception(store):
    with store.write() as txn:
        txn.put(Target(iqn=IQN))
    with pytest.raises(RuntimeError), store.write() as txn:
        txn.delete(Target, IQN)
        txn.put(Target(iqn="iqn.2024-01.com.example:other"))
        raise RuntimeError("boom")
    with store.read() as txn:
        assert txn.keys(Target) == [IQN]


def test_put_validates_and_read_txn_is_read_only(store):
    with pytest.raises(ValidationError, match="target 'bogus'"), store.write() as txn:
        txn.put(Target(iqn="bogus"))
    with store.read() as txn:
        assert txn.keys(Target) == []
        with pytest.raises(StateError, match="read-only"):
            txn.put(Target(iqn=IQN))


def test_store_persists_and_shares_env(tmp_path):
    d = str(tmp_path / "state")
    a = Store(d)
    b = Store(d)  # same process: shares the one LMDB environment
    with a.write() as txn:
        txn.put(Target(iqn=IQN))
    a.close()
    with b.read() as txn:  # still usable after the other handle closed
        assert txn.keys(Target) == [IQN]
    b.close()
    with pytest.raises(StateError, match="closed"), b.read():
        pass
    with Store(d) as c, c.read() as txn:
        assert txn.get(Target, IQN) is not None
        assert c.schema_version == store_mod.SCHEMA_VERSION


def test_newer_schema_refused(tmp_path, monkeypatch):
    d = str(tmp_path / "state")
    Store(d).close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 1)
    s = Store(d)
    with s._env.begin(write=True) as txn:
        txn.put(b"schema_version", b"99", db=s._meta)
    s.close()
    with pytest.raises(StateError, match="schema version 99"):
        Store(d)


def test_store_across_processes(tmp_path):
    d = str(tmp_path / "state")
    with Store(d) as s, s.write() as txn:
        txn.put(Backstore(name="parent", kind="file", path="/srv/p", size=512))
    code = textwrap.dedent(f"""
        from storaged.state import Store, Backstore, Target
        with Store({d!r}) as s:
            with s.read() as txn:
                assert txn.get(Backstore, "parent") is not None
            with s.write() as txn:
                txn.put(Target(iqn={IQN!r}, luns={{0: "parent"}}))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd(),
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
    with Store(d) as s, s.read() as txn:
        assert txn.get(Target, IQN).luns == {0: "parent"}


@dataclass
class _Note(Record):
    RECORD_KIND: ClassVar[str] = "testnote"
    name: str
    text: str = ""

    @property
    def key(self) -> str:
        return self.name


def test_registered_kinds_are_stored_and_not_config(store):
    with store.write() as txn:
        txn.put(_Note("n1", "hello"))
    assert import_config(store, {"backstores": [], "targets": []}) == []
    with store.read() as txn:
        assert txn.get(_Note, "n1").text == "hello"  # runtime state survives config import


# ------------------------------------------------------ export / import

def populate(store: Store) -> None:
    with store.write() as txn:
        txn.put(Settings(nop_interval=7))
        txn.put(Backstore(name="disk0", kind="file", path="/srv/d0.img", size=1 << 20))
        txn.put(Backstore(name="disk1", kind="block", path="/dev/sdz", size=0,
                          block_size=4096))
        txn.put(make_target())


def test_export_import_round_trip(tmp_path, store):
    populate(store)
    exported = export_config(store)
    assert exported["settings"]["nop_interval"] == 7
    assert SECRET in json.dumps(exported)  # a backup includes secrets
    with Store(str(tmp_path / "other")) as other:
        with other.write() as txn:
            txn.put(Target(iqn="iqn.2024-01.com.example:stale"))
        assert import_config(other, json.loads(json.dumps(exported))) == []
        assert export_config(other) == exported  # serials and WWNs preserved too


def test_import_with_errors_changes_nothing(store):
    populate(store)
    before = export_config(store)
    bad = json.loads(json.dumps(before))
    bad["backstores"].append({"name": "x", "kind": "file", "path": "rel", "size": 3})
    bad["targets"].append({"iqn": "iqn.2024-01.com.example:t2", "luns": {"3": "missing"}})
    bad["targets"].append({"iqn": "not-an-iqn"})
    bad["targets"][0]["acls"][INIT]["chap"]["password"] = "short"
    bad["bogus"] = 1
    errors = import_config(store, bad)
    text = "\n".join(errors)
    assert "unknown top-level key 'bogus'" in text
    assert "backstore 'x': path must be an absolute path" in text
    assert "backstore 'x': size 3 is not a multiple" in text
    assert ("target iqn.2024-01.com.example:t2: lun 3 refers to missing backstore 'missing'"
            in errors)
    assert "target not-an-iqn: invalid iSCSI name" in text
    assert f"target {IQN}: acl '{INIT}': chap: CHAP password is too short" in text
    assert len(errors) == 6
    assert export_config(store) == before


def test_import_reference_and_duplicate_checks(store):
    data = {
        "backstores": [
            {"name": "a", "kind": "file", "path": "/srv/a", "size": 512},
            {"name": "a", "kind": "file", "path": "/srv/b", "size": 512},
            {"name": "c", "kind": "file", "path": "/srv/a", "size": 512},
        ],
        "targets": [{"iqn": IQN}, {"iqn": IQN.upper()}],
    }
    errors = import_config(store, data)
    assert "backstore 'a' is defined twice" in errors
    assert "backstore 'c': path /srv/a is already used by backstore 'a'" in errors
    assert f"target {IQN} is defined twice" in errors
    assert import_config(store, {"version": 2})[0].startswith("unsupported config version")
    assert import_config(store, []) == ["config must be a JSON object"]


def test_import_replaces_config(store):
    populate(store)
    assert import_config(store, {"backstores": [
        {"name": "only", "kind": "file", "path": "/srv/only", "size": 4096}]}) == []
    with store.read() as txn:
        assert txn.keys(Backstore) == ["only"]
        assert txn.keys(Target) == []
        assert txn.settings() == Settings()


def test_save_config_atomic_and_private(tmp_path, store, monkeypatch):
    populate(store)
    path = tmp_path / "backup.json"
    old = os.umask(0o022)
    try:
        save_config(store, str(path))
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert load_config_file(str(path)) == export_config(store)

    good = path.read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("storaged.state.config.json.dump", explode)
    with pytest.raises(OSError, match="disk full"):
        save_config(store, str(path))
    assert path.read_text() == good  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.json", "state"]


def test_load_config_file_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValidationError, match="invalid JSON"):
        load_config_file(str(p))
