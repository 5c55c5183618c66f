"""Serve one directory over NFS without a state store (development and benchmarks).

    python -m storaged.nfs DIR [--listen 127.0.0.1:2049] [--path /export]
                               [--portmap auto|builtin|system|off] [--squash none|root|all]

The daemon (``storaged serve`` / ``storaged demo``) is the normal way to run
NFS; this runner exists so the NFS stack can be measured and debugged alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from storaged.nas.exports import Export, LiveExport
from storaged.nas.hostfs import HostFs
from storaged.nfs.lockd import LockService
from storaged.nfs.server import NfsServer
from storaged.state import split_portal


async def _serve(args: argparse.Namespace) -> None:
    server = NfsServer()
    lockd = LockService(server)  # NLM + NSM with in-memory NSM state
    record = Export(path=args.path, directory=os.path.abspath(args.directory),
                    squash=args.squash, export_id=args.export_id,
                    handle_key=args.handle_key, attr_timeout=args.attr_timeout)
    record.validate()
    fs = HostFs(record.directory, fsid=record.export_id)
    server.exports.set([LiveExport(record, fs)])
    host, port = split_portal(args.listen)
    await server.start(host, port, args.portmap)
    lockd.start(args.grace)
    await lockd.listen_udp(host, server.address[1],  # type: ignore[index]
                           111 if server.portmap_mode == "builtin" else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving {record.directory} as {record.path} on {host}:{server.address[1]}",
          flush=True)
    try:
        await stop.wait()
    finally:
        await lockd.stop()
        await server.stop()
        fs.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storaged.nfs", description=__doc__.split("\n")[0])
    p.add_argument("directory")
    p.add_argument("--listen", default="127.0.0.1:2049")
    p.add_argument("--path", default="/export")
    p.add_argument("--portmap", default="off", choices=["auto", "builtin", "system", "off"])
    p.add_argument("--squash", default="none", choices=["none", "root", "all"])
    p.add_argument("--export-id", type=int, default=0x5EED)
    p.add_argument("--handle-key", default="00" * 16)
    p.add_argument("--attr-timeout", type=float, default=1.0,
                   help="export attr_timeout: seconds listings and READ/WRITE replies "
                        "may reuse attributes")
    p.add_argument("--grace", type=float, default=0.0, help="NLM grace period (s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("STORAGED_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from storaged.daemon import _tune_malloc
    _tune_malloc()  # as the daemon does: 1 MiB READ buffers from the heap, not fresh mmaps
    try:
        import uvloop
        uvloop.run(_serve(args))
    except ImportError:
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
