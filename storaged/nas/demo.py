"""The NFS part of ``storaged demo``: export ``DIR/export`` as ``/export``."""

from __future__ import annotations

import os

from storaged.nas.exports import Export, NfsSettings
from storaged.state import Txn, split_portal

DEMO_EXPORT = "/export"


def ensure_nfs_demo(txn: Txn, directory: str, listen: str) -> None:
    """Create ``DIR/export``, its export (loopback clients, no_root_squash) and listener."""
    path = os.path.join(os.path.abspath(directory), "export")
    os.makedirs(path, exist_ok=True)
    if txn.get(Export, DEMO_EXPORT) is None:
        txn.put(Export(path=DEMO_EXPORT, directory=path, clients=["127.0.0.1"],
                       squash="none"))
    settings = txn.get(NfsSettings, NfsSettings.KEY) or NfsSettings()
    settings.listen = listen
    txn.put(settings)


def url(listen: str, path: str = "") -> str:
    """A libnfs URL for the demo export that needs no portmapper."""
    host, port = split_portal(listen)
    return (f"nfs://{host}{DEMO_EXPORT}{path}?version=3&nfsport={port}&mountport={port}")


def banner(directory: str, listen: str) -> list[str]:
    """Lines for the demo banner."""
    host, port = split_portal(listen)
    return [
        f"  NFS: {os.path.join(os.path.abspath(directory), 'export')} exported as "
        f"{DEMO_EXPORT} on {host}:{port}",
        f"    nfs-ls '{url(listen)}'",
        f"    nfs-cp file.img '{url(listen, '/file.img')}'",
        f"    qemu-img info nfs://{host}{DEMO_EXPORT}/file.img   (needs port 111: portmapper)",
    ]
