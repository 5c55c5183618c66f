"""What exists: every persisted record kind and every module of control operations.

Listed here, once, by hand, so that what a command can see does not depend on
which modules it happened to import first.  Adding a record kind or an
operations module means adding it here; tests check that every ``Record``
subclass in the package and every ``@_op`` module is listed.
"""

from __future__ import annotations

import importlib

from storaged.cluster.config import ClusterConfig, LocalNode
from storaged.lab.records import LabRecord, LabResource
from storaged.lb.records import VirtualService
from storaged.nas.exports import Export, NfsSettings
from storaged.raid.records import RaidVolume
from storaged.state.alua import AluaGroup
from storaged.state.fence import FenceEvent, FenceNode
from storaged.state.mgmt import MgmtEndpoint, MgmtUser
from storaged.state.nsm import NsmMonitor, NsmState
from storaged.state.pr import PrRecord
from storaged.state.records import Backstore, Record, Settings, Target
from storaged.vip.records import FloatingAddress

#: Every top-level record kind.  Config kinds come first, in the order of their
#: sections in a ``config save`` file and in ``storaged ls``.
RECORD_KINDS: tuple[type[Record], ...] = (
    Settings, Backstore, Target, AluaGroup, RaidVolume, Export, NfsSettings,
    ClusterConfig, LocalNode, VirtualService, FloatingAddress,
    PrRecord, NsmState, NsmMonitor, FenceNode, FenceEvent,
    MgmtEndpoint, MgmtUser, LabRecord, LabResource,
)

#: The kinds that are configuration (they name a ``CONFIG_SECTION``).
CONFIG_KINDS: tuple[type[Record], ...] = tuple(k for k in RECORD_KINDS if k.CONFIG_SECTION)

#: Modules that define control operations (``storaged.control.ops._op``).
OPERATION_MODULES: tuple[str, ...] = (
    "storaged.control.ops",
    "storaged.control.alua_ops",
    "storaged.nas.ops",
    "storaged.raid.service",
    "storaged.control.fence_ops",
    "storaged.lb.ops",
    "storaged.vip.ops",
)


def _check_unique() -> None:
    kinds = [k.RECORD_KIND for k in RECORD_KINDS]
    sections = [k.CONFIG_SECTION for k in CONFIG_KINDS]
    for what, names in (("record kind", kinds), ("config section", sections)):
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RuntimeError(f"{what} listed twice: {', '.join(sorted(map(str, dup)))}")
    for k in RECORD_KINDS:
        if not k.RECORD_KIND or "/" in k.RECORD_KIND:
            raise RuntimeError(f"bad record kind {k.RECORD_KIND!r} of {k.__name__}")


_check_unique()


def load_operations() -> None:
    """Import every operations module, so ``storaged.control.ops.OPS`` is complete."""
    for name in OPERATION_MODULES:
        importlib.import_module(name)
