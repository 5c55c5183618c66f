"""Floating addresses without a kernel: the sans-IO core, ARP frames, records and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from storaged.cli import cli
from storaged.state import ValidationError
from storaged.vip.arp import garp_frame, parse_arp, parse_mac
from storaged.vip.core import (
    ADD_RETRY,
    Acquire,
    AddAddress,
    Announce,
    Release,
    RemoveAddress,
    Serve,
    Unserve,
    VipCore,
)
from storaged.vip.records import FloatingAddress
from storaged.vip.service import lease_time

VIP = FloatingAddress("10.77.0.100/24", "eth0", preference=[1, 2, 3])


def kinds(core: VipCore) -> list[str]:
    out = [type(a).__name__ for a in core.actions]
    core.actions.clear()
    return out


def quorate_core(node: int, members=(1, 2, 3), vip: FloatingAddress = VIP) -> VipCore:
    core = VipCore(node)
    core.configure([vip], 0.0)
    core.health(True, True, 0.0, members)
    return core


# ------------------------------------------------------------------ records

def test_record_normalizes_and_rejects_bad_input():
    v = FloatingAddress(" 10.1.2.3/24", "eth0")
    v.validate()
    assert (v.address, v.ip, v.prefixlen, v.key, v.lock_name) == \
        ("10.1.2.3/24", "10.1.2.3", 24, "10.1.2.3", "vip:10.1.2.3")
    for address, why in (("10.1.2.3", "ADDRESS/PREFIX"), ("10.1.2.3/33", "invalid"),
                         ("fd00::1/64", "only IPv4"), ("224.0.0.5/24", "unicast"),
                         ("10.1.2.255/24", "unicast"), ("127.0.0.2/8", "unicast")):
        with pytest.raises(ValidationError, match=why):
            FloatingAddress(address, "eth0").validate()
    with pytest.raises(ValidationError, match="interface name"):
        FloatingAddress("10.1.2.3/24", "a" * 16).validate()
    with pytest.raises(ValidationError, match="twice"):
        FloatingAddress("10.1.2.3/24", "eth0", preference=[1, 1]).validate()
    with pytest.raises(ValidationError, match="garp_count"):
        FloatingAddress("10.1.2.3/24", "eth0", garp_count=-1).validate()
    assert VIP.rank(2) == 1 and VIP.rank(9) == 3


# ---------------------------------------------------------------------- ARP

def test_garp_frame_layout():
    # RFC 826 layout, RFC 5227 announcement: sender IP = target IP, target MAC zero.
    f = garp_frame(parse_mac("02:00:00:00:00:01"), "10.77.0.100")
    assert f == bytes.fromhex(
        "ffffffffffff" "020000000001" "0806"          # Ethernet: broadcast, ARP
        "0001" "0800" "06" "04" "0001"                # Ethernet/IPv4, request
        "020000000001" "0a4d0064"                     # sender MAC, IP
        "000000000000" "0a4d0064") + bytes(18)        # target MAC, IP; padded to 60
    a = parse_arp(f)
    assert a is not None and a["gratuitous"] and a["spa"] == a["tpa"] == "10.77.0.100"
    assert a["sha"] == "02:00:00:00:00:01" and a["op"] == 1
    assert parse_arp(f[:12] + b"\x08\x00" + f[14:]) is None  # not ARP


# --------------------------------------------------------------------- core

def test_preferred_node_asks_first_the_second_later_the_third_not_at_all():
    c1, c2, c3 = (quorate_core(n) for n in (1, 2, 3))
    assert kinds(c1) == ["Acquire"]
    assert kinds(c2) == [] and kinds(c3) == []
    c2.tick(0.49)
    assert kinds(c2) == []
    c2.tick(0.5)
    assert kinds(c2) == ["Acquire"]
    c3.tick(10.0)
    assert kinds(c3) == [], "a third node queues only when it is among the best two"


def test_taking_an_address_adds_serves_and_announces_five_times():
    c = quorate_core(1)
    [acq] = c.actions
    assert acq == Acquire("10.77.0.100", "vip:10.77.0.100", "default")
    c.actions.clear()
    c.granted("10.77.0.100", 1.0)
    assert c.actions == [AddAddress(VIP), Serve("10.77.0.100"), Announce(VIP)]
    c.actions.clear()
    t, sent = 1.0, 1
    while t < 5.0:
        t += 0.05
        c.tick(t)
        sent += len([a for a in c.actions if isinstance(a, Announce)])
        c.actions.clear()
    assert sent == 5
    assert c.state("10.77.0.100") == "held" and c.held() == ["10.77.0.100"]


def test_reannounce_period():
    v = FloatingAddress("10.77.0.100/24", "eth0", garp_count=1, reannounce_s=10)
    c = quorate_core(1, vip=v)
    c.granted(v.key, 0.0)
    assert kinds(c).count("Announce") == 1
    c.tick(9.9)
    assert kinds(c) == []
    c.tick(10.0)
    assert kinds(c) == ["Announce"]


def test_no_quorum_drops_the_address_and_quorum_brings_it_back():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.health(False, False, 1.0, (1,))
    assert c.actions == [RemoveAddress(VIP), Unserve(VIP.ip)]
    assert c.state(VIP.key) == "no-quorum"
    c.actions.clear()
    c.health(True, True, 2.0, (1, 2))  # lock still held (DLM policy freeze/ignore)
    assert kinds(c)[:2] == ["AddAddress", "Serve"]


def test_stale_lease_drops_the_address_while_the_view_is_still_quorate():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.health(True, False, 1.0, (1, 2, 3))
    assert kinds(c) == ["RemoveAddress", "Unserve"]
    assert c.state(VIP.key) == "lease-expired"


def test_lost_lock_drops_and_asks_again_after_the_retry():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.lost(VIP.key, 1.0, retry=1.0)
    assert kinds(c) == ["RemoveAddress", "Unserve"]
    c.tick(1.5)
    assert kinds(c) == []
    c.tick(2.0)
    assert kinds(c) == ["Acquire"]


def test_clean_shutdown_removes_before_it_releases():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.shutdown(1.0)
    assert c.actions == [RemoveAddress(VIP), Unserve(VIP.ip), Release(VIP.key)]
    c.actions.clear()
    c.tick(5.0)
    assert c.actions == [] and c.state(VIP.key) == "stopped"


def test_deleting_the_address_gives_it_up():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.configure([], 1.0)
    assert c.actions == [RemoveAddress(VIP), Unserve(VIP.ip), Release(VIP.key)]
    assert c.entries == {}


def test_kernel_refusal_releases_the_lock_and_retries_later():
    c = quorate_core(1)
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.add_failed(VIP.key, "no interface 'eth0'", 0.0)
    assert c.actions == [Unserve(VIP.ip), Release(VIP.key)]
    assert c.state(VIP.key) == "failed"
    c.actions.clear()
    c.tick(ADD_RETRY - 0.1)
    assert kinds(c) == []
    c.tick(ADD_RETRY)
    assert kinds(c) == ["Acquire"]


def test_waiting_node_stands_down_when_better_nodes_join_but_a_holder_stays():
    c3 = quorate_core(3, members=(2, 3))
    c3.tick(0.5)
    assert kinds(c3) == ["Acquire"]
    c3.health(True, True, 1.0, (1, 2, 3))
    assert kinds(c3) == ["Release"]
    # A holder keeps the address when preferred nodes come back (no failback).
    h = quorate_core(3, members=(3,))
    h.granted(VIP.key, 0.0)
    h.actions.clear()
    h.health(True, True, 1.0, (1, 2, 3))
    assert "RemoveAddress" not in kinds(h) and h.held() == [VIP.key]


def test_granted_while_not_eligible_waits_for_quorum():
    c = quorate_core(1)
    c.health(False, False, 0.5, (1,))
    c.actions.clear()
    c.granted(VIP.key, 1.0)
    assert kinds(c) == []
    c.health(True, True, 2.0, (1, 2))
    assert kinds(c)[:2] == ["AddAddress", "Serve"]


@given(st.lists(st.tuples(st.sampled_from(["health", "granted", "lost", "tick", "fail",
                                           "config"]),
                          st.booleans(), st.booleans(), st.integers(1, 3)), max_size=60))
def test_address_is_up_only_while_held_and_eligible(events):
    """Random inputs: the address is on the interface only when this node holds the lock
    and is quorate with a fresh lease; adds and removes alternate; a release never comes
    while the address is still up."""
    c = VipCore(1)
    now = 0.0
    up = False
    c.configure([VIP], now)
    for kind, a, b, n in events:
        now += 0.1 * n
        if kind == "health":
            c.health(a, b, now, tuple(range(1, n + 1)))
        elif kind == "granted":
            c.granted(VIP.key, now)
        elif kind == "lost":
            c.lost(VIP.key, now)
        elif kind == "tick":
            c.tick(now)
        elif kind == "fail":
            if up:  # the shell reports a refusal right after an AddAddress
                c.add_failed(VIP.key, "refused", now)
                up = False
        else:
            c.configure([VIP] if a else [], now)
        for act in c.actions:
            if isinstance(act, AddAddress):
                assert not up
                up = True
            elif isinstance(act, RemoveAddress):
                assert up
                up = False
            elif isinstance(act, Release):
                assert not up
        c.actions.clear()
        e = c.entries.get(VIP.key)
        if up:
            assert e is not None and e.lock == "held" and c.eligible
        assert up == (e is not None and e.up)


def test_lease_is_shorter_than_the_token_by_two_heartbeats():
    assert lease_time(3.0, 0.6) == pytest.approx(1.8)
    assert lease_time(1.0, 0.2) == pytest.approx(0.6)
    assert lease_time(1.0, 0.5) == pytest.approx(0.5)  # never under half the token


# ---------------------------------------------------------------------- CLI

def test_cli_add_ls_del_offline(tmp_path):
    state = str(tmp_path / "state")
    runner = CliRunner()

    def run(*args, code=0):
        r = runner.invoke(cli, ["--dir", state, *args])
        assert r.exit_code == code, (r.output, r.exception)
        return r

    r = run("vip", "add", "10.77.0.100/24", "--dev", "eth0", "--node-preference", "2,1")
    assert "Floating address 10.77.0.100/24 on eth0 added." in r.output
    r = run("vip", "add", "10.77.0.100/16", "--dev", "eth1", code=1)
    assert "already exists" in r.output
    r = run("vip", "add", "10.77.0.101", "--dev", "eth0", code=1)
    assert "ADDRESS/PREFIX" in r.output
    r = run("vip", "add", "10.77.0.101/24", "--dev", "eth0", "--node-preference", "a", code=2)
    assert "node ids" in r.output
    r = run("vip", "ls", "--json")
    data = json.loads(r.output)
    assert not data["live"] and data["vips"][0]["preference"] == [2, 1]
    assert "(daemon not running" in run("vip", "ls").output
    run("config", "save", str(tmp_path / "saved.json"))
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["vips"][0]["address"] == "10.77.0.100/24"
    assert "10.77.0.100/24 dev eth0 preference 2,1" in run("ls").output
    r = run("vip", "del", "10.77.0.101", code=1)
    assert "no floating address 10.77.0.101" in r.output
    assert "deleted" in run("vip", "del", "10.77.0.100/24").output
    assert "No floating addresses." in run("vip", "ls").output


def test_after_a_lease_gap_the_same_view_must_settle_before_retaking():
    """A partition healed before this node saw a view change: the others may have removed
    it and given the address away; it waits ``settle`` (or a new view) before re-adding."""
    c = VipCore(1, settle=2.2)
    c.configure([VIP], 0.0)
    c.health(True, True, 0.0, (1, 2, 3), (1, 1))
    c.granted(VIP.key, 0.0)
    c.actions.clear()
    c.health(True, False, 1.0, (1, 2, 3), (1, 1))
    assert kinds(c) == ["RemoveAddress", "Unserve"]
    c.health(True, True, 1.5, (1, 2, 3), (1, 1))   # heard again, same view
    c.health(True, True, 3.0, (1, 2, 3), (1, 1))
    assert kinds(c) == [] and c.state(VIP.key) == "lease-expired"
    c.health(True, True, 3.7, (1, 2, 3), (1, 1))   # settled: nobody removed us
    assert kinds(c)[:2] == ["AddAddress", "Serve"]
    # A new quorate view with this node in it ends the doubt at once.
    c.health(True, False, 4.0, (1, 2, 3), (1, 1))
    c.actions.clear()
    c.health(True, True, 4.1, (1, 2, 3), (2, 1))
    assert kinds(c)[:2] == ["AddAddress", "Serve"]


def test_unsynchronized_clock_keeps_a_node_from_taking_only_when_asked():
    strict = FloatingAddress("10.77.0.100/24", "eth0", require_synced_clock=True)
    c = VipCore(1)
    c.configure([strict], 0.0)
    c.health(True, True, 0.0, (1, 2), (1, 1), clock_ok=False)
    assert kinds(c) == [] and c.state(strict.key) == "clock-unsynced"
    c.health(True, True, 1.0, (1, 2), (1, 1), clock_ok=True)
    assert kinds(c) == ["Acquire"]
    c.health(True, True, 1.5, (1, 2), (1, 1), clock_ok=False)   # waiting: stands down
    assert kinds(c) == ["Release"]
    relaxed = quorate_core(1)          # default: warn only
    relaxed.health(True, True, 0.1, (1, 2, 3), None, clock_ok=False)
    relaxed.granted(VIP.key, 0.2)
    assert kinds(relaxed)[:3] == ["Acquire", "AddAddress", "Serve"]
