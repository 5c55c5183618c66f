"""A click group whose subcommand groups are imported only when used.

``storaged lock run`` is called in loops by scripts (like flock(1)); importing
every subcommand module (RAID, NFS, control operations, ZeroMQ...) on each
call cost about a fifth of a second.  :class:`LazyGroup` keeps a table of
``name -> "module:attribute"`` and imports a subcommand's module the first
time click asks for that command (the pattern from the click documentation,
"Lazily Loading Subcommands").  ``storaged --help`` still imports them all to
list their help lines.
"""

from __future__ import annotations

import importlib
from typing import Any

import click


class LazyGroup(click.Group):
    """A :class:`click.Group` with lazily imported subcommands (see :meth:`add_lazy`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands: dict[str, str] = {}

    def add_lazy(self, name: str, target: str) -> None:
        """Register subcommand ``name`` implemented by ``target`` (``"pkg.module:attr"``)."""
        self.lazy_subcommands[name] = target

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_subcommands.get(cmd_name)
        if target is not None and cmd_name not in self.commands:
            module, _, attr = target.partition(":")
            cmd = getattr(importlib.import_module(module), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{target} is not a click command")
            self.add_command(cmd, cmd_name)
        return super().get_command(ctx, cmd_name)
