"""What a lab consists of and the ordered steps that build it (sans-IO: no processes, no ip).

:class:`LabSpec` turns the user's choices (storage nodes, cluster nodes,
directory, id) into names, addresses and paths; :func:`plan_up` into a list
of :class:`Step` that :mod:`storaged.lab.shell` executes; :func:`plan_down`
turns the recorded resources back into the steps that remove them.

Network layout: one namespace per node plus a switch namespace holding the
bridge ``br0``.  Each node's ``eth0`` is a veth whose peer sits in the switch
namespace on the bridge, so nothing is created in the host's namespace and
no lab address is reachable from (or routed to) the host.  Every namespace
name starts with the lab id (``<id>-sw``, ``<id>-s1``, ``<id>-c1``), so two
labs or CI runs never collide.

The storage nodes form a storaged cluster of their own and hold the
floating portal address :attr:`LabSpec.vip` (``storaged vip``); the pieces
that decide how the LUN is reached are one function each:

* :func:`portal_addresses`: the storage nodes' portals (own address and the
  floating one; a group portal per node would join here);
* :func:`device_for`: what a cluster node mounts: the shared LUN as an
  ``iscsi://`` URL through the floating address (storaged's initiator, the
  node's own IQN);
* :func:`mount_steps`: how a cluster node mounts (and so runs its
  cluster node: the mount process holds membership + DLM).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shlex
from dataclasses import dataclass, field

from storaged.lab.records import LAB_ID_RE, LabResource

TARGET_IQN = "iqn.2026-11.org.storaged.lab:shared"
INITIATOR_PREFIX = "iqn.2026-11.org.storaged.lab"
ISCSI_PORT = 3260
MGMT_PORT = 3261
CLUSTER_PORT = 7870
FENCE_USER = "fencer"
CLUSTER_NAME = "lab"
DEFAULT_SUBNET = "10.250.0.0/24"
#: the floating portal address (``storaged vip``) the storage nodes hold
VIP_HOST = 10
#: the storage nodes' own cluster (membership + DLM inside ``storaged serve``)
STORAGE_CLUSTER = "labstore"
STORAGE_HOST0 = 11
CLUSTER_HOST0 = 21
#: the winner of a two-node fence race: fencing node 1 waits this long
TWO_NODE_DELAY_MS = 3000


def default_lab_id(directory: str) -> str:
    """``lab`` + 4 hex digits of DIR's real path: stable for one DIR, distinct for two."""
    digest = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()
    return "lab" + digest[:4]


@dataclass(frozen=True)
class Node:
    """One host of the lab."""

    name: str
    """``s1``, ``s2``... (storage) or ``c1``, ``c2``... (cluster)."""
    role: str
    index: int
    netns: str
    address: str
    prefix: int

    @property
    def iqn(self) -> str:
        """The initiator name of a cluster node (what the storage nodes fence)."""
        return f"{INITIATOR_PREFIX}:{self.name}"


@dataclass(frozen=True)
class Step:
    """One thing to do.  ``kind`` says how the shell does it:

    * ``netns``/``dir``/``file``: create (recorded first, so undone by ``lab down``);
    * ``run``: run ``argv`` (in ``netns`` if set) and require exit 0;
    * ``spawn``: start ``argv`` as a long-running process (recorded as ``label``);
    * ``wait_socket``/``wait_mount``: wait until ``path`` is a socket / a mount point;
    * ``kill``/``umount``/``del_netns``/``rm``: the undo kinds of :func:`plan_down`.
    """

    kind: str
    what: str
    argv: tuple[str, ...] = ()
    netns: str = ""
    path: str = ""
    node: str = ""
    label: str = ""
    stdin: str = ""
    size: int = 0
    env: tuple[tuple[str, str], ...] = ()
    log: str = ""
    mount: str = ""
    """``spawn``: the mount point this process serves (recorded as a mount too)."""
    pid: int = 0
    start_ticks: int = 0


@dataclass
class LabSpec:
    """The lab's shape and every name, address and path derived from it."""

    directory: str
    storage: int = 2
    nodes: int = 3
    lab_id: str = ""
    subnet: str = DEFAULT_SUBNET
    token_ms: int = 1000
    image_mib: int = 64
    python: str = "python3"
    fence_agent: str = "fence_storaged"
    _net: ipaddress.IPv4Network = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = os.path.abspath(self.directory)
        self.lab_id = self.lab_id or default_lab_id(self.directory)
        problems = []
        if not LAB_ID_RE.match(self.lab_id):
            problems.append(f"lab id {self.lab_id!r}: a lowercase letter then up to 9 letters "
                            "or digits (it prefixes namespace names, at most 15 characters)")
        if not 1 <= self.storage <= 4:
            problems.append(f"--storage {self.storage}: 1 to 4 storage nodes")
        if not 2 <= self.nodes <= 8:
            problems.append(f"--nodes {self.nodes}: 2 to 8 cluster nodes")
        try:
            self._net = ipaddress.IPv4Network(self.subnet, strict=True)
        except ValueError as e:
            problems.append(f"--subnet {self.subnet}: {e}")
        else:
            if not self._net.is_private:
                problems.append(f"--subnet {self.subnet}: not a private (RFC 1918) network")
            elif self._net.num_addresses < 64:
                problems.append(f"--subnet {self.subnet}: needs at least a /26")
        if problems:
            raise ValueError("; ".join(problems))

    # ------------------------------------------------------------ names
    @property
    def switch_netns(self) -> str:
        return f"{self.lab_id}-sw"

    def _node(self, role: str, i: int) -> Node:
        name = ("s" if role == "storage" else "c") + str(i)
        host = (STORAGE_HOST0 if role == "storage" else CLUSTER_HOST0) + i - 1
        return Node(name, role, i, f"{self.lab_id}-{name}", str(self._net[host]),
                    self._net.prefixlen)

    @property
    def storage_nodes(self) -> list[Node]:
        return [self._node("storage", i) for i in range(1, self.storage + 1)]

    @property
    def cluster_nodes(self) -> list[Node]:
        return [self._node("cluster", i) for i in range(1, self.nodes + 1)]

    @property
    def all_nodes(self) -> list[Node]:
        return self.storage_nodes + self.cluster_nodes

    def node(self, name: str) -> Node:
        for n in self.all_nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in lab {self.lab_id} "
                       f"(nodes: {', '.join(n.name for n in self.all_nodes)})")

    @property
    def vip(self) -> str:
        """The floating portal address: held by exactly one storage node (``storaged vip``)."""
        return str(self._net[VIP_HOST])

    @property
    def storage_fence_script(self) -> str:
        """The storage cluster's fence command: takes the node's bridge port down."""
        return os.path.join(self.directory, "storage-fence.sh")

    # ------------------------------------------------------------ paths
    def node_dir(self, node: Node | str) -> str:
        return os.path.join(self.directory, node if isinstance(node, str) else node.name)

    def mountpoint(self, node: Node) -> str:
        return os.path.join(self.node_dir(node), "mnt")

    def run_dir(self, node: Node) -> str:
        """The mount's status socket and log (``STORAGED_FS_RUNDIR``)."""
        return os.path.join(self.node_dir(node), "run")

    @property
    def image(self) -> str:
        return os.path.join(self.directory, "shared.img")

    @property
    def password_file(self) -> str:
        return os.path.join(self.directory, "fencer.pw")

    def log(self, node: Node, what: str) -> str:
        return os.path.join(self.node_dir(node), f"{what}.log")

    def in_netns(self, netns: str, argv: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """``argv`` run inside ``netns`` (network namespace only: the host's mounts and
        files stay visible, so a FUSE mount made there is the host's mount)."""
        return ("nsenter", f"--net=/run/netns/{netns}", "--", *argv)

    def storaged(self, node: Node | str, *args: str) -> tuple[str, ...]:
        return (self.python, "-m", "storaged", "--dir", self.node_dir(node), *args)


# ---------------------------------------------------------------- pluggable pieces

def portal_addresses(spec: LabSpec, node: Node) -> list[str]:
    """The portals storage node ``node`` listens on: its own address and the floating
    portal address (opened only while this node holds it, docs/ha.md)."""
    return [f"{node.address}:{ISCSI_PORT}", f"{spec.vip}:{ISCSI_PORT}"]


def shared_lun_url(spec: LabSpec, initiator: str | None = None,
                   storage: Node | None = None) -> str:
    """The shared LUN through ``storage``'s own address, or (default) through the
    floating portal address, whichever storage node holds it."""
    host = storage.address if storage is not None else spec.vip
    query = f"?initiator={initiator}" if initiator else ""
    return f"iscsi://{host}:{ISCSI_PORT}/{TARGET_IQN}/0{query}"


def device_for(spec: LabSpec, node: Node) -> str:
    """What cluster node ``node`` mounts: the shared LUN through storaged's initiator and
    the floating portal address, logged in as the node's own initiator name, so the
    SAN fence of that name (sessions dropped, logins refused) withdraws the mount at
    its next I/O, and a storage node's death only moves the address under it."""
    return shared_lun_url(spec, node.iqn)


def mount_steps(spec: LabSpec, node: Node) -> list[Step]:
    """Mount the shared filesystem on ``node``; the mount process runs that host's
    cluster node (membership + DLM + fencer), as ``storaged fs mount --cluster`` does."""
    cmd = spec.storaged(node, "fs", "mount", device_for(spec, node), spec.mountpoint(node),
                        "--cluster", spec.node_dir(node), "--foreground", "--timeout", "60")
    return [Step("spawn", f"{node.name}: mount the shared filesystem (cluster node {node.index})",
                 argv=spec.in_netns(node.netns, cmd), node=node.name, label=f"{node.name}/mount",
                 env=(("STORAGED_FS_RUNDIR", spec.run_dir(node)), ("STORAGED_LOG", "INFO")),
                 log=spec.log(node, "mount"), mount=spec.mountpoint(node))]


# ---------------------------------------------------------------- up

def _network_steps(spec: LabSpec) -> list[Step]:
    sw = spec.switch_netns
    steps = [Step("netns", f"namespace {sw} (the switch)", path=sw),
             Step("run", "bridge br0", argv=("ip", "-n", sw, "link", "add", "br0", "type",
                                             "bridge")),
             Step("run", "bridge up", argv=("ip", "-n", sw, "link", "set", "br0", "up"))]
    for n in spec.all_nodes:
        steps += [
            Step("netns", f"namespace {n.netns}", path=n.netns, node=n.name),
            Step("run", f"{n.name}: veth eth0 <-> {sw}/{n.name}",
                 argv=("ip", "-n", sw, "link", "add", n.name, "type", "veth", "peer", "name",
                       "eth0", "netns", n.netns)),
            Step("run", f"{n.name}: on the bridge",
                 argv=("ip", "-n", sw, "link", "set", n.name, "master", "br0", "up")),
            Step("run", f"{n.name}: address {n.address}/{n.prefix}",
                 argv=("ip", "-n", n.netns, "addr", "add", f"{n.address}/{n.prefix}", "dev",
                       "eth0")),
            Step("run", f"{n.name}: links up",
                 argv=("sh", "-c", f"ip -n {n.netns} link set lo up && "
                                   f"ip -n {n.netns} link set eth0 up")),
        ]
    return steps


def storage_fence_text(spec: LabSpec) -> str:
    """The storage cluster's fence command (``--fencer command``, node id appended):
    take storage node ``s<id>``'s port on the lab bridge down, as fence_ifmib does on
    a switch.  A dead or cut-off storage node then cannot answer on the floating
    address after a survivor took it."""
    return ("#!/bin/sh\n# storaged lab: fence storage node s<id> by its bridge port\n"
            f"exec ip -n {spec.switch_netns} link set \"s$1\" down\n")


def _storage_cluster_steps(spec: LabSpec, s: Node) -> list[Step]:
    """``s`` joins the storage nodes' own cluster (run by ``storaged serve``) and may
    hold the floating portal address (preference s1, s2, ...)."""
    members = [f"--node={x.index}={x.address}:{CLUSTER_PORT}" for x in spec.storage_nodes]
    two = ("--two-node",) if spec.storage == 2 else ()
    prefer = ",".join(str(x.index) for x in spec.storage_nodes)
    return [
        Step("run", f"{s.name}: storage cluster {STORAGE_CLUSTER}, node {s.index}",
             argv=spec.storaged(s, "cluster", "init", STORAGE_CLUSTER, f"--id={s.index}",
                                *members, f"--token-ms={spec.token_ms}", *two,
                                "--fencer=command",
                                f"--fence-command=sh {spec.storage_fence_script}")),
        Step("run", f"{s.name}: floating portal address {spec.vip}/{s.prefix}",
             argv=spec.storaged(s, "vip", "add", f"{spec.vip}/{s.prefix}", "--dev", "eth0",
                                "--node-preference", prefer)),
    ]


def _same_identity_steps(spec: LabSpec, s: Node) -> list[Step]:
    """Storage nodes after the first take its LU identity (wwn, serial): one LU with a
    path per node, and one ``pr:<wwn>`` lock for their shared reservations."""
    first = spec.storage_nodes[0]
    if s == first:
        return []
    return [Step("run", f"{s.name}: LU identity of {first.name} (same wwn and serial)",
                 argv=(spec.python, "-m", "storaged.lab.identity", spec.node_dir(first),
                       spec.node_dir(s), "shared"))]


def _storage_steps(spec: LabSpec, password: str) -> list[Step]:
    steps: list[Step] = [Step("file", "storage cluster fence command (bridge port down)",
                              path=spec.storage_fence_script,
                              stdin=storage_fence_text(spec))]
    for s in spec.storage_nodes:
        cli = lambda *a, s=s: spec.storaged(s, *a)  # noqa: E731
        steps += [
            Step("dir", f"{s.name}: state directory", path=spec.node_dir(s), node=s.name),
            *_storage_cluster_steps(spec, s),
            Step("run", f"{s.name}: backstore on the shared image (shared PR with the other "
                        "storage nodes)",
                 argv=cli("backstore", "create", "shared", spec.image, "--no-write-cache",
                          "--shared")),
            *_same_identity_steps(spec, s),
            Step("run", f"{s.name}: target {TARGET_IQN}",
                 argv=cli("target", "create", TARGET_IQN,
                          *[a for p in portal_addresses(spec, s) for a in ("--portal", p)])),
            Step("run", f"{s.name}: LUN 0", argv=cli("lun", "add", TARGET_IQN, "shared",
                                                     "--lun", "0")),
            Step("run", f"{s.name}: open access (fenced initiators are still refused)",
                 argv=cli("target", "open", TARGET_IQN)),
        ]
        for c in spec.cluster_nodes:
            steps.append(Step("run", f"{s.name}: fence map {c.name} -> {c.iqn}",
                              argv=cli("fence", "map", c.name, "--initiator", c.iqn)))
        steps += [
            Step("run", f"{s.name}: management endpoint {s.address}:{MGMT_PORT}",
                 argv=cli("mgmt", "listen", f"{s.address}:{MGMT_PORT}")),
            Step("run", f"{s.name}: fence agent user {FENCE_USER}",
                 argv=cli("mgmt", "user-add", FENCE_USER, "--password-stdin"),
                 stdin=password + "\n"),
            Step("spawn", f"{s.name}: storaged serve", argv=spec.in_netns(s.netns, cli("serve")),
                 node=s.name, label=f"{s.name}/serve", env=(("STORAGED_LOG", "INFO"),),
                 log=spec.log(s, "serve")),
        ]
    for s in spec.storage_nodes:
        steps.append(Step("wait_socket", f"{s.name}: daemon ready",
                          path=os.path.join(spec.node_dir(s), "control.sock"), node=s.name))
    steps.append(Step("wait_vip", f"floating portal address {spec.vip} held by one storage "
                                  "node", path=spec.vip))
    return steps


def _cluster_steps(spec: LabSpec) -> list[Step]:
    steps: list[Step] = []
    members = [f"--node={c.index}={c.address}:{CLUSTER_PORT}" for c in spec.cluster_nodes]
    ips = ",".join(f"{s.address}:{MGMT_PORT}" for s in spec.storage_nodes)
    two = ("--two-node",) if spec.nodes == 2 else ()
    for c in spec.cluster_nodes:
        cli = lambda *a, c=c: spec.storaged(c, *a)  # noqa: E731
        fencing = ["cluster", "fencing", "--fencer", "agent", "--agent", spec.fence_agent,
                   "--option", f"ip={ips}", "--option", f"username={FENCE_USER}",
                   "--option", "password_script=cat " + shlex.quote(spec.password_file)]
        fencing += [f"--node-name={x.index}={x.name}" for x in spec.cluster_nodes]
        if spec.nodes == 2:
            fencing.append(f"--node-delay-ms=1={TWO_NODE_DELAY_MS}")
        steps += [
            Step("dir", f"{c.name}: state directory", path=spec.node_dir(c), node=c.name),
            Step("dir", f"{c.name}: mount point", path=spec.mountpoint(c), node=c.name),
            Step("run", f"{c.name}: cluster {CLUSTER_NAME}, node {c.index}",
                 argv=cli("cluster", "init", CLUSTER_NAME, f"--id={c.index}", *members,
                          f"--token-ms={spec.token_ms}", *two)),
            Step("run", f"{c.name}: fencing through fence_storaged on {ips}",
                 argv=cli(*fencing)),
        ]
    for c in spec.cluster_nodes:
        steps += mount_steps(spec, c)
    for c in spec.cluster_nodes:
        steps.append(Step("wait_mount", f"{c.name}: mounted", path=spec.mountpoint(c),
                          node=c.name))
    return steps


def plan_up(spec: LabSpec, password: str) -> list[Step]:
    """Every step of ``lab up``, in order."""
    steps = _network_steps(spec)
    steps += [
        Step("file", f"shared image ({spec.image_mib} MiB, sparse)", path=spec.image,
             size=spec.image_mib << 20),
        Step("run", f"clusterfs with {spec.nodes} journals on the shared image",
             argv=(spec.python, "-m", "storaged", "fs", "mkfs", spec.image,
                   f"--journals={spec.nodes}", "--label=lab")),
        Step("file", "fence agent password", path=spec.password_file, stdin=password + "\n"),
    ]
    steps += _storage_steps(spec, password)
    steps += _cluster_steps(spec)
    return steps


# ---------------------------------------------------------------- down

def plan_down(resources: list[LabResource], netns_found: list[str],
              lab_id: str) -> list[Step]:
    """The steps that remove ``resources`` (and any namespace named ``<lab_id>-*`` that
    ``ip netns list`` shows), in a safe order: unmount first (a mount process then
    leaves the cluster cleanly), then stop processes (newest first), then delete
    namespaces (that removes their veths and the bridge), then files and
    directories (deepest first)."""
    by_kind: dict[str, list[LabResource]] = {}
    for r in sorted(resources, key=lambda r: r.seq):
        by_kind.setdefault(r.kind, []).append(r)
    steps = [Step("umount", f"unmount {r.name}", path=r.name, node=r.node)
             for r in reversed(by_kind.get("mount", []))]
    steps += [Step("kill", f"stop {r.name} (pid {r.pid})", label=r.name, pid=r.pid,
                   start_ticks=r.start_ticks, node=r.node)
              for r in reversed(by_kind.get("proc", []))]
    names = [r.name for r in by_kind.get("netns", [])]
    names += sorted(n for n in netns_found if n.startswith(f"{lab_id}-") and n not in names)
    steps += [Step("del_netns", f"delete namespace {n}", path=n) for n in reversed(names)]
    paths = [r.name for r in by_kind.get("file", []) + by_kind.get("dir", [])]
    steps += [Step("rm", f"remove {p}", path=p)
              for p in sorted(set(paths), key=lambda p: (-p.count(os.sep), p))]
    return steps
