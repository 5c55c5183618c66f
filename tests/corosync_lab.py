"""Three (or more) corosync nodes, each in its own network and mount namespace.

Layout for a lab with prefix ``P`` (``coro<pid>``): a bridge ``P-b`` in the
root namespace (no address: no traffic leaves the bridge), and per node ``i``
a network namespace ``Pn<i>`` holding one end of the veth pair ``Pv<i>`` /
``Pp<i>`` with the private address ``10.<a>.<b>.<i>/24``.  corosync runs as
``ip netns exec Pn<i> sh -c 'mount --bind ...; exec corosync -f'``: ``ip netns
exec`` gives every call a fresh mount namespace, in which the node's own
``/etc/corosync``, ``/var/lib/corosync`` and ``/run`` (corosync's pid lock)
are bind mounts of directories under the test's tmp dir.  Its IPC (libqb,
abstract Unix sockets) lives in the network namespace, so a storaged node
started with ``ip netns exec Pn<i>`` -- in another mount namespace, but the
same network namespace -- reaches exactly that node's corosync.

Everything made here is removed by :meth:`CorosyncLab.close`, even after a
failed start.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable

from support import require_tool

CONF = """totem {{
    version: 2
    cluster_name: {name}
    crypto_cipher: none
    crypto_hash: none
    token: {token}
    token_coefficient: 0
    join: 50
}}
logging {{
    blackbox: off
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}}
quorum {{
    provider: corosync_votequorum
}}
nodelist {{
{nodes}}}
"""
NODE = """    node {{
        name: {name}
        nodeid: {id}
        ring0_addr: {addr}
    }}
"""


CIB = """<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="o-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="o-startup-fencing" name="startup-fencing" value="false"/>
        <nvpair id="o-stonith-enabled" name="stonith-enabled" value="true"/>
        <nvpair id="o-no-quorum-policy" name="no-quorum-policy" value="stop"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>
{devices}    </resources>
    <constraints/>
  </configuration>
  <status/>
</cib>
"""
DEVICE = """      <primitive id="{id}" class="stonith" type="{agent}">
        <instance_attributes id="{id}-ia">
{params}        </instance_attributes>
      </primitive>
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAN = 10  #: the storage node's index (network namespace and address), not a corosync node


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


class CorosyncLab:
    """corosync nodes 1..n in network namespaces on one bridge."""

    def __init__(self, tmp_path, n: int = 3, token_ms: int = 1000, name: str = "corolab",
                 pacemaker_devices: dict[str, tuple[str, dict[str, str]]] | None = None,
                 san: bool = False) -> None:
        """``pacemaker_devices``: run pacemaker with these stonith devices (id -> (agent,
        params)); ``san``: one more namespace (index ``SAN``) for a storaged SAN daemon."""
        self.corosync = require_tool("corosync", "corosync")
        self.devices = pacemaker_devices
        self.san = san
        self.pacemakerd = self.crm_mon = self.stonith_admin = ""
        self.quorumtool = require_tool("corosync-quorumtool", "corosync")
        require_tool("ip", "iproute2")
        self.dir = str(tmp_path)
        self.n = n
        self.token_ms = token_ms
        self.name = name
        self.prefix = f"coro{os.getpid()}"
        pid = os.getpid()
        self.net = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.procs: dict[int, subprocess.Popen] = {}
        self.pcmk: dict[int, subprocess.Popen] = {}
        self.san_proc: subprocess.Popen | None = None
        self.corosync_pids: list[int] = []
        self.made_bridge = False
        self.netns: list[str] = []

    # -------------------------------------------------------------- names
    def ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def addr(self, i: int) -> str:
        return f"{self.net}.{i}"

    def veth(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    def node_name(self, i: int) -> str:
        return f"cn{i}"

    # ------------------------------------------------------------ set up
    def start(self, before_cluster: Callable[[], None] | None = None) -> None:
        """Network, corosync on every node, then pacemaker (when configured);
        ``before_cluster`` runs once the network is up (e.g. to start the SAN)."""
        try:
            self._network()
            if before_cluster is not None:
                before_cluster()
            for i in range(1, self.n + 1):
                self.start_corosync(i)
            self.wait_quorate(range(1, self.n + 1), self.n)
            if self.devices is not None:
                self.pacemakerd = require_tool("pacemakerd", "pacemaker")
                self.crm_mon = require_tool("crm_mon", "pacemaker-cli-utils")
                self.stonith_admin = require_tool("stonith_admin", "pacemaker-cli-utils")
                for i in range(1, self.n + 1):
                    self.start_pacemaker(i)
                self.wait_pacemaker()
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        br = f"{self.prefix}b"
        run("ip", "link", "add", br, "type", "bridge")
        self.made_bridge = True
        run("ip", "link", "set", br, "up")
        for i in self.indexes():
            ns, peer = self.ns(i), f"{self.prefix}p{i}"
            run("ip", "netns", "add", ns)
            self.netns.append(ns)
            run("ip", "link", "add", self.veth(i), "type", "veth", "peer", "name", peer)
            run("ip", "link", "set", peer, "netns", ns)
            run("ip", "link", "set", self.veth(i), "master", br, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", peer)
            run("ip", "-n", ns, "link", "set", peer, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def indexes(self) -> list[int]:
        """Every namespace's index: the corosync nodes, and the SAN if there is one."""
        return list(range(1, self.n + 1)) + ([SAN] if self.san else [])

    def node_dir(self, i: int) -> str:
        return os.path.join(self.dir, f"corosync-{i}")

    def start_corosync(self, i: int) -> None:
        d = self.node_dir(i)
        for sub in ("etc", "var", "run"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        nodes = "".join(NODE.format(name=self.node_name(j), id=j, addr=self.addr(j))
                        for j in range(1, self.n + 1))
        with open(os.path.join(d, "etc", "corosync.conf"), "w") as f:
            f.write(CONF.format(name=self.name, token=self.token_ms, nodes=nodes))
        script = (f"mount --bind {d}/etc /etc/corosync && "
                  f"mount --bind {d}/var /var/lib/corosync && "
                  f"mount --bind {d}/run /run && exec {self.corosync} -f")
        log = open(os.path.join(d, "corosync.log"), "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", self.ns(i), "sh", "-c", script],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.corosync_pids.append(self.procs[i].pid)  # sh execs corosync: the same pid
        log.close()

    def start_pacemaker(self, i: int) -> None:
        """pacemakerd in node i's network namespace, with its own /var/lib/pacemaker
        (a CIB seeded with the test's stonith devices), /var/log/pacemaker and /run.
        In its mount namespace /usr/sbin (where pacemaker-fenced looks for agents) is a
        directory of links to the real /usr/sbin (bind-mounted at ``real-sbin``) plus
        ``fence_storaged`` from this tree; the host's /usr/sbin is not touched."""
        import grp
        import pwd
        import sys
        uid, gid = pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
        d = os.path.join(self.node_dir(i), "pacemaker")
        for sub in ("lib/cib", "lib/pengine", "lib/blackbox", "lib/cores", "log", "run"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        devices = "".join(DEVICE.format(id=dev, agent=agent, params="".join(
            f'          <nvpair id="{dev}-{k}" name="{k}" value="{html.escape(v)}"/>\n'
            for k, v in params.items())) for dev, (agent, params) in (self.devices or {}).items())
        with open(os.path.join(d, "lib/cib/cib.xml"), "w") as f:
            f.write(CIB.format(devices=devices))
        for root, dirs, files in os.walk(d):
            for x in dirs + files:
                os.chown(os.path.join(root, x), uid, gid)
        os.chown(d, uid, gid)
        sbin, real = os.path.join(d, "sbin"), os.path.join(d, "real-sbin")
        os.makedirs(sbin, exist_ok=True)
        os.makedirs(real, exist_ok=True)
        for entry in os.listdir("/usr/sbin"):  # links to the real /usr/sbin, seen via `real`
            if not os.path.lexists(os.path.join(sbin, entry)):
                os.symlink(os.path.join(real, entry), os.path.join(sbin, entry))
        agent = os.path.join(sbin, "fence_storaged")
        if os.path.lexists(agent):
            os.unlink(agent)
        with open(agent, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                    f"-m fence.storaged_agent \"$@\"\n")
        os.chmod(agent, 0o755)
        script = (f"mount --bind {d}/lib /var/lib/pacemaker && "
                  f"mount --bind {d}/log /var/log/pacemaker && mount --bind {d}/run /run && "
                  f"mount --bind /usr/sbin {real} && mount --bind {sbin} /usr/sbin && "
                  f"PCMK_logfile=/var/log/pacemaker/pacemaker.log exec {self.pacemakerd} -f")
        log = open(os.path.join(d, "pacemakerd.out"), "ab")  # noqa: SIM115
        self.pcmk[i] = subprocess.Popen(["ip", "netns", "exec", self.ns(i), "sh", "-c", script],
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start_san(self, state: str, iscsi_port: int) -> str:
        """A storaged demo daemon (iSCSI on ``<SAN address>:iscsi_port``) in the SAN
        namespace, serving state directory ``state``; returns the SAN's address."""
        import sys
        os.makedirs(state, exist_ok=True)
        log = open(os.path.join(state, "daemon.log"), "ab")  # noqa: SIM115
        self.san_proc = subprocess.Popen(self.exec_argv(SAN, [
            sys.executable, "-m", "storaged", "demo", "--dir", state, "--iscsi",
            f"{self.addr(SAN)}:{iscsi_port}", "--nfs", "off", "--plain"]),
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, STORAGED_LOG="INFO"),
            cwd=ROOT)
        log.close()
        self.wait_listen(SAN, iscsi_port, self.san_proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(state, "control.sock")):
            assert self.san_proc.poll() is None and time.monotonic() < deadline, \
                "the SAN daemon did not start"
            time.sleep(0.02)
        return self.addr(SAN)

    def wait_listen(self, i: int, port: int, proc: subprocess.Popen | None = None,
                    timeout: float = 20.0) -> None:
        """Until something accepts TCP connections on namespace i's address:port."""
        import sys
        probe = (f"import socket; socket.create_connection(('{self.addr(i)}', {port}), "
                 "timeout=1).close()")
        deadline = time.monotonic() + timeout
        while run(*self.exec_argv(i, [sys.executable, "-c", probe]), check=False).returncode:
            assert proc is None or proc.poll() is None, f"nothing listens on {port}"
            assert time.monotonic() < deadline, f"nothing listens on {self.addr(i)}:{port}"
            time.sleep(0.1)

    def pcmk_run(self, i: int, *argv: str) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.ns(i), *argv, check=False)

    def wait_pacemaker(self, timeout: float = 60.0) -> None:
        """Until node 1's crm_mon shows every node online and the fence device started."""
        names = " ".join(self.node_name(j) for j in range(1, self.n + 1))
        deadline = time.monotonic() + timeout
        while True:
            out = self.pcmk_run(1, self.crm_mon, "-1").stdout
            if f"Online: [ {names} ]" in out and "Started" in out:
                return
            for i, p in self.pcmk.items():
                assert p.poll() is None, f"pacemakerd {i} exited:\n{self.pcmk_log(i)}"
            assert time.monotonic() < deadline, f"pacemaker not up:\n{out}\n{self.pcmk_log(1)}"
            time.sleep(0.3)

    def pcmk_log(self, i: int) -> str:
        path = os.path.join(self.node_dir(i), "pacemaker", "log", "pacemaker.log")
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def quorum(self, i: int) -> tuple[bool, int]:
        """(quorate, total votes) as corosync-quorumtool in node i's namespace says."""
        r = run("ip", "netns", "exec", self.ns(i), self.quorumtool, "-s", check=False)
        quorate = re.search(r"Quorate:\s+Yes", r.stdout) is not None
        m = re.search(r"Total votes:\s+(\d+)", r.stdout)
        return quorate, int(m.group(1)) if m else 0

    def wait_quorate(self, nodes, votes: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for i in nodes:
            while self.quorum(i) != (True, votes):
                p = self.procs.get(i)
                assert p is not None and p.poll() is None, f"corosync {i} died:\n{self.log(i)}"
                assert time.monotonic() < deadline, f"corosync {i} not quorate:\n{self.log(i)}"
                time.sleep(0.1)

    def log(self, i: int) -> str:
        try:
            with open(os.path.join(self.node_dir(i), "corosync.log"), "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------ actions
    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run in node i's network namespace (for the storaged node)."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def link(self, i: int, up: bool) -> None:
        """Cut (or restore) node i's link to the bridge: a partition."""
        run("ip", "link", "set", self.veth(i), "up" if up else "down")

    def kill_corosync(self, i: int) -> None:
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    # ----------------------------------------------------------- clean up
    def close(self) -> None:
        if self.san_proc is not None and self.san_proc.poll() is None:
            self.san_proc.terminate()
            try:
                self.san_proc.wait(15)
            except subprocess.TimeoutExpired:
                self.san_proc.kill()
                self.san_proc.wait()
        for p in self.pcmk.values():  # pacemaker first: it stops its daemons itself
            if p.poll() is None:
                p.terminate()
        for p in self.pcmk.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self.netns:
            # Whatever still runs in our namespaces (pacemaker's daemons if pacemakerd was
            # killed, a stray worker) was started by this lab: end it before the netns goes.
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", ns, check=False)
        self.netns = []
        if self.made_bridge:
            run("ip", "link", "del", f"{self.prefix}b", check=False)
            self.made_bridge = False
        for i in self.indexes():  # veths die with their peer; make sure
            run("ip", "link", "del", self.veth(i), check=False)
        self._clean_shm()

    def _clean_shm(self) -> None:
        """libqb's shared memory of our (now dead) corosyncs: a SIGKILLed corosync
        leaves its IPC ring buffers in /dev/shm (``qb-<server pid>-<client pid>-...``)."""
        import shutil
        try:
            entries = os.listdir("/dev/shm")
        except FileNotFoundError:
            return
        mine = {str(p) for p in self.corosync_pids}
        for e in entries:
            parts = e.split("-")
            if len(parts) >= 3 and parts[0] == "qb" and (
                    parts[1] in mine or (parts[1] == "corosync" and parts[2] in mine)):
                path = os.path.join("/dev/shm", e)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
