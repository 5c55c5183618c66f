"""Lab scenarios: failure stories run against a lab that is up, with a timeline.

A scenario changes the lab only inside its namespaces (routes that cut
links, writer processes it records like every lab process) and watches it
from the host through the nodes' sockets (:mod:`storaged.lab.probe`).  What
it concludes about acknowledged writes comes from :mod:`storaged.lab.check`,
which reads the LUN itself.

* ``split-brain``: a two-node cluster loses the link between its nodes (both
  keep the storage).  Both stay quorate (two_node), both want to fence; the
  fence delay on node 1 lets c1 fence c2 first, and c2, already cut off at
  the SAN, does not fence back: exactly one side keeps its access.
* ``failover``: writers on every node; one node is cut off from the others;
  the majority fences it at the SAN (fence_storaged on every storage node),
  recovers its locks and replays its journal, and the survivors' writers go
  on.  Then the storage node holding the floating portal address is killed
  (SIGKILL of its daemon); the other storage node fences it (its bridge port
  goes down), takes the address, and the mounts' sessions log in again
  through it: the writers go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from storaged.lab import probe
from storaged.lab.plan import LabSpec, Node, Step, shared_lun_url
from storaged.lab.shell import (
    LabState,
    Runner,
    is_mounted,
    proc_alive,
    switch_port_up,
    vip_holders,
)
from storaged.lab.timeline import ScenarioResult, Timeline

POLL = 0.05


class ScenarioError(Exception):
    """The lab is not in a state the scenario can start from."""


# ------------------------------------------------------------------ lab actions

def cut(spec: LabSpec, node: Node, others: list[Node]) -> None:
    """Cut ``node``'s links to ``others`` both ways (blackhole host routes in both
    namespaces); the storage nodes stay reachable."""
    for o in others:
        for a, b in ((node, o), (o, node)):
            subprocess.run(["ip", "-n", a.netns, "route", "add", "blackhole",
                            f"{b.address}/32"], check=True, capture_output=True)


def san_login(spec: LabSpec, node: Node, timeout: float = 30.0) -> tuple[bool, str]:
    """Log in to the shared LUN from ``node``'s namespace with its initiator name
    (storaged's initiator, ``storaged iscsi inq``): (accepted, what it said)."""
    url = shared_lun_url(spec, node.iqn) + "&login_timeout=5&replacement_timeout=0"
    argv = spec.in_netns(node.netns, [spec.python, "-m", "storaged", "iscsi", "inq", url])
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:g}s"
    if r.returncode == 0:
        ident = [ln for ln in r.stdout.splitlines() if "dentity" in ln or "apacity" in ln]
        return True, "INQUIRY answered" + (f" ({ident[0].strip()})" if ident else "")
    err = r.stderr.strip().splitlines()
    text = err[-1] if err else f"exit {r.returncode}"
    return False, text.split("login failed: ", 1)[-1] if "login failed: " in text else text


def _views(spec: LabSpec, nodes: list[Node]) -> dict[str, dict[str, Any] | None]:
    return {n.name: probe.cluster_status(spec, n) for n in nodes}


def _members(st: dict[str, Any] | None) -> list[int]:
    v = (st or {}).get("view") or {}
    return list(v.get("members", []))


def _quorate(st: dict[str, Any] | None) -> bool:
    v = (st or {}).get("view") or {}
    return bool(v.get("quorate"))


def _recovered(st: dict[str, Any] | None) -> bool:
    """Quorate, no fence pending and every lockspace running again."""
    return (_quorate(st) and not (st or {}).get("pending_fence")
            and all(s == "running" for s in (st or {}).get("lockspaces", {}).values()))


def _fenced_everywhere(spec: LabSpec, name: str) -> bool:
    states = [probe.fence_states(spec, s) for s in spec.storage_nodes]
    return all(s is not None and s.get(name) for s in states)


def _fenced_anywhere(spec: LabSpec, name: str) -> bool:
    return any((probe.fence_states(spec, s) or {}).get(name) for s in spec.storage_nodes)


def _ready(spec: LabSpec) -> None:
    """Every cluster node mounted, in one quorate view of all nodes, nobody fenced."""
    for c in spec.cluster_nodes:
        if not is_mounted(spec.mountpoint(c)):
            raise ScenarioError(f"{c.name} is not mounted: start from a fresh lab "
                                f"(storaged lab down; storaged lab up)")
        st = probe.cluster_status(spec, c)
        if not _quorate(st) or len(_members(st)) != spec.nodes:
            raise ScenarioError(f"{c.name} is not in a quorate view of all {spec.nodes} "
                                f"nodes: {((st or {}).get('view'))}")
        if _fenced_anywhere(spec, c.name):
            raise ScenarioError(f"{c.name} is fenced already: start from a fresh lab")


class Watch:
    """Conditions polled together; each is marked on the timeline the first time it holds."""

    def __init__(self, tl: Timeline) -> None:
        self.tl = tl
        self.conds: list[tuple[str, Callable[[], Any], Callable[[Any], str]]] = []
        self.met: dict[str, float] = {}

    def add(self, name: str, cond: Callable[[], Any],
            detail: Callable[[Any], str] = lambda _v: "") -> None:
        self.conds.append((name, cond, detail))

    def until(self, names: list[str], timeout: float) -> bool:
        """Poll until every condition in ``names`` held (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            new = []
            for name, cond, detail in self.conds:
                if name in self.met:
                    continue
                value = cond()
                if value:
                    wall = value if isinstance(value, float) else time.time()
                    self.met[name] = wall
                    new.append((wall, name, detail(value)))
            for wall, name, text in sorted(new):  # some times come from logs: in order
                self.tl.mark(name, text, wall=wall)
            if all(n in self.met for n in names):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)

    def since(self, name: str, t0: float) -> float | None:
        return self.met[name] - t0 if name in self.met else None


# ------------------------------------------------------------------ split-brain

def split_brain(spec: LabSpec, state: LabState, echo: Callable[[str], None],
                timeout: float = 30.0) -> ScenarioResult:
    """Cut a two-node cluster in two; exactly one side must keep its storage access."""
    if spec.nodes != 2:
        raise ScenarioError(f"split-brain needs a two-node lab (this one has {spec.nodes} "
                            "cluster nodes): storaged lab up --nodes 2")
    _ready(spec)
    c1, c2 = spec.cluster_nodes
    tl = Timeline(time.time(), echo)
    st = probe.cluster_status(spec, c1) or {}
    tl.mark("start", f"c1 and c2 in quorate view {st['view']['id']} (two_node: quorum 1 "
                     f"each), both with SAN access on "
                     f"{','.join(s.name for s in spec.storage_nodes)}")
    t_cut = time.time()
    cut(spec, c1, [c2])
    tl.mark("cut", "c1 <-> c2 blackholed (both still reach the storage nodes)", wall=t_cut)
    w = Watch(tl)
    for me, other in ((c1, c2), (c2, c1)):
        w.add(f"{me.name} detects", lambda me=me, other=other: (
            (s := probe.cluster_status(spec, me)) is not None and s.get("view") is not None
            and other.index not in _members(s) and s),
              lambda s: f"view {s['view']['id']} {_members(s)}, "
                        f"{'quorate' if _quorate(s) else 'NOT quorate'}, fencing pending: "
                        f"{s.get('pending_fence')}")
    w.add("c2 fenced at the SAN", lambda: _fenced_everywhere(spec, c2.name),
          lambda _v: f"on every storage node (fence_storaged run by c1's node, c2's "
                     f"fence of c1 would wait {spec_delay()} s first)")
    w.add("c1 recovered", lambda: "c1 detects" in w.met
          and _recovered(probe.cluster_status(spec, c1)),
          lambda _v: "no fence pending, DLM running: c1 serves locks alone")
    w.add("c1 fenced at the SAN (must not happen)", lambda: _fenced_anywhere(spec, c1.name))
    w.until(["c1 detects", "c2 detects", "c2 fenced at the SAN", "c1 recovered"], timeout)
    # c2's own fence of c1 waits for c1's delay, then finds c2 fenced: watch past that.
    settle = time.time() + spec_delay() + 2.0
    w.until(["c1 fenced at the SAN (must not happen)"], max(0.0, settle - time.time()))
    c2_state = probe.cluster_status(spec, c2)
    tl.mark("c2 stays cut off", f"pending fence {(c2_state or {}).get('pending_fence')}, "
                                f"lockspaces {(c2_state or {}).get('lockspaces')}: its own "
                                "status is 'fenced', so it does not fence c1 back")
    ok1, msg1 = san_login(spec, c1)
    tl.mark("SAN login as c1", ("accepted: " if ok1 else "REFUSED: ") + msg1)
    ok2, msg2 = san_login(spec, c2)
    tl.mark("SAN login as c2", ("accepted: " if ok2 else "refused: ") + msg2)
    t_w = time.time()
    wrote = _write_probe(spec, c1)
    tl.mark("write on c1's mount", wrote)
    access = {c.name: not _fenced_anywhere(spec, c.name) for c in (c1, c2)}
    tl.figure("detection c1", w.since("c1 detects", t_cut), "cut to c1's new view")
    tl.figure("detection c2", w.since("c2 detects", t_cut), "cut to c2's new view")
    tl.figure("fence", w.since("c2 fenced at the SAN", t_cut), "cut to c2 fenced everywhere")
    tl.figure("recovery", w.since("c1 recovered", t_cut), "cut to c1's DLM running")
    tl.figure("survivor write", time.time() - t_w if wrote.startswith("ok") else None,
              "create + fsync on c1 after recovery")
    survivors = [n for n, a in access.items() if a]
    ok = survivors == ["c1"] and ok1 and not ok2 and wrote.startswith("ok") \
        and "c1 recovered" in w.met
    verdict = ("exactly one side survived: c1 (c2 fenced at the SAN, c2's login refused)"
               if ok else f"FAILED: sides with access {survivors}, c1 login {ok1}, "
                          f"c2 login {ok2}, c1 write {wrote!r}")
    for line in tl.render_figures():
        echo(line)
    return ScenarioResult("split-brain", ok, verdict, tl, {"access": access})


def spec_delay() -> float:
    from storaged.lab.plan import TWO_NODE_DELAY_MS
    return TWO_NODE_DELAY_MS / 1000


def _write_probe(spec: LabSpec, node: Node, timeout: float = 20.0) -> str:
    """Create and fsync a file on ``node``'s mount (from the host: the mount is the host's),
    in a child process so a mount that blocks cannot block the scenario."""
    path = os.path.join(spec.mountpoint(node), f"probe-{int(time.time() * 1000)}")
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644); "
            "os.write(fd, b'probe'); os.fsync(fd); os.close(fd)")
    try:
        r = subprocess.run([spec.python, "-c", code, path], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"blocked for more than {timeout:g}s"
    if r.returncode != 0:
        return "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"ok ({os.path.basename(path)})"


# ------------------------------------------------------------------ failover

def _read_log(path: str) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def _max_gap(acks: list[dict[str, Any]], t_from: float) -> float | None:
    """The longest interval between consecutive acknowledgements that spans or follows
    ``t_from`` (the I/O pause a survivor's writer saw)."""
    times = sorted(a["t"] for a in acks if "error" not in a)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= t_from]
    return max(gaps) if gaps else None


def failover(spec: LabSpec, state: LabState, echo: Callable[[str], None], *, ack_dir: str,
             victim: str = "", seconds: float = 3.0, timeout: float = 30.0) -> ScenarioResult:
    """Writers everywhere, one node cut off and fenced, its journal replayed, then a
    check of every acknowledged write on the LUN."""
    if spec.nodes < 3:
        raise ScenarioError("failover needs at least three cluster nodes (a majority must "
                            "survive): storaged lab up --nodes 3")
    _ready(spec)
    try:
        v = spec.node(victim) if victim else spec.cluster_nodes[-1]
    except KeyError as e:
        raise ScenarioError(str(e.args[0])) from None
    if v.role != "cluster":
        raise ScenarioError(f"--victim {victim}: not a cluster node")
    survivors = [c for c in spec.cluster_nodes if c != v]
    slot = (probe.mount_status(spec, v) or {}).get("slot")
    os.makedirs(ack_dir, exist_ok=True)
    for c in spec.cluster_nodes:
        path = os.path.join(ack_dir, f"{c.name}.jsonl")
        if os.path.exists(path):
            os.unlink(path)
    tl = Timeline(time.time(), echo)
    runner = Runner(spec, state)
    steps = []
    for c in spec.cluster_nodes:
        cmd = [spec.python, "-m", "storaged.lab.writer",
               os.path.join(spec.mountpoint(c), f"w-{c.name}"),
               os.path.join(ack_dir, f"{c.name}.jsonl"), c.name]
        steps.append(Step("spawn", f"{c.name}: writer", argv=spec.in_netns(c.netns, cmd),
                          node=c.name, label=f"{c.name}/writer",
                          log=spec.log(c, "writer")))
    for s in steps:
        runner.execute(s)
    tl.mark("writers started", f"on {', '.join(c.name for c in spec.cluster_nodes)}: 4 KiB "
                               f"file + fsync per write, acks logged to {ack_dir}")
    time.sleep(seconds)
    logs = {c.name: os.path.join(ack_dir, f"{c.name}.jsonl") for c in spec.cluster_nodes}
    before = {n: len(_read_log(p)) for n, p in logs.items()}
    tl.mark("writing", ", ".join(f"{n} {k} acks" for n, k in before.items()))
    t_cut = time.time()
    cut(spec, v, survivors)
    tl.mark(f"cut {v.name}", f"links to {', '.join(c.name for c in survivors)} blackholed "
                             "(storage still reachable)", wall=t_cut)
    w = Watch(tl)
    w.add("survivors detect", lambda: all(
        (s := probe.cluster_status(spec, c)) is not None and s.get("view") is not None
        and v.index not in _members(s) for c in survivors),
          lambda _v: f"{v.name} left their view (token {spec.token_ms} ms + consensus)")
    w.add(f"{v.name} loses quorum", lambda: (s := probe.cluster_status(spec, v)) is not None
          and s.get("view") is not None and not _quorate(s),
          lambda _v: "no-quorum-policy stop: its locks are lost, its mount withdraws")
    w.add(f"{v.name} mount withdrew", lambda: (probe.mount_status(spec, v) or {}).get(
        "withdrawn"), lambda why: f"every operation now fails with EIO ({why})")
    w.add(f"{v.name} fenced at the SAN", lambda: _fenced_everywhere(spec, v.name),
          lambda _v: "fence_storaged off on every storage node (sessions dropped, logins "
                     "refused, PR keys preempted)")
    w.add("locks recovered", lambda: "survivors detect" in w.met and all(
        _recovered(probe.cluster_status(spec, c)) for c in survivors),
          lambda _v: "survivors' DLM running again")
    if slot is not None:
        w.add(f"journal {slot} replayed", lambda: probe.journal_clean(spec, slot),
              lambda _v: f"a survivor replayed {v.name}'s journal and marked it clean")

    def first_error() -> float | bool:
        errs = [a for a in _read_log(logs[v.name]) if "error" in a]
        return float(errs[0]["t"]) if errs else False
    w.add(f"{v.name} writer stopped", first_error,
          lambda _t: "its write failed: " + next(
              (a["error"] for a in _read_log(logs[v.name]) if "error" in a), "?"))

    def resumed() -> float | bool:
        fenced = w.met.get(f"{v.name} fenced at the SAN")
        if fenced is None:
            return False
        ts = []
        for c in survivors:
            after = [a["t"] for a in _read_log(logs[c.name]) if "error" not in a
                     and a["t"] > fenced]
            if not after:
                return False
            ts.append(min(after))
        return float(max(ts))
    w.add("I/O resumed on survivors", resumed, lambda _t: "every survivor's writer "
                                                          "acknowledged a write after the fence")
    need = ["survivors detect", f"{v.name} fenced at the SAN", "locks recovered",
            "I/O resumed on survivors"] + ([f"journal {slot} replayed"] if slot is not None
                                           else [])
    complete = w.until(need, timeout)
    w.until([f"{v.name} writer stopped", f"{v.name} loses quorum", f"{v.name} mount withdrew"],
            1.0)
    portal = portal_failover(spec, state, tl, logs, survivors, timeout)
    time.sleep(1.0)
    for c in spec.cluster_nodes:
        _stop_writer(state, c.name)
    tl.mark("writers stopped")
    ok_v, msg_v = san_login(spec, v)
    tl.mark(f"SAN login as {v.name}", ("ACCEPTED: " if ok_v else "refused: ") + msg_v)
    fenced_t = w.met.get(f"{v.name} fenced at the SAN")
    late = [a for a in _read_log(logs[v.name]) if "error" not in a and fenced_t
            and a["t_start"] > fenced_t]
    report = run_check(spec, ack_dir)
    tl.mark("check", f"{report.get('verified')}/{report.get('acknowledged')} acknowledged "
                     f"writes verified on the LUN through {spec.vip}"
            if "verified" in report else f"checker failed: {report.get('error')}")
    gaps = [g for c in survivors if (g := _max_gap(_read_log(logs[c.name]), t_cut))]
    tl.figure("detection", w.since("survivors detect", t_cut), "cut to the survivors' view")
    tl.figure("fence", w.since(f"{v.name} fenced at the SAN", t_cut), "cut to fenced everywhere")
    tl.figure("lock recovery", w.since("locks recovered", t_cut), "cut to DLM running")
    tl.figure("journal replay", w.since(f"journal {slot} replayed", t_cut)
              if slot is not None else None, "cut to the victim's journal clean")
    tl.figure("survivor I/O gap", max(gaps) if gaps else None,
              "longest pause between acknowledged writes on a survivor")
    tl.figure("victim stopped", w.since(f"{v.name} writer stopped", t_cut),
              "cut to the victim's first failed write")
    tl.figure("portal failover", portal.get("moved"),
              "storage node killed to the address on a survivor"
              if "moved" in portal else portal.get("why", "not run"))
    tl.figure("portal I/O gap", portal.get("io_gap"),
              "storage node killed to every survivor's next acknowledged write"
              if "io_gap" in portal else portal.get("why", "not run"))
    for line in tl.render_figures():
        echo(line)
    lost = report.get("acknowledged", 0) - report.get("verified", 0)
    ok = (complete and "verified" in report and lost == 0 and not ok_v and not late
          and report.get("acknowledged", 0) > 0 and portal.get("ok", False))
    if ok:
        verdict = (f"{v.name} fenced and replayed, survivors resumed, "
                   + (f"portal moved {portal['from']} -> {portal['to']}, "
                      if "to" in portal else "")
                   + f"{report['verified']}/{report['acknowledged']} acknowledged writes "
                     "on the LUN")
    else:
        missing = [n for n in need if n not in w.met]
        verdict = (f"FAILED: not reached {missing}, lost {lost}, victim login accepted "
                   f"{ok_v}, victim acks after its fence {len(late)}, portal {portal}, "
                   f"check {report}")
    return ScenarioResult("failover", ok, verdict, tl,
                          {"check": report, "victim": v.name, "late_acks": len(late),
                           "portal": portal})


def portal_failover(spec: LabSpec, state: LabState, tl: Timeline,
                    logs: dict[str, str], survivors: list[Node],
                    timeout: float) -> dict[str, Any]:
    """Kill (SIGKILL) the daemon of the storage node holding the floating portal address;
    watch the storage cluster fence it, the address come up on a survivor, and every
    surviving writer acknowledge a write through it.  The measured figures, or why not
    run (``ok`` is True when the step was not applicable: a one-storage-node lab)."""
    holders = vip_holders(spec)
    if spec.storage < 2:
        tl.mark("portal failover: not run", "one storage node: nobody to take the address")
        return {"ok": True, "why": "one storage node"}
    if len(holders) != 1:
        tl.mark("portal failover: not run", f"address {spec.vip} on {holders or 'nobody'}")
        return {"ok": False, "why": f"address on {holders or 'nobody'}"}
    owner = spec.node(holders[0])
    procs = [r for r in state.resources() if r.kind == "proc" and r.name == f"{owner.name}/serve"]
    if not procs or not proc_alive(procs[0].pid, procs[0].start_ticks):
        tl.mark("portal failover: not run", f"{owner.name}'s daemon is not running")
        return {"ok": False, "why": f"{owner.name}'s daemon not running"}
    t_kill = time.time()
    os.killpg(procs[0].pid, signal.SIGKILL)
    tl.mark(f"kill {owner.name}", f"SIGKILL to {owner.name}'s storaged serve (pid "
                                  f"{procs[0].pid}), the holder of {spec.vip}", wall=t_kill)
    w = Watch(tl)
    w.add(f"{owner.name} fenced", lambda: not switch_port_up(spec, owner.name),
          lambda _v: "the storage cluster's fence command took its bridge port down")
    w.add("address moved", lambda: (h := vip_holders(spec)) and owner.name not in h and h,
          lambda h: f"{spec.vip} up on {','.join(h)} (survivor's view, fence, DLM "
                    "recovery, lock granted, gratuitous ARPs)")

    def resumed() -> float | bool:
        moved = w.met.get("address moved")
        if moved is None:
            return False
        ts = []
        for c in survivors:
            after = [a["t"] for a in _read_log(logs[c.name]) if "error" not in a
                     and a["t"] > moved]
            if not after:
                return False
            ts.append(min(after))
        return float(max(ts))
    w.add("I/O resumed through the portal", resumed,
          lambda _t: "every survivor's writer acknowledged a write through the moved address")
    complete = w.until(["address moved", "I/O resumed through the portal"], timeout)
    w.until([f"{owner.name} fenced"], 0.5)
    now = vip_holders(spec)
    out: dict[str, Any] = {"from": owner.name, "holders": now,
                           "ok": complete and len(now) == 1 and owner.name not in now}
    if "address moved" in w.met:
        out["moved"] = w.since("address moved", t_kill)
        out["to"] = ",".join(now)
    if "I/O resumed through the portal" in w.met:
        out["io_gap"] = w.since("I/O resumed through the portal", t_kill)
    if not complete:
        out["why"] = "not reached within " + f"{timeout:g}s"
    return out


def _stop_writer(state: LabState, node: str) -> None:
    for r in state.resources():
        if r.kind == "proc" and r.name == f"{node}/writer":
            Runner(state.spec(), state).execute(Step("kill", f"stop {r.name}", label=r.name,
                                                 pid=r.pid, start_ticks=r.start_ticks))
            state.remove(r)


def run_check(spec: LabSpec, ack_dir: str, via: Node | None = None) -> dict[str, Any]:
    """Run :mod:`storaged.lab.check` in a storage node's namespace (default: the one
    holding the floating portal address, through it), reading the LUN over iSCSI;
    its JSON report (or ``{"error": ...}``)."""
    if via is None:
        holders = vip_holders(spec)
        node = spec.node(holders[0]) if holders else spec.storage_nodes[0]
        url = shared_lun_url(spec, "iqn.2026-11.org.storaged.lab:check")
    else:
        node = via
        url = shared_lun_url(spec, "iqn.2026-11.org.storaged.lab:check", node)
    argv = spec.in_netns(node.netns, [spec.python, "-m", "storaged.lab.check", url, ack_dir])
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "the checker did not finish within 120 s"}
    for line in r.stdout.splitlines():
        if line.startswith("CHECK-JSON "):
            return json.loads(line[len("CHECK-JSON "):])
    return {"error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"}

