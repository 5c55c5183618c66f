"""Fencers: cut a failed node off before anyone recovers its resources.

A quorate view's coordinator calls ``await fencer.fence(node, incarnation)``
for every node that left uncleanly and recovery waits until it returns True
(a False answer is retried).  Shipped fencers:

* :class:`ManualFencer`: waits for an operator to run
  ``storaged cluster fence-ack NODE`` after making sure the node is down
  (like ``fence_ack_manual``);
* :class:`TestFencer`: confirms after a fixed delay and records the calls;
* :class:`CommandFencer`: runs a fence-agent-like command with the node id
  as its last argument; exit status 0 means fenced;
* :class:`AgentFencer`: runs any fence-agents agent (``fence_storaged``,
  ``fence_scsi``, ``fence_ipmilan``...) the way pacemaker's stonithd does:
  no arguments, ``action=off``, ``plug=<node name>`` and the configured
  options as ``name=value`` lines on stdin; exit status 0 means fenced.
  Before fencing it asks the agent for its own node's status: a node that
  was fenced itself (status exit 2) does not fence back.
* :class:`PacemakerFencer`: asks pacemaker's fencer (``stonith_admin
  --fence``), as dlm_controld does, then waits until pacemaker's fencing
  history shows the node fenced *after* it left; the fence device is
  whatever pacemaker has configured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storaged.cluster.config import ClusterConfig

log = logging.getLogger("storaged.cluster.fencing")


class Fencer(ABC):
    """Pluggable fencing interface."""

    name = "fencer"

    @abstractmethod
    async def fence(self, node: int, incarnation: int) -> bool:
        """Fence ``node``; True once it is confirmed cut off from shared storage."""

    def acknowledge(self, node: int) -> None:
        """An operator confirmed ``node`` is fenced (only the manual fencer cares)."""
        _ = node

    def node_left(self, node: int, incarnation: int, when: float) -> None:
        """``node`` left the view uncleanly at wall-clock time ``when`` (the pacemaker
        fencer only accepts a fence completed after that)."""
        _ = (node, incarnation, when)


class TestFencer(Fencer):
    """Confirms every request after ``delay`` seconds; ``calls`` records (node, inc, time)."""

    name = "test"
    __test__ = False  # not a pytest class

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[int, int, float]] = []

    async def fence(self, node: int, incarnation: int) -> bool:
        self.calls.append((node, incarnation, time.time()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return True


class ManualFencer(Fencer):
    """Waits until ``acknowledge(node)`` (``storaged cluster fence-ack NODE``)."""

    name = "manual"

    def __init__(self) -> None:
        self._acked: set[int] = set()
        self._waiters: dict[int, asyncio.Event] = {}

    async def fence(self, node: int, incarnation: int) -> bool:
        if node in self._acked:
            self._acked.discard(node)
            return True
        log.warning("node %d must be fenced: make sure it is powered off or cut off from "
                    "shared storage, then run: storaged cluster fence-ack %d", node, node)
        event = self._waiters.setdefault(node, asyncio.Event())
        await event.wait()
        self._waiters.pop(node, None)
        self._acked.discard(node)
        return True

    def acknowledge(self, node: int) -> None:
        event = self._waiters.get(node)
        if event is not None:
            event.set()
        else:
            self._acked.add(node)


class CommandFencer(Fencer):
    """Runs ``argv + [str(node)]``; exit status 0 means the node is fenced."""

    name = "command"

    def __init__(self, argv: list[str], timeout: float = 60.0) -> None:
        if not argv:
            raise ValueError("CommandFencer needs a command")
        self.argv = list(argv)
        self.timeout = timeout

    async def fence(self, node: int, incarnation: int) -> bool:
        proc = await asyncio.create_subprocess_exec(*self.argv, str(node))
        try:
            rc = await asyncio.wait_for(proc.wait(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("fence command for node %d timed out", node)
            return False
        if rc != 0:
            log.error("fence command for node %d exited with %d", node, rc)
        return rc == 0


AGENT_DIRS = ("/usr/sbin", "/usr/local/sbin")
STATUS_OFF = 2  # fence-agents: "status" of a node that is off (fenced)


def find_agent(agent: str) -> str:
    """The agent's path: as given if it has a '/', else found where stonithd
    looks (/usr/sbin), then on PATH."""
    if "/" in agent:
        return agent
    for d in AGENT_DIRS:
        path = os.path.join(d, agent)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(agent)
    if found is None:
        raise FileNotFoundError(f"fence agent {agent!r} not found in "
                                f"{', '.join(AGENT_DIRS)} or PATH")
    return found


class AgentFencer(Fencer):
    """Runs a fence-agents agent with stdin options, as stonithd does."""

    name = "agent"

    def __init__(self, agent: str, options: dict[str, str], names: dict[int, str],
                 self_name: str | None = None, timeout: float = 60.0) -> None:
        self.agent = agent
        self.options = dict(options)
        self.names = dict(names)
        self.self_name = self_name
        self.timeout = timeout
        self.calls: list[tuple[str, str, int]] = []
        """(action, plug, exit code) of every agent run, for status and tests."""

    def stdin(self, action: str, plug: str) -> bytes:
        lines = [f"action={action}", f"plug={plug}"]
        lines += [f"{k}={v}" for k, v in self.options.items()]
        return ("\n".join(lines) + "\n").encode()

    async def run(self, action: str, plug: str) -> int:
        """Run the agent once; its exit code (-1: it could not run or timed out)."""
        try:
            path = find_agent(self.agent)
            proc = await asyncio.create_subprocess_exec(
                path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            log.error("fence agent %s: %s", self.agent, e)
            return -1
        try:
            out, err = await asyncio.wait_for(proc.communicate(self.stdin(action, plug)),
                                              self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("fence agent %s %s %s timed out after %.0f s", self.agent, action, plug,
                      self.timeout)
            self.calls.append((action, plug, -1))
            return -1
        rc = proc.returncode if proc.returncode is not None else -1
        self.calls.append((action, plug, rc))
        if rc not in (0, STATUS_OFF) or (rc and action != "status"):
            log.error("fence agent %s %s %s exited with %d: %s", self.agent, action, plug, rc,
                      err.decode(errors="replace").strip()[-500:])
        return rc

    async def fence(self, node: int, incarnation: int) -> bool:
        plug = self.names.get(node, f"node{node}")
        if self.self_name:
            if await self.run("status", self.self_name) == STATUS_OFF:
                log.error("not fencing %s: this node (%s) is fenced itself", plug,
                          self.self_name)
                return False
        return await self.run("off", plug) == 0


STONITH_ADMIN = "stonith_admin"


def parse_fence_history(xml: str, target: str) -> list[tuple[str, str, float]]:
    """(action, status, completed wall time) of each ``<fence_event>`` for ``target`` in
    ``stonith_admin --history TARGET --output-as xml`` output (pacemaker 2.1)."""
    import calendar
    import xml.etree.ElementTree as ET
    out: list[tuple[str, str, float]] = []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return out
    for ev in root.iter("fence_event"):
        if ev.get("target") != target:
            continue
        stamp = ev.get("completed") or ""
        when = 0.0
        for fmt in ("%Y-%m-%d %H:%M:%SZ", "%Y-%m-%d %H:%M:%S %z"):
            try:
                when = float(calendar.timegm(time.strptime(stamp.replace("+00:00", "Z")
                                                           if fmt.endswith("Z") else stamp,
                                                           fmt)))
                break
            except ValueError:
                continue
        out.append((ev.get("action", ""), ev.get("status", ""), when))
    return out


class PacemakerFencer(Fencer):
    """Fences through pacemaker's fencer, like dlm_controld.

    ``stonith_admin --fence NAME --tolerance S`` asks pacemaker to fence the
    node unless it already did since the node left (pacemaker itself fences
    a node it lost, so the two requests must not fence twice); then the node
    counts as fenced only when ``stonith_admin --history NAME`` lists a
    successful ``off`` or ``reboot`` completed at or after the second the node
    left.  Needs pacemaker running on this host (its IPC is per network
    namespace, like corosync's).
    """

    name = "pacemaker"

    def __init__(self, names: dict[int, str], timeout: float = 120.0,
                 tool: str = STONITH_ADMIN) -> None:
        self.names = dict(names)
        self.timeout = timeout
        self.tool = tool
        self.left_at: dict[tuple[int, int], float] = {}
        self.calls: list[tuple[str, int]] = []

    def node_left(self, node: int, incarnation: int, when: float) -> None:
        self.left_at.setdefault((node, incarnation), when)

    async def _run(self, *args: str) -> tuple[int, str]:
        path = shutil.which(self.tool) or shutil.which(self.tool, path="/usr/sbin:/sbin")
        if path is None:
            log.error("%s not found: install pacemaker-cli-utils (and run pacemaker)",
                      self.tool)
            return -1, ""
        proc = await asyncio.create_subprocess_exec(
            path, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout + 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, ""
        rc = proc.returncode if proc.returncode is not None else -1
        if rc != 0:
            log.error("%s %s exited with %d: %s", self.tool, " ".join(args), rc,
                      err.decode(errors="replace").strip()[-500:])
        return rc, out.decode(errors="replace")

    async def history_ok(self, plug: str, since: float) -> bool:
        """True when pacemaker's history shows ``plug`` fenced at or after ``since``."""
        rc, out = await self._run("--history", plug, "--output-as", "xml")
        if rc != 0:
            return False
        return any(action in ("off", "reboot") and status == "success" and when >= int(since)
                   for action, status, when in parse_fence_history(out, plug))

    async def fence(self, node: int, incarnation: int) -> bool:
        plug = self.names.get(node, f"node{node}")
        since = self.left_at.get((node, incarnation), time.time())
        if not await self.history_ok(plug, since):
            tolerance = max(1, int(time.time() - since) + 1)
            rc, _ = await self._run("--fence", plug, "--timeout", str(int(self.timeout)),
                                    "--tolerance", f"{tolerance}s")
            self.calls.append((plug, rc))
        ok = await self.history_ok(plug, since)
        if ok:
            self.left_at.pop((node, incarnation), None)
            log.warning("pacemaker fenced %s (node %d)", plug, node)
        return ok


def make_fencer(kind: str, command: list[str] | None = None, delay: float = 0.0, *,
                config: ClusterConfig | None = None, node_id: int | None = None) -> Fencer:
    """The fencer named by the cluster config."""
    if kind == "agent":
        if config is None:
            raise ValueError("the agent fencer needs the cluster config")
        names = {n: config.node_name(n) for n in config.nodes}
        return AgentFencer(config.fence_agent, config.fence_options, names,
                           names.get(node_id) if node_id is not None else None)
    if kind == "pacemaker":
        if config is None:
            raise ValueError("the pacemaker fencer needs the cluster config")
        return PacemakerFencer({n: config.node_name(n) for n in config.nodes})
    if kind == "manual":
        return ManualFencer()
    if kind == "test":
        return TestFencer(delay)
    if kind == "command":
        return CommandFencer(command or [])
    raise ValueError(f"unknown fencer {kind!r}")
