"""Option table and parsing of a fence agent, as fence-agents' fencing.py
defines the conventions pacemaker relies on.

Options come either as command-line options (short and long getopt forms,
``-o off``/``--action=off``) or, when the agent is run without arguments, as
``name=value`` lines on stdin, the way stonithd passes them (names are the
long option with ``-`` or ``_``; ``#`` lines are comments; unknown names are
warned about and ignored; ``nodename`` is silently ignored).  Deprecated
names (``port``, ``login``, ``passwd``, ``ipaddr``...) are accepted as
aliases of their successors and appear in the metadata with
``deprecated="1"``, their successors with ``obsoletes=``.
"""

from __future__ import annotations

import getopt
import logging
import re
import sys
from dataclasses import dataclass, field

log = logging.getLogger("fence")


@dataclass(frozen=True)
class Opt:
    """One agent option (a ``<parameter>`` of the metadata)."""

    name: str
    long: str
    short: str = ""
    arg: str = ""          # "" = a boolean flag; else the metavar in the getopt text
    type: str = "string"   # metadata content type: string, integer, second, boolean, select
    default: str | None = None
    required: bool = False
    desc: str = ""
    obsoletes: str = ""    # deprecated name this one replaces
    choices: tuple[str, ...] = ()
    order: int = field(default=0, compare=False)

    @property
    def flag(self) -> bool:
        return not self.arg

    def getopt_text(self) -> str:
        """The ``mixed`` text: ``-o, --action=[action]`` as fencing.py prints it."""
        long = f"--{self.long}" + (f"=[{self.arg}]" if self.arg else "")
        return f"-{self.short}, {long}" if self.short else long


class UsageError(Exception):
    """Bad options: fence-agents logs the message and exits 1."""


def parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("1", "yes", "on", "true"):
        return True
    if v in ("0", "no", "off", "false"):
        return False
    return None


def _index(opts: list[Opt]) -> dict[str, Opt]:
    """Every accepted stdin name (and deprecated alias) -> its option."""
    out: dict[str, Opt] = {}
    for o in opts:
        for n in (o.name, o.long, o.long.replace("-", "_"), o.name.replace("_", "-")):
            out[n] = o
        if o.obsoletes:
            out[o.obsoletes] = o
            out[o.obsoletes.replace("_", "-")] = o
    return out


def parse_stdin(opts: list[Opt], lines: list[str]) -> dict[str, str]:
    """``name=value`` lines (stonithd's way) -> {option name: value}."""
    names = _index(opts)
    out: dict[str, str] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        value = re.sub(r'^"(.*)"$', r"\1", value)
        o = names.get(name)
        if o is None:
            if name != "nodename":
                log.warning("Parse error: Ignoring unknown option '%s'", line)
            continue
        if o.flag:
            b = parse_bool(value)
            if b is None:
                log.warning("Parse error: Ignoring option '%s' because it does not have "
                            "value", name)
                continue
            out[o.name] = "1" if b else "0"
        else:
            out[o.name] = value
    return out


def parse_argv(opts: list[Opt], argv: list[str]) -> dict[str, str]:
    """getopt-style command line -> {option name: value}; UsageError if bad."""
    shorts = "".join(o.short + ("" if o.flag else ":") for o in opts if o.short)
    longs = [o.long + ("" if o.flag else "=") for o in opts]
    try:
        got, rest = getopt.gnu_getopt(argv, shorts, longs)
    except getopt.GetoptError as e:
        raise UsageError(f"Parse error: {e.msg}") from None
    if rest:
        log.warning("Unused arguments on command line: %s", rest)
    by_flag = {f"--{o.long}": o for o in opts} | {f"-{o.short}": o for o in opts if o.short}
    out: dict[str, str] = {}
    for k, v in got:
        o = by_flag[k]
        out[o.name] = "1" if o.flag else v
    return out


def parse(opts: list[Opt], argv: list[str] | None = None) -> dict[str, str]:
    """Command line if there is one, else stdin, then defaults filled in."""
    argv = sys.argv[1:] if argv is None else argv
    values = parse_argv(opts, argv) if argv else parse_stdin(opts, sys.stdin.readlines())
    for o in opts:
        if o.default is not None and o.name not in values:
            values[o.name] = o.default
    return values


def check_types(opts: list[Opt], values: dict[str, str]) -> list[str]:
    """Problems with option values (integers, seconds, choices)."""
    errors = []
    for o in opts:
        v = values.get(o.name)
        if v is None:
            continue
        if o.type == "integer" and not re.fullmatch(r"-?\d+", v.strip()):
            errors.append(f"Parse error: Option '{o.name}' must be an integer, got {v!r}")
        elif o.type == "second" and not re.fullmatch(r"\d+(\.\d+)?", v.strip()):
            errors.append(f"Parse error: Option '{o.name}' must be a number of seconds, "
                          f"got {v!r}")
        elif o.choices and v not in o.choices:
            errors.append(f"Parse error: Option '{o.name}' must be one of "
                          f"{', '.join(o.choices)}, got {v!r}")
    return errors
