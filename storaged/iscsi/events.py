"""Events the sans-IO iSCSI connection hands its shell (``next_events``).

They live apart from ``storaged.iscsi.connection`` so that the login phase
(``storaged.iscsi.login``) can end a connection without importing the
session; ``storaged.iscsi.connection`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storaged.iscsi.connection import Task


@dataclass(slots=True)
class Execute:
    """A command is ready: run ``task.command`` and call ``complete``."""

    task: Task


@dataclass(slots=True)
class Close:
    """The connection must close once pending output is flushed."""

    reason: str
