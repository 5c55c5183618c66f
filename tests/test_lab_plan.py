"""The lab's sans-IO parts: names, addresses, the plan and its undo order, the timeline,
the writer's payloads and the checker's log reading."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from storaged.lab.check import load_acks
from storaged.lab.plan import (
    LabSpec,
    default_lab_id,
    device_for,
    plan_down,
    plan_up,
    portal_addresses,
)
from storaged.lab.records import LabRecord, LabResource
from storaged.lab.timeline import Timeline
from storaged.lab.writer import SIZE, payload
from storaged.state import ValidationError


def test_names_are_prefixed_short_and_distinct(tmp_path):
    spec = LabSpec(str(tmp_path / "a"), storage=2, nodes=3, lab_id="lab12345")
    names = [n.netns for n in spec.all_nodes] + [spec.switch_netns]
    assert all(n.startswith("lab12345-") and len(n) <= 15 for n in names)
    assert len(set(names)) == len(names) == 6
    addrs = [ipaddress.ip_address(n.address) for n in spec.all_nodes]
    assert len(set(addrs)) == 5 and all(a.is_private for a in addrs)
    assert spec.vip not in {n.address for n in spec.all_nodes}
    # a default id is stable per directory and differs between directories
    assert default_lab_id(str(tmp_path / "a")) == default_lab_id(str(tmp_path / "a"))
    assert default_lab_id(str(tmp_path / "a")) != default_lab_id(str(tmp_path / "b"))


@pytest.mark.parametrize("kw, msg", [
    ({"lab_id": "Lab-1"}, "lowercase letter"),
    ({"lab_id": "abcdefghijk"}, "lowercase letter"),
    ({"subnet": "8.8.8.0/24"}, "not a private"),
    ({"subnet": "10.0.0.0/28"}, "at least a /26"),
    ({"nodes": 1}, "2 to 8 cluster nodes"),
    ({"storage": 0}, "1 to 4 storage nodes"),
])
def test_bad_shapes_are_named(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        LabSpec(str(tmp_path), **kw)


def test_plan_up_builds_every_piece(tmp_path):
    spec = LabSpec(str(tmp_path), storage=2, nodes=2, lab_id="labx")
    steps = plan_up(spec, "pw")
    kinds = [s.kind for s in steps]
    assert kinds.count("netns") == 5
    spawns = [s.label for s in steps if s.kind == "spawn"]
    assert spawns == ["s1/serve", "s2/serve", "c1/mount", "c2/mount"]
    text = [" ".join(s.argv) for s in steps]
    for s in spec.storage_nodes:
        for c in spec.cluster_nodes:
            assert any(f"--dir {spec.node_dir(s)} fence map {c.name} --initiator {c.iqn}" in t
                       for t in text)
    # two nodes: two_node quorum and a fence delay on node 1 so exactly one side wins
    assert sum("--two-node" in t and "cluster init lab " in t for t in text) == 2
    assert sum("--node-delay-ms=1=" in t for t in text) == 2
    # every long-running process runs inside its node's namespace only
    for s in steps:
        if s.kind == "spawn":
            assert s.argv[:2] == ("nsenter", f"--net=/run/netns/{spec.node(s.node).netns}")
    # portals: the node's own and the floating one; every mount goes through the latter
    assert portal_addresses(spec, spec.storage_nodes[1]) == ["10.250.0.12:3260",
                                                             "10.250.0.10:3260"]
    assert device_for(spec, spec.cluster_nodes[0]) == (
        "iscsi://10.250.0.10:3260/iqn.2026-11.org.storaged.lab:shared/0"
        "?initiator=iqn.2026-11.org.storaged.lab:c1")
    # the storage nodes: a cluster of their own (two-node), the same vip on each, the
    # backstore shared and s2 given s1's LU identity before its daemon starts
    for s in spec.storage_nodes:
        d = spec.node_dir(s)
        init = [t for t in text if f"--dir {d} cluster init labstore --id={s.index}" in t]
        assert len(init) == 1 and "--two-node" in init[0] and "--fencer=command" in init[0]
        assert "--node=1=10.250.0.11:7870 --node=2=10.250.0.12:7870" in init[0]
        assert any(f"--dir {d} vip add 10.250.0.10/24 --dev eth0 --node-preference 1,2" in t
                   for t in text)
        assert any(f"--dir {d} backstore create shared" in t and "--shared" in t
                   for t in text)
    ident = [i for i, t in enumerate(text) if "storaged.lab.identity" in t]
    assert len(ident) == 1 and text[ident[0]].endswith(
        f"{spec.node_dir('s1')} {spec.node_dir('s2')} shared")
    s2_serve = next(i for i, st in enumerate(steps) if st.label == "s2/serve")
    assert ident[0] < s2_serve  # s2's daemon starts with s1's identity

    fence = next(s for s in steps if s.path == spec.storage_fence_script)
    assert 'ip -n labx-sw link set "s$1" down' in fence.stdin
    assert kinds.index("wait_vip") > kinds.index("wait_socket")
    # waits come after the spawns they wait for
    assert kinds.index("wait_mount") > max(i for i, k in enumerate(kinds) if k == "spawn")


def test_plan_down_order(tmp_path):
    d = str(tmp_path)
    res = [LabResource(1, "netns", "labx-sw"), LabResource(2, "dir", f"{d}/c1"),
           LabResource(3, "dir", f"{d}/c1/mnt"), LabResource(4, "file", f"{d}/shared.img"),
           LabResource(5, "proc", "s1/serve", pid=10), LabResource(6, "mount", f"{d}/c1/mnt"),
           LabResource(7, "proc", "c1/mount", pid=11), LabResource(8, "netns", "labx-c1")]
    steps = plan_down(res, ["labx-s9", "other-c1"], "labx")
    kinds = [s.kind for s in steps]
    assert kinds == ["umount", "kill", "kill", "del_netns", "del_netns", "del_netns",
                     "rm", "rm", "rm"]
    assert [s.label for s in steps if s.kind == "kill"] == ["c1/mount", "s1/serve"]
    # an unrecorded namespace with the lab's prefix is swept; another lab's is not
    assert [s.path for s in steps if s.kind == "del_netns"] == ["labx-s9", "labx-c1", "labx-sw"]
    rms = [s.path for s in steps if s.kind == "rm"]
    assert rms.index(f"{d}/c1/mnt") < rms.index(f"{d}/c1")


def test_lab_records_validate():
    LabRecord("lab1", 2, 3, "10.250.0.0/24").validate()
    with pytest.raises(ValidationError, match="lab id"):
        LabRecord("1lab", 2, 3, "10.250.0.0/24").validate()
    with pytest.raises(ValidationError, match="resource kind"):
        LabResource(1, "veth", "x").validate()
    rec = LabResource(3, "proc", "c1/mount", pid=42, start_ticks=7)
    assert LabResource.from_dict(rec.to_dict()) == rec and rec.key == "00000003"


def test_lu_identity_copied_between_storage_nodes(tmp_path):
    from storaged.lab.identity import copy_identity, main
    from storaged.state import Store
    from storaged.state.records import Backstore

    a, b = str(tmp_path / "s1"), str(tmp_path / "s2")
    for d in (a, b):
        os.makedirs(d)
        st = Store(d)
        with st.write() as txn:
            txn.put(Backstore(name="shared", kind="file", path=str(tmp_path / "img"),
                              size=1 << 20))
        st.close()

    def ident(d):
        st = Store(d)
        with st.read() as txn:
            r = txn.get(Backstore, "shared")
        st.close()
        return r.wwn, r.serial
    assert ident(a) != ident(b)  # random per node until copied
    assert copy_identity(a, b, "shared") == ident(a) == ident(b)
    assert main([a, b, "nosuch"]) == 1 and main([a]) == 2


def test_timeline_figures():
    out: list[str] = []
    tl = Timeline(1000.0, out.append)
    assert tl.mark("cut", "c3", wall=1001.25) == pytest.approx(1.25)
    tl.figure("fence", 2.0004, "cut to fenced")
    tl.figure("portal failover", None, "needs storaged vip")
    assert "+  1.250s  cut: c3" in out[0]
    lines = tl.render_figures()
    assert lines[0].startswith("figure fence") and "2.000 s" in lines[0]
    assert "n/a" in lines[1] and "needs storaged vip" in lines[1]


def test_writer_payloads_and_ack_logs(tmp_path):
    a, b = payload("c1", 1), payload("c1", 2)
    assert len(a) == SIZE and a != b and a == payload("c1", 1) and a != payload("c2", 1)
    log = tmp_path / "c1.jsonl"
    log.write_text(json.dumps({"node": "c1", "i": 1, "file": "w-c1/rec-000001",
                               "sha256": "x", "t": 1.0}) + "\n"
                   + json.dumps({"node": "c1", "i": 2, "error": "EIO", "t": 2.0}) + "\n"
                   + '{"node": "c1", "i": 3, "fi')  # torn: never acknowledged
    acks, errors = load_acks(str(tmp_path))
    assert [a["i"] for a in acks] == [1] and [e["i"] for e in errors] == [2]
    assert os.path.basename(acks[0]["file"]) == "rec-000001"
