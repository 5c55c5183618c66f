"""One opener for every place storaged takes a device: a path or an iscsi:// URL.

Backstores, RAID members and the cluster filesystem all accept either a
local file / block device path or a LUN of a remote iSCSI target
(``iscsi://[user[%password]@]host[:port]/IQN/LUN[?options]``, see
docs/initiator.md).  ``open_device`` hides which one it is: the caller gets
a BlockDevice and the same errors (``BlockDeviceError``, an OSError, whose
message names the problem: unreachable portal, login refused, no such LUN).

The remote driver lives in ``storaged.initiator`` (an asyncio shell above the
protocol core); it is imported only when a URL is opened, so the storage
layer does not depend on it for plain files.
"""

from __future__ import annotations

import errno
import os
import urllib.parse

from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.block.file import FileBlockDevice

SCHEME = "iscsi://"


def is_url(spec: str) -> bool:
    """True when ``spec`` names a remote LUN rather than a local path."""
    return isinstance(spec, str) and spec.lower().startswith(SCHEME)


def normalize(spec: str) -> str:
    """A stable name for ``spec``: the absolute path, or the URL unchanged
    (so two records naming one LUN compare equal as strings)."""
    return spec if is_url(spec) else os.path.abspath(spec)


def exists(spec: str) -> bool:
    """Whether a local path exists; URLs are only known once opened (True)."""
    return True if is_url(spec) else os.path.exists(spec)


def redact(spec: str) -> str:
    """``spec`` safe to print and log: a URL's CHAP secrets replaced by ``***``."""
    if not is_url(spec):
        return spec
    u = urllib.parse.urlsplit(spec)
    netloc = u.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        user, sep, _pw = cred.partition("%")
        netloc = f"{user}{'%***' if sep else ''}@{host}"
    query = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    q = "&".join(f"{k}={'***' if 'password' in k else v}" for k, v in query)
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, q, u.fragment))


def open_device(spec: str, *, block_size: int = 512, read_only: bool = False,
                create_size: int | None = None, direct: bool = False,
                **remote: object) -> BlockDevice:
    """Open ``spec`` (a path or an iscsi:// URL) as a BlockDevice.

    Paths open as ``FileBlockDevice`` (``create_size`` makes a missing file
    sparse of that size; ``block_size`` is the logical block the caller
    addresses).  URLs log in to the target and check the LUN exists
    (``RemoteBlockDevice``; ``remote`` keywords override URL options such
    as timeouts).  A remote LUN has its own block size (READ CAPACITY):
    the caller's ``block_size`` must be a multiple of it.  Every failure is
    a ``BlockDeviceError`` naming the device.
    """
    if not is_url(spec):
        if create_size is None and not os.path.exists(spec):
            raise BlockDeviceError(errno.ENOENT, f"{spec}: no such file or device")
        return FileBlockDevice(spec, block_size=block_size, read_only=read_only,
                               create_size=create_size, direct=direct)
    from storaged.initiator.device import RemoteBlockDevice
    if create_size is not None:
        raise BlockDeviceError(errno.EINVAL, f"{redact(spec)}: a remote LUN cannot be "
                               "created here (make it on its storage node)")
    try:
        dev = RemoteBlockDevice(spec, read_only=read_only, **remote)
    except ValueError as e:
        raise BlockDeviceError(errno.EINVAL, f"{redact(spec)}: {e}") from None
    except BlockDeviceError as e:
        raise BlockDeviceError(errno.EIO, f"{redact(spec)}: {e.strerror or e}") from None
    if block_size % dev.block_size:
        bs = dev.block_size
        dev.close()
        raise BlockDeviceError(errno.EINVAL, f"{redact(spec)}: the LUN's block size {bs} "
                               f"does not divide the {block_size}-byte blocks asked for")
    return dev
