"""The lab's own state (record kinds ``lab`` and ``lab_resource``) in DIR's state store.

A :class:`LabRecord` says what was asked for (id, sizes, subnet); every
namespace, process, mount, file and directory the lab makes is a
:class:`LabResource`, written *before* the thing is created (an intent log),
so ``storaged lab down`` can remove what a crashed ``lab up`` or scenario
left behind.  Runtime state only: no ``CONFIG_SECTION``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record
from storaged.state.validate import check_int

LAB_ID_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
RESOURCE_KINDS = ("netns", "proc", "mount", "file", "dir")


@dataclass
class LabRecord(Record):
    """The lab in this directory: its id (the prefix of every name) and its shape."""

    RECORD_KIND: ClassVar[str] = "lab"
    KEY: ClassVar[str] = "lab"

    lab_id: str
    storage: int
    nodes: int
    subnet: str
    token_ms: int = 1000
    image_mib: int = 64
    created: float = 0.0
    dir_created: bool = True
    """``lab up`` made DIR itself (so ``lab down`` removes DIR, not only its content)."""
    ready: bool = False

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not isinstance(self.lab_id, str) or not LAB_ID_RE.match(self.lab_id):
            errors.append(f"lab id must be a lowercase letter then up to 9 letters or digits, "
                          f"got {self.lab_id!r}")
        for name, lo, hi in (("storage", 1, 4), ("nodes", 2, 8), ("token_ms", 200, 60000),
                             ("image_mib", 16, 65536)):
            try:
                check_int(getattr(self, name), name, lo, hi)
            except ValidationError as e:
                errors.append(str(e))
        return errors


@dataclass
class LabResource(Record):
    """One thing the lab made; key = zero-padded creation sequence number."""

    RECORD_KIND: ClassVar[str] = "lab_resource"

    seq: int
    kind: str
    name: str
    """netns: its name; proc: a label (``s1/serve``); mount/file/dir: the path."""
    pid: int = 0
    start_ticks: int = 0
    """proc: /proc/PID/stat starttime, so a recycled pid is never signalled."""
    node: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.seq:08d}"

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.kind not in RESOURCE_KINDS:
            errors.append(f"resource kind must be one of {', '.join(RESOURCE_KINDS)}, "
                          f"got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            errors.append("resource name must be a non-empty string")
        return errors
