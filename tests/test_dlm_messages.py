"""The DLM message table: decoding, and malformed peer messages refused by name."""

from __future__ import annotations

import pytest

from storaged.dlm import messages
from storaged.dlm.messages import MessageError, build, decode


def test_decode_gives_typed_arguments_in_table_order():
    msg = build("req", "default", r="disk\xff", id=7, m=5, f=2, lvb="\x00\x01")
    assert decode(msg) == (b"disk\xff", 7, 5, 2, b"\x00\x01")
    cast = build("cast", "default", id=7, s=0, m=5)
    assert decode(cast) == (7, 0, 5, None, True, False, 0)  # defaults of optional keys
    rcb = build("rcb", "default", v=[3, 1], locks=[["n", 1, 5, 0, None, 2, False]],
                lvbs=[["n", "x", 2, True, [2, 1], False]])
    assert decode(rcb) == ((3, 1), [(b"n", 1, 5, 0, None, 2, False)],
                           [(b"n", b"x", 2, True, (2, 1), False)])


@pytest.mark.parametrize("msg, text", [
    ({"t": "req", "r": "a", "id": 1, "m": 5}, "req: missing 'f'"),
    ({"t": "bast", "id": "1", "m": 5}, "bast: 'id' (lock id"),
    ({"t": "look", "r": 3}, "look: 'r' (resource name): expected a string"),
    ({"t": "rc1", "v": [1]}, "rc1: 'v'"),
    ({"t": "rcb", "v": [1, 1], "locks": [["n"]], "lvbs": []}, "records of 7 fields"),
    ({"t": "nope"}, "unknown message kind 'nope'"),
])
def test_malformed_messages_are_refused_naming_the_field(msg, text):
    with pytest.raises(MessageError, match=text.replace("(", r"\(").replace(")", r"\)")):
        decode(msg)


def test_every_kind_the_core_handles_is_in_the_table():
    from storaged.dlm import core

    handled = set(core._FROM_MASTER) | set(core._FROM_PEER)
    assert handled == messages.NORMAL_KINDS
    assert core._RC == messages.RECOVERY_KINDS
