"""Errors raised by the state layer.

``ValidationError`` carries every problem found, not just the first, so an
admin fixing a config file sees the whole list in one go.
"""

from __future__ import annotations


class StateError(Exception):
    """The state store cannot be opened or used (permissions, newer schema, ...)."""


class ValidationError(StateError, ValueError):
    """A record or value breaks the rules; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))

    def prefixed(self, prefix: str) -> ValidationError:
        """Return a copy whose messages all start with ``prefix: `` (adds context)."""
        return ValidationError([f"{prefix}: {e}" for e in self.errors])
