"""Test fence agent for pacemaker's fencer: power-fences a storaged worker process.

Speaks the fence-agents protocol (``name=value`` lines on stdin): ``action``
``metadata`` prints the agent's XML, ``off``/``reboot`` SIGKILL the worker
whose pid is in ``<rundir>/pid-<N>`` for ``plug`` ``cn<N>`` (like cutting
power) and record the CLOCK_MONOTONIC time in ``<rundir>/fenced-<N>``,
``on``/``monitor``/``status``/``list`` succeed.  The test bind-mounts a
wrapper that runs this file over an agent path in pacemaker's own mount
namespace (where pacemaker-fenced looks for agents), never on the host.
"""

from __future__ import annotations

import os
import signal
import sys
import time

META = """<?xml version="1.0" ?>
<resource-agent name="fence_storaged_test" shortdesc="Test power fence for storaged workers">
<longdesc>SIGKILLs a storaged test worker process.</longdesc>
<parameters>
<parameter name="action" unique="0" required="0"><content type="string" default="off"/>
<shortdesc lang="en">Fencing action</shortdesc></parameter>
<parameter name="plug" unique="0" required="0"><content type="string"/>
<shortdesc lang="en">Node to fence</shortdesc></parameter>
<parameter name="port" unique="0" required="0"><content type="string"/>
<shortdesc lang="en">Node to fence</shortdesc></parameter>
<parameter name="rundir" unique="0" required="1"><content type="string"/>
<shortdesc lang="en">Directory with the workers' pid files</shortdesc></parameter>
</parameters>
<actions>
<action name="on"/><action name="off"/><action name="reboot"/><action name="status"/>
<action name="list"/><action name="monitor"/><action name="metadata"/>
</actions>
</resource-agent>
"""


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def main() -> int:
    opts = dict(line.strip().split("=", 1) for line in sys.stdin if "=" in line)
    action = opts.get("action", "off")
    if action == "metadata":
        sys.stdout.write(META)
        return 0
    if action in ("on", "monitor", "status", "list"):
        return 0
    plug = opts.get("plug") or opts.get("port") or ""
    node = plug.removeprefix("cn")
    rundir = opts["rundir"]
    try:
        with open(os.path.join(rundir, f"pid-{node}")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pid = 0
    deadline = time.monotonic() + 10
    while pid and not dead(pid):
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.005)
    try:  # the first fence is when the node died; pacemaker may repeat it
        with open(os.path.join(rundir, f"fenced-{node}"), "x") as f:
            f.write(str(time.monotonic_ns()))
    except FileExistsError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
