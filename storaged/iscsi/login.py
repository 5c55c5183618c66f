"""The login phase of the sans-IO iSCSI connection (RFC 7143 §6.3, §11.12).

``LoginPhase`` is the part of ``storaged.iscsi.connection.Connection`` that
runs before full feature phase: login stages and their transitions, the
identity keys (InitiatorName, SessionType, TargetName; redirects of a group
portal), authentication (AuthMethod, CHAP), operational parameter
negotiation, and entering full feature phase (digests, segment and burst
limits, the I_T nexus, session reinstatement).  It is a mixin: the
connection's ``__init__`` sets the login state and the session provides
``_send``, ``_next_statsn`` and ``maxcmdsn``.
"""

from __future__ import annotations

import logging
from functools import partial

from storaged.iscsi import redirect, text
from storaged.iscsi.chap import ChapError, ChapTarget
from storaged.iscsi.events import Close
from storaged.iscsi.params import NegotiationError, Negotiator
from storaged.iscsi.pdu import Op, Pdu, build, isid_tsih
from storaged.scsi.types import Nexus

log = logging.getLogger("storaged.iscsi")

# Login status class/detail (§11.13.5).
LOGIN_OK = 0x0000
LOGIN_AUTH_FAILED = 0x0201
LOGIN_FORBIDDEN = 0x0202
LOGIN_NOT_FOUND = 0x0203
LOGIN_UNSUPPORTED_VERSION = 0x0205
LOGIN_MISSING_PARAM = 0x0207
LOGIN_NO_SESSION = 0x020A
LOGIN_INIT_ERROR = 0x0200
LOGIN_INVALID_REQUEST = 0x020B
LOGIN_TARGET_ERROR = 0x0300

STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL = 3

LOGIN_MRDSL = 8192  # login PDUs use the default segment size (§13.12)


class LoginPhase:
    """Login stages, authentication and negotiation (see the module doc)."""

    def _login(self, pdu: Pdu) -> None:
        flags = pdu.flags
        transit = bool(flags & 0x80)
        cont = bool(flags & 0x40)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        isid, tsih = isid_tsih(pdu.lun)
        if not self.login_started:
            self.login_started = True
            self.isid = isid
            self.tsih = tsih
            self.cid = pdu.w20 >> 16
            self.expcmdsn = pdu.w24
            self.statsn = pdu.w28
            if pdu.b3 > 0 or pdu.b2 < pdu.b3:
                self._login_fail(pdu, LOGIN_UNSUPPORTED_VERSION, "unsupported version")
                return
        try:
            pairs = text.decode(pdu.data)
        except text.TextError as e:
            self._login_fail(pdu, LOGIN_INIT_ERROR, str(e))
            return
        self.login_keys.extend(pairs)
        if cont:
            # §11.12.2: a continued text; answer with an empty response, no transit.
            self._login_response(pdu, [], transit=False, csg=csg, nsg=nsg)
            return
        pairs = self.login_keys
        self.login_keys = []
        keys = dict(pairs)
        if csg == 2 or (transit and (nsg == 2 or nsg <= csg)):
            self._login_fail(pdu, LOGIN_INIT_ERROR, f"bad login stage transition {flags:#x}")
            return
        if csg != self.stage:
            if csg == STAGE_OPERATIONAL and self.stage == STAGE_SECURITY \
                    and self.auth_method is None:
                self.stage = STAGE_OPERATIONAL  # security stage skipped (§6.3)
            else:
                self._login_fail(pdu, LOGIN_INIT_ERROR, f"unexpected login stage {csg}")
                return
        try:
            answers: list[tuple[str, str]] = []
            if not self.initiator:
                status = self._login_identify(keys)
                if status:
                    self._login_fail(pdu, status, "login refused", self.redirect_keys)
                    return
                if self.target is not None and not self.declared_tpgt:
                    self.declared_tpgt = True
                    answers.append(("TargetPortalGroupTag", str(self.target.tpgt)))
            if csg == STAGE_SECURITY:
                answers += self._security(keys, pdu)
                if self.closed:
                    return
                if self.auth_needed and not self.auth_done:
                    transit = False
            elif csg == STAGE_OPERATIONAL:
                if self.auth_needed and not self.auth_done:
                    self._login_fail(pdu, LOGIN_AUTH_FAILED, "authentication required")
                    return
            answers += self.neg.respond(pairs, in_login=True)
            if csg == STAGE_OPERATIONAL or (transit and nsg == STAGE_FULL):
                answers += self.neg.declarations()
        except NegotiationError as e:
            self._login_fail(pdu, e.status, str(e))
            return
        except ChapError as e:
            log.warning("login from %s (%s): %s", self.peer[0], self.initiator, e)
            self._login_fail(pdu, LOGIN_AUTH_FAILED, str(e))
            return
        if transit:
            self.stage = nsg
        if transit and nsg == STAGE_FULL:
            self._login_response(pdu, answers, transit=True, csg=csg, nsg=nsg, final=True)
            self._enter_full_feature()
        else:
            self._login_response(pdu, answers, transit=transit, csg=csg, nsg=nsg)

    def _login_identify(self, keys: dict[str, str]) -> int:
        """Process the first login request's identity keys; return a failure status."""
        name = keys.get("InitiatorName")
        if not name:
            return LOGIN_MISSING_PARAM
        self.initiator = name.lower()
        self.alias = keys.get("InitiatorAlias", "")
        stype = keys.get("SessionType", "Normal")
        if stype == "Discovery":
            self.discovery = True
            self.neg = Negotiator(discovery=True)
            return LOGIN_OK
        if stype != "Normal":
            return 0x0209
        tname = keys.get("TargetName")
        if not tname:
            return LOGIN_MISSING_PARAM
        moved = redirect.login_redirect(self.registry, self.local, self.peer, self.initiator,
                                        tname, self.last_rx)
        if moved is not None:  # a group portal: never logs in here itself
            status, self.redirect_keys = moved
            return status
        target = self.registry.target(tname)
        if target is None or not target.served_on(self.local):
            return LOGIN_NOT_FOUND
        if not target.allowed(self.initiator):
            log.warning("initiator %s not in the ACL of %s", self.initiator, target.name)
            return LOGIN_FORBIDDEN
        self.target = target
        self.auth_needed = target.credentials(self.initiator) is not None
        self.queue_depth = target.queue_depth
        self.neg = Negotiator(target.params)
        if self.tsih:
            old = self.registry.sessions.get((self.initiator, self.isid, target.name))
            if old is None or old.tsih != self.tsih:
                return LOGIN_NO_SESSION
        return LOGIN_OK

    def _security(self, keys: dict[str, str], pdu: Pdu) -> list[tuple[str, str]]:
        creds = self.target.credentials(self.initiator) if self.target else None
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys and self.auth_method is None:
            offered = [m.strip() for m in keys["AuthMethod"].split(",")]
            if creds is not None:
                if "CHAP" not in offered:
                    raise ChapError("CHAP is required but the initiator does not offer it")
                self.auth_method = "CHAP"
                self.chap = ChapTarget(creds)
            elif "None" in offered:
                self.auth_method = "None"
            else:
                raise ChapError("initiator insists on authentication but none is configured")
            out.append(("AuthMethod", self.auth_method))
            return out
        if self.auth_method is None and creds is not None:
            raise ChapError("authentication required; AuthMethod not offered")
        if self.chap is not None and not self.auth_done:
            if "CHAP_A" in keys:
                return self.chap.select_algorithm(keys["CHAP_A"])
            if "CHAP_R" in keys or "CHAP_N" in keys:
                out += self.chap.verify(keys)
                self.auth_done = True
                return out
            raise ChapError("unexpected keys during CHAP")
        return out

    def _login_fail(self, pdu: Pdu, status: int, reason: str,
                    answers: list[tuple[str, str]] | None = None) -> None:
        """End the login with a non-zero status (§11.13.5); ``answers`` carries
        the TargetAddress of a redirect (status class 1)."""
        if status >> 8 == 1:
            log.info("login from %s:%s (%s) redirected: %s (status 0x%04x)", self.peer[0],
                     self.peer[1], self.initiator, dict(answers or ()).get("TargetAddress"),
                     status)
        else:
            log.warning("login from %s:%s (%s) failed: %s (status 0x%04x)", self.peer[0],
                        self.peer[1], self.initiator or "?", reason, status)
        data = text.encode(answers) if answers else b""
        hdr = build(Op.LOGIN_RSP, flags=0, b2=0, b3=0, data_len=len(data), lun=pdu.lun,
                    itt=pdu.itt, w24=self._next_statsn(), w28=self.expcmdsn,
                    w32=self.maxcmdsn, w36=status << 16)
        self._send(hdr, data)
        self.closed = True
        self._events.append(Close(reason))

    def _login_response(self, pdu: Pdu, answers: list[tuple[str, str]], transit: bool,
                        csg: int, nsg: int, final: bool = False) -> None:
        if final and not self.tsih:
            self.tsih = self.registry.allocate_tsih()
        flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        data = text.encode(answers)
        lun = (self.isid << 16) | (self.tsih if final else pdu.lun & 0xFFFF)
        hdr = build(Op.LOGIN_RSP, flags=flags, b2=0, b3=0, data_len=len(data), lun=lun,
                    itt=pdu.itt, w24=self._next_statsn(), w28=self.expcmdsn,
                    w32=self.maxcmdsn)
        self._send(hdr, data)

    def _enter_full_feature(self) -> None:
        self.neg.finish()
        v = self.neg
        self.full_feature = True
        self.hd = v.header_digest
        self.dd = v.data_digest
        self.max_recv = int(v.ours["MaxRecvDataSegmentLength"])
        self.max_send = v.num("MaxRecvDataSegmentLength")
        self.first_burst = v.num("FirstBurstLength")
        self.max_burst = v.num("MaxBurstLength")
        self.initial_r2t = v.flag("InitialR2T")
        self.immediate_data = v.flag("ImmediateData")
        self.max_r2t = v.num("MaxOutstandingR2T")
        if self.target is not None:
            t = self.target
            self.nexus = Nexus(
                initiator_port=f"{self.initiator},i,0x{self.isid:012x}",
                target_port=f"{t.name},t,0x{t.tpgt:04x}",
                relative_port_id=t.tpgt,
                initiator_name=self.initiator,
                target_name=t.name,
            )
            key = (self.initiator, self.isid, t.name)
            old = self.registry.sessions.get(key)
            if old is not None and old is not self:
                # §6.3.5 session reinstatement: the old session's tasks end now.
                old.drop("session reinstated by a new login with the same ISID")
            self.registry.sessions[key] = self
            redirect.logged_in(self.registry, self)
            if self.quick is not None and not self.discovery:
                self._quick = partial(self.quick, t.scsi, t.name,
                                      (self.nexus.initiator_port, self.nexus.target_port))
        quiet = self.discovery and self.initiator == redirect.HEALTH_INITIATOR
        log.log(logging.DEBUG if quiet else logging.INFO,
                "login: %s from %s:%s %s (hd=%s dd=%s mrdsl=%d)", self.initiator,
                self.peer[0], self.peer[1],
                "discovery" if self.discovery else f"to {self.target.name}",  # type: ignore
                self.hd, self.dd, self.max_send)

