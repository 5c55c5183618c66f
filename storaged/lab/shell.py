"""Run a lab plan: ip(8) and nsenter(1) for namespaces, the storaged CLI for nodes.

Every resource is recorded in DIR's state store *before* it is created, and
removed from it once undone, so ``lab down`` finishes whatever a crash left:
namespaces by name, processes by pid checked against their start time (a
recycled pid is never signalled), mounts by path, files and directories
only under DIR.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from storaged.lab.plan import LabSpec, Step, plan_down
from storaged.lab.records import LabRecord, LabResource
from storaged.state import Store


class LabError(Exception):
    """A step failed; the message names the step and what it printed."""


# ------------------------------------------------------------------ processes

def proc_start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks), 0 if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def proc_alive(pid: int, start_ticks: int = 0) -> bool:
    """The process exists, is not a zombie, and (if given) started at ``start_ticks``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return not start_ticks or int(fields[19]) == start_ticks


def netns_list() -> list[str]:
    """Names ``ip netns list`` shows."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def switch_port_up(spec: LabSpec, node: str) -> bool:
    """``node``'s port on the lab bridge is up (the storage cluster's fence takes a
    storage node's port down)."""
    r = subprocess.run(["ip", "-n", spec.switch_netns, "-o", "link", "show", node],
                       capture_output=True, text=True)
    flags = r.stdout.split("<", 1)[-1].split(">", 1)[0].split(",")
    return r.returncode == 0 and "UP" in flags


def vip_holders(spec: LabSpec, reachable: bool = True) -> list[str]:
    """The storage nodes whose ``eth0`` carries the floating portal address now
    (``ip -n NS -o addr``: the kernel's answer, not a daemon's).  With ``reachable``
    only those whose bridge port is up: a killed daemon leaves the address on its
    interface, and once fenced (port down) nobody can reach it there."""
    out = []
    found = set(netns_list())
    for s in spec.storage_nodes:
        if s.netns not in found:
            continue
        r = subprocess.run(["ip", "-n", s.netns, "-o", "-4", "addr", "show", "dev", "eth0"],
                           capture_output=True, text=True)
        if any(f" {spec.vip}/" in line for line in r.stdout.splitlines()) and (
                not reachable or switch_port_up(spec, s.name)):
            out.append(s.name)
    return out


def resolve_parent(path: str) -> str:
    """``path`` with its parent resolved, not the last component: an lstat of a FUSE
    mount point is a request to that filesystem, and blocks while its node waits."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts_under(directory: str) -> list[str]:
    """Mount points at or below ``directory`` (from /proc/self/mounts)."""
    top = resolve_parent(directory)
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == top or mp.startswith(top + os.sep):
                out.append(mp)
    return out


def is_mounted(path: str) -> bool:
    """``path`` is a mount point, from /proc/self/mounts: never a stat of the mount
    itself, which blocks when the filesystem behind it waits (a node without locks)."""
    real = resolve_parent(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == real for line in f)


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " / ".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------ the lab store

class LabState:
    """DIR's state store: the :class:`LabRecord` and the resources made so far."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    @contextmanager
    def _store(self) -> Iterator[Store]:
        store = Store(self.directory)
        try:
            yield store
        finally:
            store.close()

    def exists(self) -> bool:
        return os.path.isdir(os.path.join(self.directory, "state.lmdb"))

    def lab(self) -> LabRecord | None:
        if not self.exists():
            return None
        with self._store() as s, s.read() as txn:
            return txn.get(LabRecord, LabRecord.KEY)

    def put_lab(self, rec: LabRecord) -> None:
        with self._store() as s, s.write() as txn:
            txn.put(rec)

    def resources(self) -> list[LabResource]:
        if not self.exists():
            return []
        with self._store() as s, s.read() as txn:
            return sorted(txn.list(LabResource), key=lambda r: r.seq)

    def add(self, kind: str, name: str, **kw: Any) -> LabResource:
        with self._store() as s, s.write() as txn:
            keys = txn.keys(LabResource)
            seq = int(keys[-1]) + 1 if keys else 1
            rec = LabResource(seq=seq, kind=kind, name=name, **kw)
            txn.put(rec)
        return rec

    def update(self, rec: LabResource) -> None:
        with self._store() as s, s.write() as txn:
            txn.put(rec)

    def remove(self, rec: LabResource) -> None:
        with self._store() as s, s.write() as txn:
            txn.delete(LabResource, rec.key)

    def spec(self) -> LabSpec:
        rec = self.lab()
        if rec is None:
            raise LabError(f"no lab in {self.directory}: run 'storaged lab up --dir "
                           f"{self.directory}' first")
        return spec_from_record(rec, self.directory)


def spec_from_record(rec: LabRecord, directory: str) -> LabSpec:
    """The :class:`LabSpec` of a recorded lab (this process's python and agent)."""
    return LabSpec(directory, storage=rec.storage, nodes=rec.nodes, lab_id=rec.lab_id,
                   subnet=rec.subnet, token_ms=rec.token_ms, image_mib=rec.image_mib,
                   python=default_python(), fence_agent=default_fence_agent())


def default_python() -> str:
    import sys
    return sys.executable


def default_fence_agent() -> str:
    """The fence_storaged next to this interpreter (the venv's console script)."""
    here = os.path.join(os.path.dirname(default_python()), "fence_storaged")
    return here if os.access(here, os.X_OK) else (shutil.which("fence_storaged")
                                                   or "fence_storaged")


# ------------------------------------------------------------------ running steps

class Runner:
    """Executes :class:`Step` lists, recording resources in a :class:`LabState`."""

    def __init__(self, spec: LabSpec, state: LabState,
                 echo: Callable[[str], None] = lambda _s: None) -> None:
        self.spec = spec
        self.state = state
        self.echo = echo
        self.procs: dict[str, tuple[subprocess.Popen, str]] = {}

    def run_all(self, steps: list[Step]) -> None:
        for step in steps:
            self.echo(step.what)
            self.execute(step)

    def execute(self, step: Step) -> None:
        handler = getattr(self, f"_do_{step.kind}", None)
        if handler is None:
            raise LabError(f"unknown step kind {step.kind!r}")
        handler(step)

    def _inside(self, path: str) -> bool:
        real = resolve_parent(path)
        top = os.path.realpath(self.spec.directory)
        return real == top or real.startswith(top + os.sep)

    # ---------------------------------------------------------------- up kinds
    def _do_netns(self, step: Step) -> None:
        self.state.add("netns", step.path, node=step.node)
        self._run(("ip", "netns", "add", step.path), step)

    def _do_dir(self, step: Step) -> None:
        if not os.path.isdir(step.path):
            self.state.add("dir", step.path, node=step.node)
            os.makedirs(step.path, exist_ok=True)

    def _do_file(self, step: Step) -> None:
        self.state.add("file", step.path, node=step.node)
        fd = os.open(step.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if step.stdin:
                os.write(fd, step.stdin.encode())
            if step.size:
                os.ftruncate(fd, step.size)
        finally:
            os.close(fd)

    def _do_run(self, step: Step) -> None:
        argv = self.spec.in_netns(step.netns, step.argv) if step.netns else step.argv
        self._run(argv, step)

    def _run(self, argv: tuple[str, ...], step: Step) -> None:
        r = subprocess.run(argv, input=step.stdin or None, capture_output=True, text=True,
                           env=dict(os.environ, **dict(step.env)), timeout=120)
        if r.returncode != 0:
            raise LabError(f"{step.what}: {' '.join(argv[:6])}... exited with "
                           f"{r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}")

    def _do_spawn(self, step: Step) -> None:
        if step.mount:
            self.state.add("mount", step.mount, node=step.node)
        rec = self.state.add("proc", step.label, node=step.node, extra={"log": step.log})
        logf = open(step.log or os.devnull, "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(step.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, **dict(step.env)))
        finally:
            logf.close()
        rec.pid, rec.start_ticks = proc.pid, proc_start_ticks(proc.pid)
        self.state.update(rec)
        self.procs[step.node] = (proc, step.log)

    def _check_alive(self, step: Step) -> None:
        entry = self.procs.get(step.node)
        if entry is not None and entry[0].poll() is not None:
            raise LabError(f"{step.what}: the process exited with {entry[0].returncode}: "
                           f"{_tail(entry[1])}")

    def _do_wait_socket(self, step: Step, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(step)
            if os.path.exists(step.path):
                with socket.socket(socket.AF_UNIX) as s:
                    if s.connect_ex(step.path) == 0:
                        return
            time.sleep(0.05)
        raise LabError(f"{step.what}: {step.path} did not appear within {timeout:g}s")

    def _do_wait_vip(self, step: Step, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.spec.storage_nodes:
                self._check_alive(Step("wait", f"{step.what} ({s.name}/serve)", node=s.name))
            if len(vip_holders(self.spec)) == 1:
                return
            time.sleep(0.1)
        raise LabError(f"{step.what}: holders {vip_holders(self.spec)} after {timeout:g}s: "
                       + " / ".join(_tail(self.spec.log(s, "serve"), 2)
                                    for s in self.spec.storage_nodes))

    def _do_wait_mount(self, step: Step, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(step)
            if is_mounted(step.path):
                return
            time.sleep(0.05)
        entry = self.procs.get(step.node)
        raise LabError(f"{step.what}: not mounted within {timeout:g}s"
                       + (f": {_tail(entry[1])}" if entry else ""))

    # ---------------------------------------------------------------- down kinds
    def _do_umount(self, step: Step) -> None:
        for argv in (("fusermount3", "-u", step.path), ("fusermount3", "-uz", step.path),
                     ("umount", "-l", step.path)):
            if not is_mounted(step.path):
                break
            subprocess.run(argv, capture_output=True)
        if is_mounted(step.path):
            raise LabError(f"{step.path} is still mounted")

    def _do_kill(self, step: Step, grace: float = 3.0) -> None:
        if not step.pid or not proc_alive(step.pid, step.start_ticks):
            return
        deadline = time.monotonic() + (grace if step.label.endswith("/mount") else 0)
        while time.monotonic() < deadline and proc_alive(step.pid, step.start_ticks):
            time.sleep(0.05)  # an unmounted mount process leaves the cluster and exits
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not proc_alive(step.pid, step.start_ticks):
                return
            try:
                os.killpg(step.pid, sig)  # the session it leads: its children too
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and proc_alive(step.pid, step.start_ticks):
                time.sleep(0.05)
        if proc_alive(step.pid, step.start_ticks):
            raise LabError(f"{step.label} (pid {step.pid}) survived SIGKILL")

    def _do_del_netns(self, step: Step) -> None:
        if step.path in netns_list():
            self._run(("ip", "netns", "del", step.path), step)

    def _do_rm(self, step: Step) -> None:
        if not self._inside(step.path):
            raise LabError(f"refusing to remove {step.path}: outside {self.spec.directory}")
        still = mounts_under(step.path)
        if still:  # never walk into a mounted filesystem (it is the shared one)
            raise LabError(f"refusing to remove {step.path}: {', '.join(still)} still mounted")
        if os.path.isdir(step.path) and not os.path.islink(step.path):
            shutil.rmtree(step.path, ignore_errors=True)
        elif os.path.lexists(step.path):
            os.unlink(step.path)


# ------------------------------------------------------------------ up / down

def lab_up(spec: LabSpec, password: str, echo: Callable[[str], None]) -> LabRecord:
    """Build the lab; on any failure remove what was made and raise :class:`LabError`."""
    from storaged.lab.plan import plan_up

    state = LabState(spec.directory)
    old = state.lab()
    if old is not None:
        raise LabError(f"a lab ({old.lab_id}) already exists in {spec.directory}: "
                       f"'storaged lab down --dir {spec.directory}' first")
    clash = [n for n in netns_list() if n.startswith(f"{spec.lab_id}-")]
    if clash:
        raise LabError(f"namespaces of lab id {spec.lab_id} already exist ({', '.join(clash)}): "
                       "another lab uses this id; pick another --id or remove it")
    for tool, pkg in (("ip", "iproute2"), ("nsenter", "util-linux"),
                      ("fusermount3", "fuse3")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise LabError(f"{tool} not found: install the Debian package {pkg}")
    dir_created = not os.path.isdir(spec.directory)
    os.makedirs(spec.directory, exist_ok=True)
    if not dir_created and any(n != "state.lmdb" for n in os.listdir(spec.directory)):
        raise LabError(f"{spec.directory} is not empty: give lab up a new or empty directory")
    rec = LabRecord(lab_id=spec.lab_id, storage=spec.storage, nodes=spec.nodes,
                    subnet=spec.subnet, token_ms=spec.token_ms, image_mib=spec.image_mib,
                    created=time.time(), dir_created=dir_created)
    state.put_lab(rec)
    runner = Runner(spec, state, echo)
    try:
        runner.run_all(plan_up(spec, password))
    except BaseException as e:
        echo(f"lab up failed: {e}; removing what was made")
        try:
            lab_down(spec.directory, echo)
        except LabError as e2:
            echo(f"cleanup: {e2}")
        if isinstance(e, LabError | OSError | subprocess.SubprocessError):
            raise LabError(str(e)) from e
        raise
    rec.ready = True
    state.put_lab(rec)
    return rec


def lab_down(directory: str, echo: Callable[[str], None], lab_id: str | None = None) -> int:
    """Remove everything the lab in ``directory`` made; the number of steps run."""
    state = LabState(directory)
    rec = state.lab()
    if rec is None and lab_id is None:
        raise LabError(f"no lab in {os.path.abspath(directory)} (give --id to sweep "
                       "namespaces of a lab whose directory is gone)")
    spec = spec_from_record(rec, directory) if rec else LabSpec(directory, lab_id=lab_id or "")
    resources = state.resources()
    # Mounts below DIR that were never recorded (a crash between mount and record).
    recorded = {r.name for r in resources if r.kind == "mount"}
    steps = plan_down(resources, netns_list(), spec.lab_id)
    extra = [Step("umount", f"unmount {m}", path=m) for m in mounts_under(spec.directory)
             if m not in recorded]
    runner = Runner(spec, state, echo)
    errors: list[str] = []
    by_name = {(r.kind, r.name): r for r in resources}
    for step in extra + steps:
        echo(step.what)
        try:
            runner.execute(step)
        except (LabError, OSError) as e:
            errors.append(str(e))
            continue
        kind = {"umount": "mount", "kill": "proc", "del_netns": "netns"}.get(step.kind)
        key = (kind, step.label if kind == "proc" else step.path)
        if step.kind == "rm":
            for k in ("file", "dir"):
                if (k, step.path) in by_name:
                    state.remove(by_name[(k, step.path)])
        elif key in by_name:
            state.remove(by_name[key])
    if errors:
        raise LabError("lab down left something behind: " + "; ".join(errors))
    store_dir = os.path.join(spec.directory, "state.lmdb")
    shutil.rmtree(store_dir, ignore_errors=True)
    if rec is None or rec.dir_created:
        try:
            os.rmdir(spec.directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LabError(f"{spec.directory}: {e.strerror} (something not made by the lab "
                           "is in it)") from e
    return len(extra) + len(steps)
