"""Tests for storaged.control: config operations, the control socket server and client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile

import pytest

from storaged.control import (
    ConfigError,
    ControlServerError,
    apply,
    call,
    daemon_running,
    describe,
    ops,
    parse_size,
    start_control_server,
    stop_control_server,
)
from storaged.control.backup import export_config
from storaged.control.server import peer_uid
from storaged.state import Backstore, Store, Target

IQN = "iqn.2024-01.com.example:t1"
INIT = "iqn.1993-08.org.debian:01:host1"
SECRET = "initiator-secret-1"
MUTUAL = "target-secret-22"


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"))
    yield s
    s.close()


@pytest.fixture
def sockdir():
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    d = tempfile.mkdtemp(prefix="sdctl")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def img(tmp_path, name="d0.img"):
    return str(tmp_path / name)


def setup_basic(store, tmp_path):
    apply(store, "backstore_create", {"name": "d0", "path": img(tmp_path), "size": "1M"})
    apply(store, "target_create", {"iqn": IQN})
    apply(store, "lun_add", {"iqn": IQN, "backstore": "d0"})


# ------------------------------------------------------------------ sizes

@pytest.mark.parametrize("text,value", [
    ("4096", 4096), (4096, 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30),
    ("1gb", 1 << 30), ("2k", 2048), ("1.5G", 3 << 29), (" 10 T ", 10 << 40),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "1X", "1.3", "G", "1iB", True])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


# ------------------------------------------------------------- backstores

def test_backstore_create_new_file_is_sparse_and_private(store, tmp_path):
    path = img(tmp_path)
    r = apply(store, "backstore_create", {"name": "d0", "path": path, "size": "64M"})
    st = os.stat(path)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20  # sparse
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert r["kind"] == "file" and r["size"] == 64 << 20 and r["used_by"] == []
    with store.read() as txn:
        b = txn.get(Backstore, "d0")
    assert (b.path, b.size, b.block_size, b.wce, b.read_only) == (path, 64 << 20, 512, True,
                                                                   False)


def test_backstore_create_existing_file(store, tmp_path):
    path = img(tmp_path)
    with open(path, "wb") as f:
        f.truncate(8192)
    r = apply(store, "backstore_create", {"name": "d0", "path": path, "block_size": 4096,
                                          "read_only": True, "wce": False})
    assert (r["size"], r["block_size"], r["read_only"], r["wce"]) == (8192, 4096, True, False)
    other = img(tmp_path, "other.img")
    with open(other, "wb") as f:
        f.truncate(8192)
    with pytest.raises(ConfigError, match="already exists with size 8192, not 16384"):
        apply(store, "backstore_create", {"name": "d1", "path": other, "size": 16384})
    empty = img(tmp_path, "empty.img")
    open(empty, "wb").close()
    with pytest.raises(ConfigError, match="is empty"):
        apply(store, "backstore_create", {"name": "d1", "path": empty})
    assert os.path.getsize(other) == 8192


@pytest.mark.parametrize("args,message", [
    ({"path": "/nonexistent-dir-xyz/a.img", "size": "1M"}, "directory /nonexistent-dir-xyz"),
    ({"path": "{tmp}/new.img"}, "size required to create"),
    ({"path": "{tmp}/new.img", "size": "1000"}, "not a multiple of the block size 512"),
    ({"path": "{tmp}/new.img", "size": "4608", "block_size": 4096}, "multiple of the block"),
    ({"path": "relative.img", "size": "1M"}, "must be absolute"),
    ({"path": "{tmp}", "size": "1M"}, "neither a regular file nor a block device"),
    ({"path": "{tmp}/new.img", "size": "1M", "kind": "block"}, "does not exist"),
    ({"path": "{tmp}/new.img", "size": "1M", "block_size": 1024}, "512 or 4096"),
    ({"path": "{tmp}/new.img", "size": "1M", "kind": "tape"}, "kind must be"),
    ({"path": "{tmp}/new.img", "size": "lots"}, "invalid size"),
])
def test_backstore_create_errors(store, tmp_path, args, message):
    args = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
            for k, v in args.items()}
    with pytest.raises(ConfigError, match=message):
        apply(store, "backstore_create", {"name": "d0", **args})
    assert not os.path.exists(tmp_path / "new.img")
    with store.read() as txn:
        assert txn.keys(Backstore) == []


def test_backstore_kind_mismatch_and_duplicates(store, tmp_path):
    path = img(tmp_path)
    apply(store, "backstore_create", {"name": "d0", "path": path, "size": "1M"})
    other = img(tmp_path, "other.img")
    with open(other, "wb") as f:
        f.truncate(4096)
    with pytest.raises(ConfigError, match="is a file, not a block device"):
        apply(store, "backstore_create", {"name": "d1", "path": other, "kind": "block"})
    with pytest.raises(ConfigError, match="already used by backstore 'd0'"):
        apply(store, "backstore_create", {"name": "d1", "path": path})
    with pytest.raises(ConfigError, match="backstore 'd0' already exists"):
        apply(store, "backstore_create", {"name": "d0", "path": img(tmp_path, "x.img"),
                                          "size": "1M"})
    with pytest.raises(ConfigError, match="invalid backstore name"):
        apply(store, "backstore_create", {"name": "a/b", "path": img(tmp_path, "y.img"),
                                          "size": "1M"})


def test_backstore_delete_refused_while_in_use(store, tmp_path):
    setup_basic(store, tmp_path)
    before = export_config(store)
    with pytest.raises(ConfigError, match=f"in use by target {IQN} lun 0"):
        apply(store, "backstore_delete", {"name": "d0"})
    assert export_config(store) == before
    apply(store, "lun_remove", {"iqn": IQN, "lun": 0})
    assert apply(store, "backstore_delete", {"name": "d0"}) == {"deleted": "d0"}
    assert os.path.exists(img(tmp_path))  # the data file is kept
    with pytest.raises(ConfigError, match="does not exist"):
        apply(store, "backstore_delete", {"name": "d0"})


# ----------------------------------------------------------- targets, LUNs

def test_target_create_uses_settings_default_portal(store):
    apply(store, "settings_set", {"values": {"default_portal": "10.1.2.3"}})
    t = apply(store, "target_create", {"iqn": IQN.upper()})
    assert t["iqn"] == IQN and t["portals"] == ["10.1.2.3:3260"]
    t2 = apply(store, "target_create", {"iqn": "iqn.2024-01.com.example:t2",
                                        "portals": ["[::]:3261", "0.0.0.0"]})
    assert t2["portals"] == ["[::]:3261", "0.0.0.0:3260"]
    with pytest.raises(ConfigError, match="already exists"):
        apply(store, "target_create", {"iqn": IQN})
    with pytest.raises(ConfigError, match="invalid iqn name"):
        apply(store, "target_create", {"iqn": "iqn.2024-01.bad_domain"})
    assert apply(store, "target_delete", {"iqn": IQN}) == {"deleted": IQN}
    with pytest.raises(ConfigError, match=f"target {IQN} does not exist"):
        apply(store, "target_delete", {"iqn": IQN})


def test_lun_ids(store, tmp_path):
    apply(store, "target_create", {"iqn": IQN})
    for name in ("a", "b", "c", "d"):
        apply(store, "backstore_create", {"name": name, "path": img(tmp_path, name),
                                          "size": 4096})
    assert apply(store, "lun_add", {"iqn": IQN, "backstore": "a"})["lun"] == 0
    assert apply(store, "lun_add", {"iqn": IQN, "backstore": "b"})["lun"] == 1
    apply(store, "lun_remove", {"iqn": IQN, "lun": 0})
    assert apply(store, "lun_add", {"iqn": IQN, "backstore": "c"})["lun"] == 0
    with pytest.raises(ConfigError, match="lun 1 of .* already used by backstore 'b'"):
        apply(store, "lun_add", {"iqn": IQN, "backstore": "d", "lun": 1})
    with pytest.raises(ConfigError, match="'b' is already lun 1"):
        apply(store, "lun_add", {"iqn": IQN, "backstore": "b"})
    with pytest.raises(ConfigError, match="backstore 'zz' does not exist"):
        apply(store, "lun_add", {"iqn": IQN, "backstore": "zz"})
    with pytest.raises(ConfigError, match=r"lun must be 0\.\.16383"):
        apply(store, "lun_add", {"iqn": IQN, "backstore": "d", "lun": 16384})
    with pytest.raises(ConfigError, match="has no lun 7"):
        apply(store, "lun_remove", {"iqn": IQN, "lun": 7})
    assert apply(store, "lun_add", {"iqn": IQN, "backstore": "d", "lun": 16383})["lun"] == 16383
    with store.read() as txn:
        assert txn.get(Target, IQN).luns == {0: "c", 1: "b", 16383: "d"}


def test_portals_and_open_access(store):
    apply(store, "target_create", {"iqn": IQN, "portals": ["10.0.0.1:3260"]})
    t = apply(store, "portal_add", {"iqn": IQN, "portal": "[fe80::1]"})
    assert t["portals"] == ["10.0.0.1:3260", "[fe80::1]:3260"]
    with pytest.raises(ConfigError, match="already has portal 10.0.0.1:3260"):
        apply(store, "portal_add", {"iqn": IQN, "portal": "10.0.0.1"})
    with pytest.raises(ConfigError, match="brackets"):
        apply(store, "portal_add", {"iqn": IQN, "portal": "fe80::2:3260"})
    assert apply(store, "portal_remove", {"iqn": IQN, "portal": "10.0.0.1"})["portals"] == [
        "[fe80::1]:3260"]
    with pytest.raises(ConfigError, match="has no portal"):
        apply(store, "portal_remove", {"iqn": IQN, "portal": "10.0.0.1"})
    assert apply(store, "target_open", {"iqn": IQN, "open": True})["open_access"] is True
    assert apply(store, "target_open", {"iqn": IQN, "open": False})["open_access"] is False
    with pytest.raises(ConfigError, match="open must be true or false"):
        apply(store, "target_open", {"iqn": IQN, "open": "yes"})


def test_acl_and_chap(store):
    apply(store, "target_create", {"iqn": IQN})
    with pytest.raises(ConfigError, match="no ACL for .*acl add"):
        apply(store, "chap_set", {"iqn": IQN, "user": "u", "password": SECRET,
                                  "initiator": INIT})
    apply(store, "acl_add", {"iqn": IQN, "initiator": INIT.upper()})
    with pytest.raises(ConfigError, match="already has an ACL"):
        apply(store, "acl_add", {"iqn": IQN, "initiator": INIT})
    t = apply(store, "chap_set", {"iqn": IQN, "user": "alice", "password": SECRET,
                                  "initiator": INIT})
    assert t["acls"] == [{"initiator": INIT, "chap": "user=alice"}]
    t = apply(store, "chap_set", {"iqn": IQN, "user": "bob", "password": SECRET,
                                  "mutual_user": "tgt", "mutual_password": MUTUAL})
    assert t["chap"] == "user=bob (mutual: tgt)"
    with pytest.raises(ConfigError, match="must differ"):
        apply(store, "chap_set", {"iqn": IQN, "user": "bob", "password": SECRET,
                                  "mutual_user": "tgt", "mutual_password": SECRET})
    with store.read() as txn:
        target = txn.get(Target, IQN)
    assert target.chap.password == SECRET and target.acls[INIT].chap.user == "alice"
    assert apply(store, "chap_clear", {"iqn": IQN, "initiator": INIT})["acls"][0]["chap"] is None
    assert apply(store, "chap_clear", {"iqn": IQN})["chap"] is None
    apply(store, "acl_remove", {"iqn": IQN, "initiator": INIT})
    with pytest.raises(ConfigError, match="has no ACL"):
        apply(store, "acl_remove", {"iqn": IQN, "initiator": INIT})


def test_params_all_or_nothing(store):
    apply(store, "target_create", {"iqn": IQN})
    t = apply(store, "params_set", {"iqn": IQN, "params": {
        "maxburstlength": "1048576", "queue_depth": "64", "DataDigest": "crc32c"}})
    assert t["params"] == {"DataDigest": "CRC32C", "MaxBurstLength": "1048576"}
    assert t["queue_depth"] == 64
    with pytest.raises(ConfigError, match="unknown iSCSI parameter 'Bogus'"):
        apply(store, "params_set", {"iqn": IQN, "params": {"MaxBurstLength": "4096",
                                                           "Bogus": "1"}})
    with pytest.raises(ConfigError, match="must not exceed MaxBurstLength"):
        apply(store, "param_set", {"iqn": IQN, "key": "FirstBurstLength", "value": "2097152"})
    with pytest.raises(ConfigError, match=r"queue_depth must be 1\.\.1024"):
        apply(store, "param_set", {"iqn": IQN, "key": "queue_depth", "value": 0})
    with store.read() as txn:
        target = txn.get(Target, IQN)
    assert target.params["MaxBurstLength"] == "1048576" and target.queue_depth == 64
    t = apply(store, "params_set", {"iqn": IQN, "params": {"MaxBurstLength": "",
                                                           "queue_depth": None}})
    assert t["params"] == {"DataDigest": "CRC32C"} and t["queue_depth"] == 128


def test_settings_set(store):
    assert apply(store, "settings_set", {"values": {"nop_interval": "5"}})["nop_interval"] == 5
    with pytest.raises(ConfigError, match="unknown setting"):
        apply(store, "settings_set", {"values": {"colour": "red"}})
    with pytest.raises(ConfigError, match=r"nop_timeout must be 1\.\.3600"):
        apply(store, "settings_set", {"values": {"nop_timeout": "0"}})


def test_describe_redacts_secrets(store, tmp_path):
    setup_basic(store, tmp_path)
    apply(store, "acl_add", {"iqn": IQN, "initiator": INIT})
    apply(store, "chap_set", {"iqn": IQN, "user": "alice", "password": SECRET,
                              "mutual_user": "tgt", "mutual_password": MUTUAL,
                              "initiator": INIT})
    apply(store, "chap_set", {"iqn": IQN, "user": "bob", "password": MUTUAL + "x"})
    d = describe(store)
    text = json.dumps(d)
    assert SECRET not in text and MUTUAL not in text and "password" not in text
    t = d["targets"][0]
    assert t["chap"] == "user=bob"
    assert t["acls"] == [{"initiator": INIT, "chap": "user=alice (mutual: tgt)"}]
    assert t["luns"] == [{"lun": 0, "backstore": "d0", "path": img(tmp_path)}]
    assert d["backstores"][0]["used_by"] == [{"iqn": IQN, "lun": 0}]
    assert SECRET in json.dumps(apply(store, "export_config", {}))  # the deliberate backup


def test_apply_rejects_unknown_ops_and_bad_args(store):
    with pytest.raises(ConfigError, match="unknown operation 'frobnicate'"):
        apply(store, "frobnicate", {})
    with pytest.raises(ConfigError, match="lun_add: missing a required argument: 'iqn'"):
        apply(store, "lun_add", {"backstore": "x"})
    with pytest.raises(ConfigError, match="unexpected keyword argument 'colour'"):
        apply(store, "target_create", {"iqn": IQN, "colour": "red"})
    with pytest.raises(ConfigError, match="arguments must be an object"):
        apply(store, "target_create", ["x"])


def test_import_op_lists_all_errors(store, tmp_path):
    setup_basic(store, tmp_path)
    before = export_config(store)
    bad = {"backstores": [], "targets": [{"iqn": IQN, "luns": {"0": "d0", "1": "d9"}}]}
    with pytest.raises(ConfigError) as exc:
        apply(store, "import_config", {"data": bad})
    assert exc.value.errors == [
        f"target {IQN}: lun 0 refers to missing backstore 'd0'",
        f"target {IQN}: lun 1 refers to missing backstore 'd9'"]
    assert str(exc.value).startswith("config has 2 errors:")
    assert export_config(store) == before


# ---------------------------------------------------------- control socket

def run_server(store, path, coro_fn, on_change=None, extra_ops=None):
    """Start a control server, run ``coro_fn(server)`` in the loop, then stop it."""
    changes: list[str] = []

    async def default_on_change():
        await asyncio.sleep(0)
        changes.append("changed")

    async def main():
        server = await start_control_server(path, store, on_change or default_on_change,
                                            extra_ops)
        try:
            return await coro_fn(server)
        finally:
            await stop_control_server(server, path)

    return asyncio.run(main()), changes


def client(*args, **kwargs):
    return asyncio.to_thread(call, *args, **kwargs)


def test_server_round_trip_and_on_change(store, sockdir, tmp_path):
    path = os.path.join(sockdir, "control.sock")

    async def scenario(server):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert await asyncio.to_thread(daemon_running, path)
        r = await client(path, "target_create", {"iqn": IQN, "portals": ["127.0.0.1"]})
        assert r["portals"] == ["127.0.0.1:3260"]
        d = await client(path, "describe", {})
        assert [t["iqn"] for t in d["targets"]] == [IQN]
        with pytest.raises(ConfigError, match="already exists"):
            await client(path, "target_create", {"iqn": IQN})
        with pytest.raises(ConfigError, match="unknown operation"):
            await client(path, "nope", {})
        return await client(path, "ping", {})

    pong, changes = run_server(store, path, scenario)
    assert pong["pid"] == os.getpid()
    assert changes == ["changed"]  # one successful mutation; describe/failures don't count
    assert not os.path.exists(path)
    assert not daemon_running(path)
    with store.read() as txn:
        assert txn.keys(Target) == [IQN]


def test_server_sync_on_change_and_extra_ops(store, sockdir):
    path = os.path.join(sockdir, "c.sock")
    calls = []

    async def sessions(args):
        await asyncio.sleep(0)
        return {"sessions": [], "filter": args.get("iqn")}

    def refuse(args):
        raise ConfigError("target is busy")

    extra = {"status": lambda args: {"up": True}, "sessions": sessions, "busy": refuse}

    async def scenario(server):
        assert await client(path, "status") == {"up": True}
        assert await client(path, "sessions", {"iqn": IQN}) == {"sessions": [], "filter": IQN}
        with pytest.raises(ConfigError, match="target is busy"):
            await client(path, "busy")
        await client(path, "target_create", {"iqn": IQN})

    run_server(store, path, scenario, on_change=lambda: calls.append(1), extra_ops=extra)
    assert calls == [1]


def test_server_reports_failed_apply(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    async def broken():
        raise RuntimeError("portal bind failed")

    async def scenario(server):
        with pytest.raises(ConfigError, match="change saved, but the daemon failed to apply "
                                              "it: portal bind failed"):
            await client(path, "target_create", {"iqn": IQN})

    run_server(store, path, scenario, on_change=broken)


def test_server_survives_garbage_and_keeps_connection(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    def raw_session():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            f = s.makefile("rwb")
            out = []
            for line in (b"this is not json\n", b'["op"]\n', b"\n",
                         b'{"op": "target_create", "args": "x"}\n',
                         b'{"op": "describe"}\n'):
                f.write(line)
                f.flush()
                if line.strip():
                    out.append(json.loads(f.readline()))
            return out

    async def scenario(server):
        return await asyncio.to_thread(raw_session)

    out, changes = run_server(store, path, scenario)
    assert out[0]["ok"] is False and "not JSON" in out[0]["error"]
    assert out[1]["ok"] is False and "expected" in out[1]["error"]
    assert out[2] == {"ok": False, "error": "target_create: arguments must be an object"}
    assert out[3]["ok"] is True and out[3]["result"]["targets"] == []
    assert changes == []


def test_stale_socket_replaced_live_socket_refused(store, sockdir):
    path = os.path.join(sockdir, "c.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves a socket file nobody listens on
    assert os.path.exists(path) and not daemon_running(path)

    async def scenario(server):
        assert await asyncio.to_thread(daemon_running, path)
        with pytest.raises(ControlServerError, match="already listening"):
            await start_control_server(path, store, lambda: None)
        return await client(path, "ping")

    pong, _ = run_server(store, path, scenario)
    assert pong["pong"] is True


def test_regular_file_at_socket_path_refused(store, sockdir):
    path = os.path.join(sockdir, "c.sock")
    with open(path, "w") as f:
        f.write("keep me")

    async def main():
        await start_control_server(path, store, lambda: None)

    with pytest.raises(ControlServerError, match="not a socket"):
        asyncio.run(main())
    with open(path) as f:
        assert f.read() == "keep me"


def test_peer_uid_and_unreachable_daemon(sockdir):
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.geteuid()
    with pytest.raises(ConfigError, match="cannot reach the storaged daemon"):
        call(os.path.join(sockdir, "missing.sock"), "ping")


def test_ops_compose_in_one_transaction(store):
    """Ops called directly on a Txn: a later failure aborts the earlier changes too."""
    with pytest.raises(ConfigError, match="backstore 'nope' does not exist"), \
            store.write() as txn:
        ops.target_create(txn, IQN)
        ops.lun_add(txn, IQN, "nope")
    with store.read() as txn:
        assert txn.keys(Target) == []


def _block_device():
    """An existing block device we may open read-only (an unattached loop device is fine)."""
    for dev in ("/dev/loop7", "/dev/loop0"):
        try:
            if stat.S_ISBLK(os.stat(dev).st_mode):
                os.close(os.open(dev, os.O_RDONLY))
                return dev
        except OSError:
            continue
    return None


def test_backstore_block_device_detected(store, tmp_path):
    dev = _block_device()
    if dev is None:
        pytest.skip("no openable block device")
    r = apply(store, "backstore_create", {"name": "b0", "path": dev})
    assert (r["kind"], r["size"]) == ("block", 0)  # 0 = whole device
    apply(store, "backstore_delete", {"name": "b0"})
    with pytest.raises(ConfigError, match=f"{dev} is a block device, not a file"):
        apply(store, "backstore_create", {"name": "b1", "path": dev, "kind": "file"})
    with pytest.raises(ConfigError, match="exceeds the size of"):
        apply(store, "backstore_create", {"name": "b1", "path": dev, "size": "1P"})
