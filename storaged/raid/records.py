"""The RAID array record: what the state store remembers of each array.

Kept apart from :mod:`storaged.raid.service` so that the config backup and
``storaged ls`` can read and validate RAID records without loading the RAID
engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from storaged.raid.layout import LEVELS
from storaged.state import ValidationError
from storaged.state.records import Record
from storaged.state.validate import normalize_name


@dataclass
class RaidVolume(Record):
    """A RAID array storaged assembles: its md uuid, level and member paths."""

    RECORD_KIND: ClassVar[str] = "raid"
    CONFIG_SECTION: ClassVar[str | None] = "raid_arrays"
    CONFIG_LABEL: ClassVar[str] = "raid array"

    name: str
    uuid: str
    level: int
    members: list[str] = field(default_factory=list)
    size: int = 0
    speed_limit_min: int = 1000
    speed_limit_max: int = 200000
    force: bool = False
    stripe_cache_size: int = 1024     # stripe heads (storaged.raid.stripecache); 0 = off

    @property
    def key(self) -> str:
        return self.name

    def problems(self) -> list[str]:
        errors: list[str] = []
        try:
            normalize_name(self.name, "raid name")
        except ValidationError as e:
            errors += e.errors
        if self.level not in LEVELS:
            errors.append(f"level must be one of {LEVELS}, got {self.level!r}")
        if not isinstance(self.members, list) or not all(
                isinstance(p, str) and (os.path.isabs(p) or p.startswith("iscsi://"))
                for p in self.members):
            errors.append("members must be a list of absolute paths or iscsi:// URLs")
        for name in ("speed_limit_min", "speed_limit_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                errors.append(f"{name} must be a positive number of KiB/s")
        from storaged.raid.stripecache import check_cache_size
        try:
            check_cache_size(self.stripe_cache_size)
        except ValueError as e:
            errors.append(str(e))
        return errors
