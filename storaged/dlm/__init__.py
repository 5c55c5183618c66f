"""Distributed lock manager with Linux DLM semantics (see docs/cluster.md).

``storaged.dlm.resource``: master-side grant rules (pure); ``storaged.dlm.core``:
the distributed lockspace state machine (sans-IO); ``storaged.dlm.api``: the
asyncio and thread-safe synchronous APIs.  The ZeroMQ shell is
``storaged.cluster.node``.
"""

from storaged.dlm.api import LockError, Lockspace, SyncLockspace
from storaged.dlm.modes import Flag, Mode, Status

__all__ = ["Flag", "LockError", "Lockspace", "Mode", "Status", "SyncLockspace"]
