"""The initiator core against the target core, in memory (no sockets)."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.initiator import session as s
from storaged.iscsi import text
from storaged.iscsi.chap import Credentials
from storaged.iscsi.pdu import Op, build
from tests.initiator_pair import TARGET, Pair, make_registry

BS = 512


def rw16(op: int, lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", op, 0x08 if fua else 0, lba, blocks, 0, 0)


def logged_in(tmp: Path, chunk: int = 0, reg_kw: dict | None = None, **opts) -> Pair:
    reg = make_registry(str(tmp / "img"), **(reg_kw or {}))
    p = Pair(reg, s.LoginOptions(target_name=TARGET, **opts), chunk=chunk)
    ev = p.login()
    assert isinstance(ev[-1], s.LoginDone), ev
    # Clear the power-on unit attention (SPC-4 §5.14).
    p.ini.submit(bytes(6))
    assert p.pump()[0].status == 2
    return p


def only(events: list, kind: type):
    got = [e for e in events if isinstance(e, kind)]
    assert len(got) == 1, events
    return got[0]


offers = st.fixed_dictionaries({
    "header_digest": st.sampled_from(["None", "CRC32C", "CRC32C,None", "None,CRC32C"]),
    "data_digest": st.sampled_from(["None", "CRC32C", "CRC32C,None"]),
    "initial_r2t": st.booleans(),
    "immediate_data": st.booleans(),
    "max_recv_data_segment_length": st.sampled_from([512, 4096, 8192, 65536, 262144]),
    "max_burst_length": st.sampled_from([512, 8192, 65536, 262144, 16776192]),
    "first_burst_length": st.sampled_from([512, 4096, 65536, 262144]),
})
target_params = st.fixed_dictionaries({
    "MaxRecvDataSegmentLength": st.sampled_from(["512", "8192", "65536", "262144"]),
    "MaxBurstLength": st.sampled_from(["4096", "262144", "16776192"]),
    "FirstBurstLength": st.sampled_from(["512", "65536", "262144"]),
    "InitialR2T": st.sampled_from(["Yes", "No"]),
    "ImmediateData": st.sampled_from(["Yes", "No"]),
    "HeaderDigest": st.sampled_from(["CRC32C,None", "None"]),
})
ops = st.lists(st.tuples(st.sampled_from(["r", "w", "wf"]), st.integers(0, 4095),
                         st.integers(1, 300)), min_size=1, max_size=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offer=offers, tparams=target_params, stream=ops, chunk=st.sampled_from([0, 13, 4096]),
       seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 8))
def test_negotiation_and_data_round_trip(offer, tparams, stream, chunk, seed, depth):
    import random
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        reg = make_registry(str(Path(d) / "img"), params=tparams, size=4096 * BS,
                            queue_depth=depth)
        p = Pair(reg, s.LoginOptions(target_name=TARGET, **offer), chunk=chunk)
        ev = p.login()
        if offer["header_digest"] == "CRC32C" and tparams["HeaderDigest"] == "None":
            # No digest in common and we insisted: login ends with a clear reason.
            assert "HeaderDigest" in only(ev, s.Dropped).reason
            return
        assert isinstance(ev[-1], s.LoginDone), ev
        p.ini.submit(bytes(6))
        assert p.pump()[0].status == 2   # the power-on unit attention
        ini, tgt = p.ini, p.tgt
        # Both state machines agree on every negotiated value (RFC 7143 §13).
        assert (ini.hd, ini.dd) == (tgt.hd, tgt.dd)
        assert ini.max_send == tgt.max_recv and ini.max_recv == tgt.max_send
        assert ini.max_burst == tgt.max_burst
        if not ini.initial_r2t or ini.immediate_data:   # else irrelevant (§13.14)
            assert ini.first_burst == tgt.first_burst
        assert (ini.initial_r2t, ini.immediate_data) == (tgt.initial_r2t, tgt.immediate_data)
        model = bytearray(4096 * BS)
        p.hold = True
        expect: dict[int, bytes | None] = {}
        pending: dict[int, tuple[int, int, bool]] = {}   # tag -> (lba, blocks, is_write)

        def drain(hold: bool = True) -> None:
            for ev in p.release():
                assert isinstance(ev, s.CommandDone) and ev.status == 0, ev
                if expect[ev.tag] is not None:
                    assert ev.data == expect[ev.tag]
                del expect[ev.tag]
                pending.pop(ev.tag, None)
            p.hold = hold

        for kind, lba, blocks in stream:
            blocks = min(blocks, 4096 - lba)
            # SIMPLE tasks may run in any order (SAM-5 §8.6): a command that overlaps a
            # queued write (or a write that overlaps a queued read) waits for the queue.
            if any(lba < plba + pblocks and plba < lba + blocks and (pw or kind != "r")
                   for plba, pblocks, pw in pending.values()):
                drain()
            if kind == "r":
                tag = ini.submit(rw16(0x88, lba, blocks), read_len=blocks * BS)
                expect[tag] = bytes(model[lba * BS:(lba + blocks) * BS])
                pending[tag] = (lba, blocks, False)
            else:
                data = rnd.randbytes(blocks * BS)
                tag = ini.submit(rw16(0x8A, lba, blocks, kind == "wf"), data_out=data)
                model[lba * BS:(lba + blocks) * BS] = data
                expect[tag] = None
                pending[tag] = (lba, blocks, True)
            # Commands are held at the target: the initiator stays in the window.
            p.pump()
            # The initiator never sends past the MaxCmdSN it was given (§4.2.2.1).
            assert s._sn_le((ini.cmdsn - 1) & 0xFFFFFFFF, ini.maxcmdsn)
            if rnd.random() < 0.5:
                drain()
        drain(hold=False)
        assert not expect and not ini.cmds and not ini.backlog
        tag = ini.submit(rw16(0x88, 0, 4096), read_len=4096 * BS)
        assert only(p.pump(), s.CommandDone).data == bytes(model)
        assert not p.target_closed and not ini.closed


def test_cmdsn_window_holds_commands_back(tmp_path):
    p = logged_in(tmp_path, reg_kw={"queue_depth": 4})
    p.hold = True
    tags = [p.ini.submit(rw16(0x88, i, 1), read_len=BS) for i in range(20)]
    p.pump()
    assert len(p.held) == 4 and len(p.ini.backlog) == 16
    done = []
    while p.held:
        done += p.release()
        p.hold = True
        p.pump()
    assert sorted(e.tag for e in done) == tags


def test_check_condition_sense(tmp_path):
    p = logged_in(tmp_path)
    p.ini.submit(rw16(0x88, 1 << 40, 1), read_len=BS)
    ev = only(p.pump(), s.CommandDone)
    assert ev.status == 2 and ev.sense[2] & 0x0F == 0x05  # ILLEGAL REQUEST
    assert ev.sense[12] == 0x21  # LBA out of range


def test_chap_one_way_and_wrong_secret(tmp_path):
    creds = Credentials("alice", "secret-alice12")
    reg = make_registry(str(tmp_path / "img"), chap=creds)
    p = Pair(reg, s.LoginOptions(target_name=TARGET, user="alice", password="secret-alice12"))
    assert isinstance(p.login()[-1], s.LoginDone)
    p = Pair(reg, s.LoginOptions(target_name=TARGET, user="alice", password="wrong-secret"))
    ev = only(p.login(), s.LoginFailed)
    assert ev.status == 0x0201 and "authentication" in ev.message
    p = Pair(reg, s.LoginOptions(target_name=TARGET))
    assert only(p.login(), s.LoginFailed).status == 0x0201


def test_chap_mutual(tmp_path):
    creds = Credentials("alice", "secret-alice12", "tgtuser", "secret-target1")
    reg = make_registry(str(tmp_path / "img"), chap=creds)
    ok = s.LoginOptions(target_name=TARGET, user="alice", password="secret-alice12",
                        target_user="tgtuser", target_password="secret-target1")
    assert isinstance(Pair(reg, ok).login()[-1], s.LoginDone)
    bad = s.LoginOptions(target_name=TARGET, user="alice", password="secret-alice12",
                         target_password="not-the-target")
    ev = only(Pair(reg, bad).login(), s.LoginFailed)
    assert "mutual" in ev.message


def test_discovery_send_targets(tmp_path):
    reg = make_registry(str(tmp_path / "img"))
    p = Pair(reg, s.LoginOptions(target_name=None))
    assert isinstance(p.login()[-1], s.LoginDone)
    p.ini.send_targets()
    ev = only(p.pump(), s.TextDone)
    found = s.send_targets_result(ev.pairs)
    assert found[0][0] == TARGET and found[0][1][0].startswith("127.0.0.1:3260")


def test_login_redirection_is_reported():
    ini = s.InitiatorConnection(s.LoginOptions(target_name=TARGET))
    ini.start()
    ini.data_to_send()
    data = text.encode([("TargetAddress", "10.0.0.9:3261,1")])
    ini.receive_data(build(Op.LOGIN_RSP, data_len=len(data), itt=ini.login_itt,
                           w36=0x0101 << 16) + data + bytes(-len(data) & 3))
    ev = only(ini.next_events(), s.Redirected)
    assert (ev.status, ev.host, ev.port) == (0x0101, "10.0.0.9", 3261)
    assert s.parse_target_address("[fe80::1]:3262,2") == ("fe80::1", 3262)


def test_nop_both_ways_and_task_management(tmp_path):
    p = logged_in(tmp_path)
    tag = p.ini.nop(b"ping")
    assert only(p.pump(), s.NopReply) == s.NopReply(tag, b"ping")
    # The target pings after its idle interval; the initiator answers with the TTT.
    p.tgt.tick(p.tgt.last_rx + p.tgt.nop_interval + 1)
    assert p.tgt.ping_sent_at is not None
    p.pump()
    assert p.tgt.ping_sent_at is None
    tag = p.ini.task_management(5, lun=0)     # LOGICAL UNIT RESET
    assert only(p.pump(), s.TmfDone) == s.TmfDone(tag, 0)
    p.hold = True
    cmd = p.ini.submit(rw16(0x88, 0, 1), read_len=BS)
    p.pump()
    tag = p.ini.task_management(1, lun=0, ref_tag=cmd)   # ABORT TASK
    ev = p.pump()
    assert only(ev, s.TmfDone).response == 0


def test_header_digest_error_drops(tmp_path):
    p = logged_in(tmp_path, header_digest="CRC32C")
    p.ini.nop()
    out = bytearray(b"".join(bytes(b) for b in p.tgt.data_to_send()))
    p.ini.submit(bytes(6))
    p.tgt.receive_data(b"".join(bytes(b) for b in p.ini.data_to_send()))
    out = bytearray(b"".join(bytes(b) for b in p.tgt.data_to_send()))
    out[10] ^= 0xFF
    p.ini.receive_data(bytes(out))
    assert "digest" in only(p.ini.next_events(), s.Dropped).reason


def test_url_parsing_and_fence_key():
    from storaged.initiator.device import fence_scsi_key, options_from_url, parse_url
    u = parse_url("iscsi://bob%s3cr%40t@[fd00::5]:3261/iqn.2026-11.x:y/3"
                  "?target_password=tp&header_digest=CRC32C&replacement_timeout=7")
    assert (u.host, u.port, u.iqn, u.lun, u.user, u.password) == \
        ("fd00::5", 3261, "iqn.2026-11.x:y", 3, "bob", "s3cr@t")
    opts, t = options_from_url(u)
    assert opts.target_password == "tp" and opts.header_digest == "CRC32C"
    assert t.replacement_timeout == 7 and t.noop_interval == 5 and t.noop_timeout == 5
    assert parse_url("iscsi://h/iqn.2026-11.x:y").lun == 0
    assert parse_url("iscsi://h/iqn.2026-11.x:y").port == 3260
    for bad in ("http://h/i/0", "iscsi://h/", "iscsi:///iqn/0"):
        try:
            parse_url(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    # fence_scsi: first 4 hex digits of md5(cluster name), node id as 4 digits.
    assert fence_scsi_key("demo", 1) == 0xFE010001
    assert fence_scsi_key("demo", 12) == 0xFE010012
