"""NLM v4 and NSM: golden XDR bytes, semantics through the sans-IO core, callbacks over loopback.

The in-memory tests call the programs through ``RpcConnection`` +
``RpcService`` exactly as the server does.  The asyncio tests run the
server and a fake *client host* (its own portmapper, NLM and statd, all on
127.0.0.1) to check GRANTED callbacks, *_RES answers and SM_NOTIFY after a
restart.  Needs root (open_by_handle_at) like tests/test_nfs_core.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storaged.nas.exports import Export, LiveExport
from storaged.nas.hostfs import HostFs
from storaged.nas.locks import EOF
from storaged.nfs import nlm, nsm, portmap
from storaged.nfs.lockd import LockService
from storaged.nfs.nlm import (
    NLM4_BLOCKED,
    NLM4_DENIED,
    NLM4_DENIED_GRACE_PERIOD,
    NLM4_FAILED,
    NLM4_FBIG,
    NLM4_GRANTED,
    NLM4_ROFS,
    NLM4_STALE_FH,
    NLM_PROGRAM,
    NLM_V4,
)
from storaged.nfs.rpc import GARBAGE_ARGS, SUCCESS
from storaged.nfs.server import NfsServer
from storaged.nfs.xdr import UINT32, VOID
from storaged.state import Store
from storaged.state.nsm import MemoryNsmStore, NsmStore
from tests.nfs_client import LocalClient
from tests.nlm_fake import FakeClientHost, NlmCalls, alock, lockargs, udp_call

pytestmark = pytest.mark.root

KEY = "22" * 16
_NLM = nlm.PROC_NUMBERS


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ------------------------------------------------------------------ golden bytes

def test_nlm4_lockargs_golden() -> None:
    value = {"cookie": b"ck", "block": True, "exclusive": False,
             "alock": {"caller_name": b"h", "fh": b"\x01\x02\x03\x04\x05", "oh": b"o",
                       "svid": 7, "l_offset": 1 << 33, "l_len": 0},
             "reclaim": False, "state": 3}
    wire = h("00000002 636b0000"            # cookie: netobj<2>
             " 00000001 00000000"           # block TRUE, exclusive FALSE
             " 00000001 68000000"           # caller_name "h"
             " 00000005 01020304 05000000"  # fh
             " 00000001 6f000000"           # oh
             " 00000007"                    # svid
             " 00000002 00000000"           # l_offset (unsigned hyper) 2**33
             " 00000000 00000000"           # l_len 0 = to EOF
             " 00000000 00000003")          # reclaim FALSE, state 3
    assert nlm.NLM4_LOCKARGS.encode(value) == wire
    assert nlm.NLM4_LOCKARGS.decode(wire) == value


def test_nlm4_testres_denied_golden() -> None:
    value = {"cookie": b"", "test_stat": (NLM4_DENIED, {
        "exclusive": True, "svid": 9, "oh": b"ab", "l_offset": 5, "l_len": 10})}
    wire = h("00000000 00000001 00000001 00000009 00000002 61620000"
             " 00000000 00000005 00000000 0000000a")
    assert nlm.NLM4_TESTRES.encode(value) == wire
    assert nlm.NLM4_TESTRES.decode(wire) == value
    granted = {"cookie": b"c", "test_stat": (NLM4_GRANTED, None)}
    assert nlm.NLM4_TESTRES.encode(granted) == h("00000001 63000000 00000000")


def test_nlm4_share_and_notify_golden() -> None:
    share = {"cookie": b"", "share": {"caller_name": b"c", "fh": b"f", "oh": b"",
                                      "mode": 2, "access": 1}, "reclaim": False}
    assert nlm.NLM4_SHAREARGS.encode(share) == h(
        "00000000 00000001 63000000 00000001 66000000 00000000 00000002 00000001 00000000")
    assert nlm.NLM4_SHARERES.encode({"cookie": b"", "stat": 1, "sequence": 0}) == h(
        "00000000 00000001 00000000")
    assert nlm.NLM4_NOTIFY.encode({"name": b"ab", "state": 5}) == h(
        "00000002 61620000 00000005")


def test_nsm_golden() -> None:
    assert nsm.STAT_CHGE.encode({"mon_name": b"srv", "state": 5}) == h(
        "00000003 73727600 00000005")
    assert nsm.SM_STAT_RES.encode({"res_stat": 0, "state": 7}) == h("00000000 00000007")
    mon = {"mon_id": {"mon_name": b"a", "my_id": {"my_name": b"b", "my_prog": 100021,
                                                   "my_vers": 4, "my_proc": 16}},
           "priv": bytes(range(16))}
    assert nsm.MON.encode(mon) == h(
        "00000001 61000000 00000001 62000000 000186b5 00000004 00000010"
        " 00010203 04050607 08090a0b 0c0d0e0f")
    assert nsm.MON.decode(nsm.MON.encode(mon)) == mon


# ------------------------------------------------------------------ in memory

class NlmClient(NlmCalls, LocalClient):
    """LocalClient plus NLM/NSM helpers."""


def make(tmp_path, **opts) -> tuple[NfsServer, LockService, str]:
    root = tmp_path / "export"
    root.mkdir(parents=True, exist_ok=True)
    rec = Export(path="/export", directory=str(root), export_id=0x4242, handle_key=KEY,
                 **opts)
    rec.validate()
    server = NfsServer(write_verifier=b"VERIFIER")
    server.exports.set([LiveExport(rec, HostFs(str(root), fsid=rec.export_id))])
    lockd = LockService(server, MemoryNsmStore(), name="server1", pmap_port=1)
    return server, lockd, str(root)


@pytest.fixture
def env(tmp_path):
    server, lockd, root = make(tmp_path, squash="none")
    c = NlmClient(server.service)
    fh = c.create(c.mnt("/export"), b"f")
    return server, lockd, c, fh


def test_lock_test_unlock_and_holder(env) -> None:
    _s, lockd, c, fh = env
    assert c.nlm("LOCK", lockargs(fh, off=0, ln=100))["stat"] == NLM4_GRANTED
    r = c.nlm("LOCK", lockargs(fh, host=b"cl2", svid=5, off=50, ln=1))
    assert r == {"cookie": b"c1", "stat": NLM4_DENIED}
    r = c.nlm("TEST", {"cookie": b"t", "exclusive": False,
                       "alock": alock(fh, host=b"cl2", svid=5, off=99, ln=0)})
    assert r["cookie"] == b"t"
    assert r["test_stat"] == (NLM4_DENIED, {"exclusive": True, "svid": 1, "oh": b"oh",
                                            "l_offset": 0, "l_len": 100})
    # the same owner never conflicts with itself; another svid on the same host does
    r = c.nlm("TEST", {"cookie": b"", "exclusive": True, "alock": alock(fh, off=10, ln=1)})
    assert r["test_stat"][0] == NLM4_GRANTED
    r = c.nlm("TEST", {"cookie": b"", "exclusive": True,
                       "alock": alock(fh, svid=2, off=10, ln=1)})
    assert r["test_stat"][0] == NLM4_DENIED
    assert c.nlm("UNLOCK", {"cookie": b"u", "alock": alock(fh, off=0, ln=0)}) == \
        {"cookie": b"u", "stat": NLM4_GRANTED}
    assert c.nlm("LOCK", lockargs(fh, host=b"cl2", svid=5, off=50, ln=1))["stat"] == \
        NLM4_GRANTED
    assert lockd.store.hosts.keys() == {"cl1", "cl2"}  # monitored before granting
    assert c.nlm("NULL", None) is None


def test_bad_handles_ranges_and_access(tmp_path) -> None:
    server, _l, _root = make(tmp_path, squash="none", read_only=True, clients=["127.0.0.1"])
    c = NlmClient(server.service)
    fh = c.lookup(c.mnt("/export"), b".")
    forged = fh[:-1] + bytes([fh[-1] ^ 1])
    assert c.nlm("LOCK", lockargs(forged, excl=False))["stat"] == NLM4_STALE_FH
    other_export = fh[:1] + b"\0\0\0\1" + fh[5:]
    assert c.nlm("LOCK", lockargs(other_export, excl=False))["stat"] == NLM4_STALE_FH
    r = c.nlm("TEST", {"cookie": b"", "exclusive": False, "alock": alock(b"short")})
    assert r["test_stat"] == (NLM4_STALE_FH, None)
    # read-only export: read locks yes, write locks NLM4_ROFS
    assert c.nlm("LOCK", lockargs(fh, excl=False))["stat"] == NLM4_GRANTED
    assert c.nlm("LOCK", lockargs(fh, excl=True, svid=9))["stat"] == NLM4_ROFS
    assert c.nlm("LOCK", lockargs(fh, excl=False, off=EOF - 1, ln=2))["stat"] == NLM4_FBIG
    stranger = NlmClient(server.service, peer=("10.9.9.9", 800))
    assert stranger.nlm("LOCK", lockargs(fh, excl=False, svid=3))["stat"] == NLM4_FAILED


def test_stale_after_delete(env) -> None:
    server, _l, c, fh = env
    root = server.exports.by_path["/export"].record.directory
    os.unlink(os.path.join(root, "f"))
    assert c.nlm("LOCK", lockargs(fh))["stat"] == NLM4_STALE_FH


def test_blocking_lock_queues_granted_callback(env) -> None:
    _s, lockd, c, fh = env
    n = lockd.nlm
    assert c.nlm("LOCK", lockargs(fh, ln=10))["stat"] == NLM4_GRANTED
    r = c.nlm("LOCK", lockargs(fh, block=True, host=b"cl2", svid=2, ln=5, cookie=b"blk"))
    assert r["stat"] == NLM4_BLOCKED
    assert n.outbox == []
    c.nlm("UNLOCK", {"cookie": b"", "alock": alock(fh, ln=10)})
    assert len(n.outbox) == 1
    out = n.outbox.pop()
    assert (out.address, out.prog, out.vers, out.proc) == ("127.0.0.1", NLM_PROGRAM, 4, 5)
    granted = nlm.NLM4_TESTARGS.decode(out.args)
    assert granted["cookie"] == b"blk" and granted["alock"]["caller_name"] == b"cl2"
    assert granted["exclusive"] is True
    # cl2 now holds 0..4; if its client says it no longer wants it, it is released
    assert c.nlm("LOCK", lockargs(fh, svid=1, ln=1))["stat"] == NLM4_DENIED
    out.done({"cookie": b"blk", "stat": NLM4_DENIED})
    assert c.nlm("LOCK", lockargs(fh, svid=1, ln=1))["stat"] == NLM4_GRANTED


def test_cancel_removes_waiter(env) -> None:
    _s, lockd, c, fh = env
    c.nlm("LOCK", lockargs(fh))
    c.nlm("LOCK", lockargs(fh, block=True, host=b"cl2"))
    r = c.nlm("CANCEL", {"cookie": b"x", "block": True, "exclusive": True,
                         "alock": alock(fh, host=b"cl2")})
    assert r["stat"] == NLM4_GRANTED
    c.nlm("UNLOCK", {"cookie": b"", "alock": alock(fh)})
    assert lockd.nlm.outbox == []
    assert lockd.nlm.locks.files == {}


def test_msg_variants_answer_with_res_calls(env) -> None:
    _s, lockd, c, fh = env
    num = _NLM["LOCK_MSG"]
    stat, res = c.call(NLM_PROGRAM, NLM_V4, num, nlm.NLM4_LOCKARGS.encode(lockargs(fh)))
    assert stat == 0 and bytes(res) == b""
    out = lockd.nlm.outbox.pop()
    assert out.proc == _NLM["LOCK_RES"]
    assert nlm.NLM4_RES.decode(out.args) == {"cookie": b"c1", "stat": NLM4_GRANTED}
    num = _NLM["TEST_MSG"]
    c.call(NLM_PROGRAM, NLM_V4, num, nlm.NLM4_TESTARGS.encode(
        {"cookie": b"t", "exclusive": True, "alock": alock(fh, host=b"x")}))
    out = lockd.nlm.outbox.pop()
    assert out.proc == _NLM["TEST_RES"]
    assert nlm.NLM4_TESTRES.decode(out.args)["test_stat"][0] == NLM4_DENIED
    # the *_RES procedures are accepted (void)
    stat, _ = c.call(NLM_PROGRAM, NLM_V4, _NLM["LOCK_RES"],
                     nlm.NLM4_RES.encode({"cookie": b"", "stat": 0}))
    assert stat == 0


def test_grace_period(env) -> None:
    _s, lockd, c, fh = env
    lockd.nlm.in_grace = True
    assert c.nlm("LOCK", lockargs(fh))["stat"] == NLM4_DENIED_GRACE_PERIOD
    r = c.nlm("TEST", {"cookie": b"", "exclusive": True, "alock": alock(fh)})
    assert r["test_stat"][0] == NLM4_DENIED_GRACE_PERIOD
    assert c.nlm("LOCK", lockargs(fh, reclaim=True))["stat"] == NLM4_GRANTED
    assert c.nlm("LOCK", lockargs(fh, reclaim=True, host=b"z"))["stat"] == NLM4_DENIED
    assert c.nlm("NM_LOCK", lockargs(fh, host=b"z"))["stat"] == NLM4_DENIED_GRACE_PERIOD
    lockd.nlm.in_grace = False
    assert c.nlm("LOCK", lockargs(fh, reclaim=True, host=b"z"))["stat"] == \
        NLM4_DENIED_GRACE_PERIOD  # reclaims only during grace (like Linux)
    assert c.nlm("LOCK", lockargs(fh, svid=4, off=1))["stat"] == NLM4_DENIED


def test_free_all_sm_notify_and_stat(env) -> None:
    _s, lockd, c, fh = env
    lockd.nsm.state = 7
    c.nlm("LOCK", lockargs(fh, host=b"a", ln=1))
    c.nlm("LOCK", lockargs(fh, host=b"b", off=5, ln=1))
    assert c.nlm("NM_LOCK", lockargs(fh, host=b"c", off=9, ln=1))["stat"] == NLM4_GRANTED
    assert "c" not in lockd.store.hosts  # NM_LOCK: not monitored
    assert set(lockd.store.hosts) == {"a", "b"}
    assert c.nlm("FREE_ALL", {"name": b"a", "state": 3}) is None
    assert lockd.nlm.locks.hosts() == {"b", "c"}
    assert set(lockd.store.hosts) == {"b"}
    assert c.nsm("STAT", {"mon_name": b"anyone"}) == {"res_stat": 0, "state": 7}
    assert c.nsm("NOTIFY", {"mon_name": b"b", "state": 9}) is None
    assert lockd.nlm.locks.hosts() == {"c"}
    assert "b" not in lockd.store.hosts
    mon = {"mon_id": {"mon_name": b"x", "my_id": {"my_name": b"y", "my_prog": 1,
                                                   "my_vers": 1, "my_proc": 1}},
           "priv": bytes(16)}
    assert c.nsm("MON", mon)["res_stat"] == 0
    remote = NlmClient(c.service, peer=("192.0.2.1", 900))
    assert remote.nsm("MON", mon)["res_stat"] == 1  # only local programs may SM_MON
    assert c.nsm("UNMON", mon["mon_id"]) == {"state": 7}


def test_share_unshare(env) -> None:
    _s, _l, c, fh = env
    share = {"caller_name": b"a", "fh": fh, "oh": b"1", "mode": 2, "access": 1}
    r = c.nlm("SHARE", {"cookie": b"s", "share": share, "reclaim": False})
    assert r == {"cookie": b"s", "stat": NLM4_GRANTED, "sequence": 0}
    other = dict(share, caller_name=b"b", mode=0, access=3)
    assert c.nlm("SHARE", {"cookie": b"", "share": other, "reclaim": False})["stat"] == \
        NLM4_DENIED
    c.nlm("UNSHARE", {"cookie": b"", "share": share, "reclaim": False})
    assert c.nlm("SHARE", {"cookie": b"", "share": other, "reclaim": False})["stat"] == \
        NLM4_GRANTED


def test_nsm_store_restart_persists(tmp_path) -> None:
    with Store(str(tmp_path / "st")) as store:
        s = NsmStore(store)
        assert s.restart() == (1, [])
        s.monitor("cl1", "127.0.0.1")
        state, pending = s.restart()
        assert state == 3 and [(p.host, p.notify_pending) for p in pending] == [("cl1", True)]
        s.notified("cl1", keep=False)
        assert s.monitored() == []
    with Store(str(tmp_path / "st")) as store:
        assert NsmStore(store).restart() == (5, [])


# ------------------------------------------------------------------ over loopback

async def _until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_callbacks_and_notify_over_loopback(tmp_path) -> None:
    async def main() -> None:
        fake = FakeClientHost()
        pmap = await fake.start()
        store = MemoryNsmStore()
        store.monitor("oldclient", "127.0.0.1")  # held locks before the "restart"
        root = tmp_path / "export"
        root.mkdir()
        rec = Export(path="/export", directory=str(root), export_id=7, handle_key=KEY,
                     squash="none")
        server = NfsServer()
        server.exports.set([LiveExport(rec, HostFs(str(root), fsid=7))])
        lockd = LockService(server, store, name="srv", pmap_port=pmap)
        await server.start("127.0.0.1", 0, "off")
        lockd.start(grace=0.5)
        port = server.address[1]  # type: ignore[index]
        await lockd.listen_udp("127.0.0.1", port)
        try:
            assert lockd.nlm.in_grace and lockd.nsm.state == 1
            await _until(lambda: fake.notifies)
            assert fake.notifies == [{"mon_name": b"srv", "state": 1}]
            await _until(lambda: not lockd.nlm.in_grace)
            assert store.hosts == {}  # notified and holding nothing: forgotten
            c = NlmClient(server.service)
            fh = c.create(c.mnt("/export"), b"f")
            assert c.nlm("LOCK", lockargs(fh))["stat"] == NLM4_GRANTED
            assert c.nlm("LOCK", lockargs(fh, block=True, host=b"w", cookie=b"W"))["stat"] \
                == NLM4_BLOCKED
            c.nlm("UNLOCK", {"cookie": b"", "alock": alock(fh)})
            await _until(lambda: fake.granted)
            assert fake.granted[0]["cookie"] == b"W"
            assert lockd.nlm.locks.hosts() == {"w"}
            # a client that answers DENIED to GRANTED gets the lock released
            fake.answer = NLM4_DENIED
            c.nlm("LOCK", lockargs(fh, block=True, host=b"v", cookie=b"V"))
            c.nlm("UNLOCK", {"cookie": b"", "alock": alock(fh, host=b"w")})
            await _until(lambda: len(fake.granted) == 2)
            await _until(lambda: lockd.nlm.locks.hosts() == set())
            # UNLOCK_MSG: the answer arrives as an UNLOCK_RES call
            c.call(NLM_PROGRAM, NLM_V4, _NLM["UNLOCK_MSG"], nlm.NLM4_UNLOCKARGS.encode(
                {"cookie": b"M", "alock": alock(fh)}))
            await _until(lambda: fake.results)
            assert fake.results == [("UNLOCK_RES", {"cookie": b"M", "stat": NLM4_GRANTED})]
            # UDP: the portmapper knows NLM/NSM over UDP, SM_STAT and SM_NOTIFY work there
            m = {"prog": nsm.SM_PROGRAM, "vers": 1, "prot": 17, "port": 0}
            got = await asyncio.to_thread(udp_call, port, 100000, 2, 3,
                                          portmap.MAPPING.encode(m), UINT32)
            assert got == port
            r = await asyncio.to_thread(udp_call, port, nsm.SM_PROGRAM, 1, 1,
                                        nsm.SM_NAME.encode({"mon_name": b"x"}),
                                        nsm.SM_STAT_RES)
            assert r == {"res_stat": 0, "state": 1}
            c.nlm("LOCK", lockargs(fh, host=b"rebooter"))
            await asyncio.to_thread(udp_call, port, nsm.SM_PROGRAM, 1, 6, nsm.STAT_CHGE.encode(
                {"mon_name": b"rebooter", "state": 5}), VOID)
            assert lockd.nlm.locks.hosts() == set()
            await lockd.close_udp()
            assert (nsm.SM_PROGRAM, 1, 17) not in server.portmap.table
        finally:
            await lockd.stop()
            await server.stop()
            await fake.server.stop()

    asyncio.run(main())


@settings(max_examples=300)
@given(proc=st.sampled_from(sorted(nlm.PROCEDURES)), data=st.binary(max_size=200),
       nsm_proc=st.sampled_from(sorted(nsm.PROCEDURES)))
def test_fuzz_args_never_crash(tmp_path_factory, proc: int, data: bytes, nsm_proc: int) -> None:
    global _FUZZ
    if _FUZZ is None:
        server, _l, _r = make(tmp_path_factory.mktemp("fuzz"), squash="none")
        _FUZZ = NlmClient(server.service)
    c = _FUZZ
    for prog, vers, num in ((NLM_PROGRAM, NLM_V4, proc), (nsm.SM_PROGRAM, 1, nsm_proc)):
        stat, _res = c.call(prog, vers, num, data)
        assert stat in (SUCCESS, GARBAGE_ARGS), f"proc {num}: accept_stat {stat}"


_FUZZ: NlmClient | None = None
