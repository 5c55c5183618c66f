"""A scenario's timeline and measured figures (sans-IO: times are passed in)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


@dataclass
class Timeline:
    """Events relative to the scenario's start, printed as they are marked."""

    wall0: float
    echo: Any = None
    events: list[tuple[float, str, str]] = field(default_factory=list)
    figures: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def mark(self, label: str, detail: str = "", wall: float | None = None) -> float:
        """Record ``label`` at wall-clock ``wall`` (default: now); seconds since the start."""
        wall = time.time() if wall is None else wall
        rel = wall - self.wall0
        self.events.append((rel, label, detail))
        if self.echo is not None:
            self.echo(f"{_clock(wall)} +{rel:7.3f}s  {label}" + (f": {detail}" if detail else ""))
        return rel

    def figure(self, name: str, seconds: float | None, note: str = "") -> None:
        """A measured gap (None: not measured, ``note`` says why)."""
        self.figures[name] = None if seconds is None else round(seconds, 3)
        if note:
            self.notes[name] = note

    def render_figures(self) -> list[str]:
        """The summary lines: ``figure <name> <seconds> s`` (or why it is missing)."""
        width = max((len(n) for n in self.figures), default=0)
        out = []
        for name, value in self.figures.items():
            text = f"{value:8.3f} s" if value is not None else "     n/a"
            note = self.notes.get(name, "")
            out.append(f"figure {name:<{width}} {text}" + (f"  ({note})" if note else ""))
        return out


@dataclass
class ScenarioResult:
    """What a scenario found."""

    name: str
    ok: bool
    verdict: str
    timeline: Timeline
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.name, "ok": self.ok, "verdict": self.verdict,
                "events": [{"t": round(t, 3), "event": e, "detail": d}
                           for t, e, d in self.timeline.events],
                "figures": self.timeline.figures, "notes": self.timeline.notes, **self.extra}
