"""The DLM's node-to-node messages: one table, kind -> typed fields.

On the wire a message is a JSON object (storaged.cluster.wire batches them)
with its kind in ``t``, its lockspace in ``ls`` and short keys for the rest,
because every lock hand-off between nodes carries a few of them.  The table
says what each key means and its type; :func:`decode` turns a received
message into the handler's arguments, in table order, or raises
:class:`MessageError` for a message that lacks a field or has one of the
wrong type (a bad peer message is dropped, never a crash).

Resource names and LVBs are bytes; JSON carries them as latin-1 strings
(one character per byte).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class MessageError(ValueError):
    """A message that does not match its kind's table."""


def name_bytes(value: Any) -> bytes:
    """A resource name or LVB from its latin-1 wire form."""
    if type(value) is not str:
        raise MessageError(f"expected a string, got {type(value).__name__}")
    return value.encode("latin-1")


def opt_bytes(value: Any) -> bytes | None:
    """An optional LVB (``null`` on the wire when absent)."""
    return None if value is None else name_bytes(value)


def integer(value: Any) -> int:
    if type(value) is not int:
        raise MessageError(f"expected an integer, got {type(value).__name__}")
    return value


def flag(value: Any) -> bool:
    return bool(value)


def view_id(value: Any) -> tuple[int, int]:
    if type(value) is not list or len(value) != 2:
        raise MessageError("expected a view id [seq, node]")
    return integer(value[0]), integer(value[1])


def records(*fields: tuple[str, Callable[[Any], Any]]) -> Callable[[Any], list[tuple]]:
    """A decoder of a list of positional records with these (meaning, decoder) fields."""
    def decode_records(value: Any) -> list[tuple]:
        if type(value) is not list:
            raise MessageError("expected a list of records")
        out = []
        for rec in value:
            if type(rec) is not list or len(rec) != len(fields):
                raise MessageError(f"expected records of {len(fields)} fields")
            out.append(tuple(dec(v) for (_, dec), v in zip(fields, rec, strict=True)))
        return out
    decode_records.fields = fields  # type: ignore[attr-defined]
    return decode_records


#: A granted (or being unlocked) lock in a recovery batch, sent to the name's new master.
LOCK_RECORD = (("name", name_bytes), ("lock id", integer), ("granted mode", integer),
               ("flags", integer), ("lvb", opt_bytes), ("lvb sequence", integer),
               ("unlock in flight", flag))
#: A resource's LVB state in a recovery batch, sent to the name's new master.
LVB_RECORD = (("name", name_bytes), ("lvb", opt_bytes), ("lvb sequence", integer),
              ("lvb valid", flag), ("granted since view", view_id),
              ("a dead node held it in PW or EX", flag))


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One key of a message: its wire key, what it means, its decoder, its default."""

    key: str
    meaning: str
    decode: Callable[[Any], Any]
    default: Any = _REQUIRED


_NAME = Field("r", "resource name", name_bytes)
_LKID = Field("id", "lock id, unique on the lock's owner node", integer)
_MODE = Field("m", "lock mode (storaged.dlm.modes)", integer)
_FLAGS = Field("f", "request flags (storaged.dlm.modes.Flag)", integer)
_LVB = Field("lvb", "lock value block, if the request carries one", opt_bytes, None)
_VIEW = Field("v", "membership view id of the recovery round", view_id)

#: Every message kind and its fields, in the order the handler takes them.
MESSAGES: dict[str, tuple[Field, ...]] = {
    # owner -> master
    "req": (_NAME, _LKID, _MODE, _FLAGS, _LVB),
    "cvt": (_NAME, _LKID, _MODE, _FLAGS, _LVB),
    "unl": (_NAME, _LKID, _LVB, Field("f", "unlock flags", integer, 0)),
    "can": (_NAME, _LKID),
    # master -> owner
    "cast": (_LKID, Field("s", "completion status (storaged.dlm.modes.Status)", integer),
             _MODE, _LVB, Field("ok", "the LVB is valid", flag, True),
             Field("d", "granted in a lower mode than asked (CONVDEADLK)", flag, False),
             Field("q", "LVB sequence number", integer, 0)),
    "bast": (_LKID, Field("m", "mode another node is blocked asking for", integer)),
    # owner -> directory node, and its answer
    "look": (_NAME,),
    "lookr": (_NAME, Field("m", "master node of the name", integer)),
    # recovery rounds (storaged.dlm.core, "Recovery")
    "rc1": (_VIEW,),
    "rc2": (_VIEW,),
    "rcb": (_VIEW, Field("locks", "locks whose names the receiver now masters",
                         records(*LOCK_RECORD)),
            Field("lvbs", "LVB states of those names", records(*LVB_RECORD))),
    "rcd": (_VIEW,),
}

RECOVERY_KINDS = frozenset({"rc1", "rc2", "rcb", "rcd"})
NORMAL_KINDS = frozenset(MESSAGES) - RECOVERY_KINDS


def build(kind: str, lockspace: str, **fields: Any) -> dict[str, Any]:
    """A message of ``kind`` for ``lockspace`` with wire keys ``fields``."""
    fields["t"] = kind
    fields["ls"] = lockspace
    return fields


def _explain(msg: dict[str, Any]) -> MessageError:
    """What is wrong with ``msg``, field by field (the slow path, for bad input only)."""
    table = MESSAGES.get(msg.get("t"))  # type: ignore[arg-type]
    if table is None:
        return MessageError(f"unknown message kind {msg.get('t')!r}")
    for f in table:
        value = msg.get(f.key, f.default)
        if value is _REQUIRED:
            return MessageError(f"{msg['t']}: missing {f.key!r} ({f.meaning})")
        try:
            if value is not f.default:
                f.decode(value)
        except MessageError as e:
            return MessageError(f"{msg['t']}: {f.key!r} ({f.meaning}): {e}")
    return MessageError(f"{msg['t']}: malformed")


def _compile(kind: str, table: tuple[Field, ...]) -> Callable[[dict[str, Any]], tuple]:
    """A decoder of one kind, generated from its table.

    One expression per field, as a hand-written decoder would have it (the way
    dataclasses and namedtuple generate code): a loop over the table costs
    about twice as much, and every remote lock hand-off decodes several.
    """
    env: dict[str, Any] = {}
    parts = []
    for i, f in enumerate(table):
        env[f"d{i}"], env[f"f{i}"] = f.decode, f.default
        if f.default is _REQUIRED:
            parts.append(f"d{i}(msg[{f.key!r}])")
        else:
            parts.append(f"(f{i} if (v{i} := msg.get({f.key!r}, f{i})) is f{i} else d{i}(v{i}))")
    exec(f"def decode_{kind}(msg):\n    return ({', '.join(parts)},)\n", env)  # noqa: S102
    return env[f"decode_{kind}"]


_DECODERS = {kind: _compile(kind, table) for kind, table in MESSAGES.items()}


def decode(msg: dict[str, Any]) -> tuple[Any, ...]:
    """The handler arguments of ``msg``, in table order; MessageError if it is malformed."""
    try:
        return _DECODERS[msg["t"]](msg)
    except (KeyError, MessageError):
        raise _explain(msg) from None
