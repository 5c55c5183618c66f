"""Login redirection on group portals, sans-IO: the director and the login core.

The director (storaged.lb.director) is driven directly; the login path runs
storaged's initiator core against the target core in memory
(tests/initiator_pair.py), so the PDUs are the real ones.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from initiator_pair import LOCAL, TARGET, Pair, make_registry

from storaged.initiator import session as s
from storaged.initiator.client import IscsiClient, IscsiError, Timeouts
from storaged.lb.director import MOVED_PERMANENTLY, MOVED_TEMPORARILY, Director
from storaged.lb.health import HealthChecker
from storaged.lb.records import VirtualService

VIP = f"{LOCAL[0]}:{LOCAL[1]}"
REALS = ["127.0.0.2:41001", "127.0.0.3:41002", "127.0.0.4:41003"]
INI = "iqn.2026-11.org.example:host"


@dataclass(eq=False)
class FakeSession:
    """What the director reads of a logged-in Connection."""

    local: tuple[str, int]
    initiator: str = INI
    full_feature: bool = True


def service(scheduler: str = "rr", weights: tuple[int, ...] = (1, 1, 1), **kw) -> VirtualService:
    svc = VirtualService(vip=VIP, scheduler=scheduler,
                         reals=[{"portal": p, "weight": w} for p, w in zip(REALS, weights,
                                                                            strict=False)],
                         **kw)
    svc.validate()
    return svc


def director(*args, **kw) -> Director:
    d = Director()
    d.configure([service(*args, **kw)])
    return d


def pick(d: Director, now: float = 0.0, sessions=(), initiator: str = INI,
         peer: tuple[str, int] = ("127.0.0.9", 50000)) -> str | None:
    c = d.choose(LOCAL, initiator, peer, TARGET, list(sessions), now)
    return None if c is None else c.portal


def split(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------ director
def test_rr_goes_round_in_kernel_order():
    d = director("rr")
    # ip_vs_rr from the list head: the newest real server first (ipvsadm -L order)
    assert [pick(d) for _ in range(6)] == [REALS[2], REALS[1], REALS[0]] * 2


def test_lc_spreads_a_burst_by_pending_redirects():
    d = director("lc")
    got = [pick(d) for _ in range(6)]
    assert Counter(got) == {p: 2 for p in REALS}
    live = d.describe([], 0.0)["services"][0]["reals"]
    assert {p: r["inactive"] for p, r in live.items()} == {p: 2 for p in REALS}
    # Pending redirects end after the window: the counts drop back to zero.
    live = d.describe([], d.pending_timeout + 1)["services"][0]["reals"]
    assert all(r["inactive"] == 0 for r in live.values())


def test_lc_counts_sessions_logged_in_here_as_active():
    d = director("lc")
    here = [FakeSession(split(REALS[0])) for _ in range(2)] + [FakeSession(split(REALS[1]))]
    # 2 and 1 active on the first two (256 each): the idle third takes the
    # next logins (each pending one weighs only 1).
    assert [pick(d, sessions=here) for _ in range(3)] == [REALS[2]] * 3
    live = d.describe(here, 0.0)["services"][0]["reals"]
    assert live[REALS[0]]["active"] == 2 and live[REALS[0]]["logins"] == 2


def test_login_here_clears_its_pending_redirect():
    d = director("rr")
    assert pick(d) == REALS[2]
    conn = FakeSession(split(REALS[2]))
    d.logged_in(conn)
    live = d.describe([conn], 0.0)["services"][0]["reals"][REALS[2]]
    assert (live["active"], live["inactive"], live["logins"], live["redirects"]) == (1, 0, 1, 1)


def test_weight_zero_and_down_servers_are_never_chosen():
    d = director("wlc", weights=(1, 0, 1))
    assert set(pick(d) for _ in range(20)) == {REALS[0], REALS[2]}
    assert d.set_health(split(REALS[2]), False)
    assert not d.set_health(split(REALS[2]), False)  # no change
    assert set(pick(d) for _ in range(10)) == {REALS[0]}
    d.set_health(split(REALS[0]), False)
    assert pick(d) is None
    d.set_health(split(REALS[2]), True)
    assert pick(d) == REALS[2]


def test_persistence_by_iqn_and_dropped_when_the_server_goes_down():
    d = director("rr", persistent=300, pe="iqn")
    first = pick(d, initiator="iqn.a")
    assert [pick(d, now=i, initiator="iqn.a") for i in range(1, 5)] == [first] * 4
    assert pick(d, initiator="iqn.b") != first
    d.set_health(split(first), False)
    assert pick(d, now=10, initiator="iqn.a") not in (first, None)


def test_connection_entries_list_pending_redirects_and_templates():
    d = director("rr", persistent=300, pe="iqn")
    pick(d, now=10.0, initiator="iqn.a", peer=("127.0.0.9", 50001))
    entries = d.describe([], 20.0)["connections"]
    assert {(e["state"], e["source"], e["real"], round(e["expires"])) for e in entries} == {
        ("REDIRECTED", "127.0.0.9:50001", REALS[2], 20), ("PERSIST", "iqn.a", REALS[2], 290)}
    assert d.describe([], 400.0)["connections"] == []


def test_reconfigure_keeps_state_and_applies_edits():
    d = director("rr")
    assert pick(d) == REALS[2]
    d.configure([service("rr")])                     # unchanged: cursor kept
    assert pick(d) == REALS[1]
    d.configure([service("rr", weights=(1, 1, 0))])  # -e -w 0 on the newest
    assert {pick(d) for _ in range(4)} == {REALS[0], REALS[1]}
    d.configure([service("rr", redirect="permanent")])
    assert d.choose(LOCAL, INI, ("127.0.0.9", 1), TARGET, [], 0).status == MOVED_PERMANENTLY
    d.configure([])
    assert d.group_for(LOCAL) is None and d.addresses() == set()


def test_bad_redirect_kind_is_refused():
    with pytest.raises(Exception, match="unknown redirect kind 'sideways'"):
        VirtualService(vip=VIP, redirect="sideways").validate()


def test_health_checker_marks_refusing_portals_down():
    d = director("rr")
    answers = {split(REALS[0]): (True, 3, 7), split(REALS[1]): (False, None, None),
               split(REALS[2]): (True, None, None)}

    async def check(addr, timeout):
        return answers[addr]

    asyncio.run(HealthChecker(d, check=check).check_once())
    live = d.describe([], 0)["services"][0]["reals"]
    assert [live[p]["up"] for p in REALS] == [True, False, True]
    assert live[REALS[1]]["effective_weight"] == 0 and live[REALS[1]]["weight"] == 1
    # A count the node reported is its ActiveConn; None (not storaged) counts 0.
    assert [live[p]["active"] for p in REALS] == [3, 0, 0]


def test_reported_sessions_of_other_nodes_drive_lc_and_clear_pending():
    d = director("lc")
    d.set_health(split(REALS[2]), True, 5)
    d.set_health(split(REALS[1]), True, 1)
    d.set_health(split(REALS[0]), True, 1, logins=10)
    assert pick(d) == REALS[1]         # newest-first tie break between the two with 1
    assert pick(d) == REALS[0]
    # REALS[1]'s node now reports the login: its pending redirect is gone.
    d.set_health(split(REALS[1]), True, 2)
    live = d.describe([], 0)["services"][0]["reals"]
    assert (live[REALS[1]]["active"], live[REALS[1]]["inactive"]) == (2, 0)
    assert (live[REALS[0]]["active"], live[REALS[0]]["inactive"]) == (1, 1)
    # A session that came and went between two checks still shows as a login.
    d.set_health(split(REALS[0]), True, 1, logins=11)
    live = d.describe([], 0)["services"][0]["reals"]
    assert (live[REALS[0]]["active"], live[REALS[0]]["inactive"]) == (1, 0)
    # A portal of this node is counted in its own registry, never by report,
    # and its reported logins do not end other initiators' pending redirects.
    d.set_local_portals([split(REALS[2])])
    d.set_health(split(REALS[2]), True, 5, logins=1)
    assert pick(d) == REALS[2]          # idle here, whatever it reported
    d.set_health(split(REALS[2]), True, 5, logins=2)
    live = d.describe([], 0)["services"][0]["reals"]
    assert (live[REALS[2]]["active"], live[REALS[2]]["inactive"]) == (0, 1)


# ------------------------------------------------------- login core in memory
def group_registry(tmp_path, **kw):
    reg = make_registry(str(tmp_path / "img"))
    reg.director = Director()
    reg.director.configure([service(**kw)])
    return reg


def test_normal_login_on_group_portal_is_redirected(tmp_path):
    reg = group_registry(tmp_path, scheduler="rr")
    got = []
    for _ in range(3):
        p = Pair(reg, s.LoginOptions(target_name=TARGET))
        ev = p.login()
        red = [e for e in ev if isinstance(e, s.Redirected)]
        assert len(red) == 1 and red[0].status == MOVED_TEMPORARILY, ev
        assert p.target_closed and not reg.sessions
        got.append(f"{red[0].host}:{red[0].port}")
    assert got == [REALS[2], REALS[1], REALS[0]]


def test_redirect_carries_tpgt_and_permanent_status(tmp_path):
    reg = group_registry(tmp_path, scheduler="rr", redirect="permanent")
    reg.targets[TARGET].tpgt = 7
    p = Pair(reg, s.LoginOptions(target_name=TARGET))
    p.ini.start()
    p._feed(p.ini.data_to_send(), p.tgt.receive_data)
    raw = b"".join(bytes(b) for b in p.tgt.data_to_send())
    assert raw[36:38] == bytes([0x01, 0x02])          # status class 1, detail 2
    assert b"TargetAddress=127.0.0.4:41003,7\x00" in raw[48:]


def test_discovery_on_group_portal_is_not_redirected(tmp_path):
    reg = group_registry(tmp_path)
    reg.targets[TARGET].portals = [("127.0.0.2", 41001)]  # not served on the VIP itself
    p = Pair(reg, s.LoginOptions(target_name=None))
    assert isinstance(p.login()[-1], s.LoginDone)
    p.ini.send_targets()
    found = s.send_targets_result([e for e in p.pump() if isinstance(e, s.TextDone)][0].pairs)
    assert found == [(TARGET, [f"{VIP},1"])]
    live = reg.director.describe([], 0)["services"][0]["reals"]
    assert sum(r["redirects"] for r in live.values()) == 0


@pytest.mark.parametrize("case, status", [
    ("unknown target", 0x0203), ("not in the ACL", 0x0202), ("all down", 0x0301)])
def test_group_portal_refusals(tmp_path, case, status):
    reg = group_registry(tmp_path)
    name = TARGET
    if case == "unknown target":
        name = "iqn.2026-11.org.storaged:nosuch"
    elif case == "not in the ACL":
        reg.targets[TARGET].open_access = False
    else:
        for p in REALS:
            reg.director.set_health(split(p), False)
    ev = Pair(reg, s.LoginOptions(target_name=name)).login()
    failed = [e for e in ev if isinstance(e, s.LoginFailed)]
    assert len(failed) == 1 and failed[0].status == status, ev


def test_a_real_portal_of_the_same_node_still_logs_in(tmp_path):
    """Only the group portal redirects; the node's own portal serves as before."""
    reg = group_registry(tmp_path)
    reg.director.configure([VirtualService(vip="127.0.0.1:41999",
                                           reals=[{"portal": VIP, "weight": 1}])])
    ev = Pair(reg, s.LoginOptions(target_name=TARGET)).login()
    assert isinstance(ev[-1], s.LoginDone)
    live = reg.director.describe(reg.sessions.values(), 0)["services"][0]["reals"][VIP]
    assert (live["active"], live["logins"]) == (1, 1)


# --------------------------------------------------- initiator follows, in memory
def test_initiator_rejects_a_bad_target_address():
    ini = s.InitiatorConnection(s.LoginOptions(target_name=TARGET))
    ini.start()
    ini.data_to_send()
    from storaged.iscsi import text
    from storaged.iscsi.pdu import Op, build
    data = text.encode([("TargetAddress", "10.0.0.9:port,1")])
    ini.receive_data(build(Op.LOGIN_RSP, data_len=len(data), itt=ini.login_itt,
                           w36=0x0101 << 16) + data + bytes(-len(data) & 3))
    [ev] = ini.next_events()
    assert isinstance(ev, s.LoginFailed) and "bad TargetAddress" in ev.message


def test_client_reports_too_many_redirects_with_the_path(tmp_path):
    """Redirect chain longer than max_redirects, on asyncio servers of our own
    target core (each a group portal sending to the next)."""
    ports: list[int] = []

    async def run() -> str:
        servers = []
        regs = []

        async def handle(reader, writer, reg):
            from storaged.iscsi.connection import Connection
            local = writer.get_extra_info("sockname")[:2]
            conn = Connection(reg, local, writer.get_extra_info("peername")[:2])
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    break
                conn.receive_data(data)
                writer.writelines(conn.data_to_send())
            await writer.drain()
            writer.close()

        for _ in range(4):
            srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            ports.append(srv.sockets[0].getsockname()[1])
            srv.close()
        for i, port in enumerate(ports):
            reg = make_registry(str(tmp_path / f"img{i}"), size=1 << 20)
            reg.director = Director()
            reg.director.configure([VirtualService(
                vip=f"127.0.0.1:{port}",
                reals=[{"portal": f"127.0.0.1:{ports[(i + 1) % len(ports)]}", "weight": 1}])])
            regs.append(reg)
            servers.append(await asyncio.start_server(
                lambda r, w, reg=reg: handle(r, w, reg), "127.0.0.1", port))
        try:
            client = IscsiClient("127.0.0.1", ports[0], s.LoginOptions(target_name=TARGET),
                                 Timeouts(login_timeout=5, max_redirects=2))
            with pytest.raises(IscsiError) as err:
                await client.connect()
            too_many = str(err.value)
            client = IscsiClient("127.0.0.1", ports[0], s.LoginOptions(target_name=TARGET),
                                 Timeouts(login_timeout=5, max_redirects=8))
            with pytest.raises(IscsiError) as err:
                await client.connect()
            return too_many + "\n" + str(err.value)
        finally:
            for srv in servers:
                srv.close()

    too_many, loop = asyncio.run(run()).split("\n")
    path = " -> ".join(f"127.0.0.1:{p}" for p in ports)
    assert too_many == f"too many login redirections (more than 2): {path}"
    ring = " -> ".join(f"127.0.0.1:{p}" for p in ports + ports[:1])
    assert loop == f"login redirection loop: {ring}"



def test_sessions_key_counts_the_portals_sessions(tmp_path):
    """The health check's vendor key (RFC 7143 §13.16 X- keys): sessions at the
    portal the asking connection came in on."""
    from storaged.iscsi.redirect import SESSIONS_KEY
    reg = make_registry(str(tmp_path / "img"))
    assert isinstance(Pair(reg, s.LoginOptions(target_name=TARGET)).login()[-1], s.LoginDone)
    p = Pair(reg, s.LoginOptions(target_name=None))
    assert isinstance(p.login()[-1], s.LoginDone)
    p.ini.text_request([(SESSIONS_KEY, "?")])
    [done] = [e for e in p.pump() if isinstance(e, s.TextDone)]
    assert done.pairs == [(SESSIONS_KEY, "1")]


LOGIN_KEYS = ["InitiatorName", "SessionType", "TargetName", "AuthMethod", "HeaderDigest",
              "X-org.storaged.sessions"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LOGIN_KEYS), st.text(max_size=30)), max_size=6),
       st.integers(0, 255))
def test_random_login_keys_on_a_group_portal(tmp_path_factory, pairs, flags):
    """Any first Login on a group portal gets exactly one Login response
    (a redirect, a refusal or a login step); nothing raises."""
    from storaged.iscsi import text
    from storaged.iscsi.connection import Connection
    from storaged.iscsi.pdu import Op, build

    reg = group_registry(tmp_path_factory.mktemp("fz"))
    conn = Connection(reg, LOCAL, ("127.0.0.9", 50000))
    try:
        data = text.encode(pairs)
    except Exception:
        return
    conn.receive_data(build(Op.LOGIN_REQ, flags=flags, data_len=len(data), itt=1,
                            immediate=True) + data + bytes(-len(data) & 3))
    out = b"".join(bytes(b) for b in conn.data_to_send())
    assert out[0] & 0x3F == Op.LOGIN_RSP or out[0] & 0x3F == Op.REJECT
    if out[36] == 1:  # a redirect names where to go
        assert b"TargetAddress=127.0.0." in out[48:]


def test_ipv6_group_portal_and_real_servers(tmp_path):
    """Portals in brackets (RFC 7143 §13.8 TargetAddress for IPv6), and an
    IPv6 initiator address hashed by sh as the kernel folds it."""
    reg = make_registry(str(tmp_path / "img"))
    reg.director = Director()
    svc = VirtualService(vip="[::1]:3260", scheduler="sh",
                         reals=[{"portal": "[::1]:41001", "weight": 1}])
    svc.validate()
    reg.director.configure([svc])
    from storaged.iscsi.redirect import login_redirect
    assert login_redirect(reg, ("::1", 3260), ("::1", 50000), INI, TARGET, 0.0) == \
        (MOVED_TEMPORARILY, [("TargetAddress", "[::1]:41001,1")])
    # Not a group portal: an IPv4 connection (seen v4-mapped) on the same port.
    assert login_redirect(reg, ("::ffff:127.0.0.1", 3260), ("::1", 1), INI, TARGET, 0) is None
    assert s.parse_target_address("[::1]:41001,1") == ("::1", 41001)
