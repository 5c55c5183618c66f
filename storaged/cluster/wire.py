"""Node-to-node wire format: one ZeroMQ frame carries every message for one peer.

The shell queues the messages its cores produce for a peer during one event
loop iteration and sends them as one *batch* frame (or several, of at most
``node.MAX_BATCH`` messages each), a JSON array
``[sender node id, sender incarnation, msg, msg, ...]`` (each ``msg`` a JSON
object with its kind in ``t``).  Batching keeps the per-peer channel FIFO
(messages are encoded in the order they were queued and ZeroMQ delivers
frames of one DEALER->ROUTER connection in order), which the DLM relies on:
an unlock and the next request for the same name reach the master in the
order they were made, and the recovery barrier (``rc1``/``rc2``) still
proves that everything sent before it was processed.

A frame that is a JSON *object* is a single legacy message carrying ``n``
and ``i`` itself (``cluster join`` sends ``cfgreq`` this way).

The codec is orjson: the same compact JSON as the standard library's, made
and parsed in about a tenth of the time (0.5 against 6 us to encode, 1.6
against 6 us to decode a lock and an unlock on this project's VMs), which is
a part of every remote lock hand-off on both nodes.
"""

from __future__ import annotations

from typing import Any

import orjson

_OPTS = orjson.OPT_NON_STR_KEYS   # as json.dumps: int keys become strings

Batch = tuple[int | None, int | None, list[dict[str, Any]]]


def encode_batch(node: int, inc: int, msgs: list[dict[str, Any]]) -> bytes:
    """One frame with ``msgs`` (in order) from ``node`` incarnation ``inc``."""
    return orjson.dumps([node, inc, *msgs], option=_OPTS)


def decode(payload: bytes) -> Batch:
    """``(node, inc, messages)`` of a frame; raises ValueError on garbage.

    A legacy single-message frame gives its own ``n``/``i`` (None when absent).
    Entries that are not JSON objects are dropped (bad input never crashes a node).
    """
    data = orjson.loads(payload)
    if type(data) is list:
        if len(data) < 2:
            raise ValueError("short batch")
        node, inc = data[0], data[1]
        if type(node) is not int or type(inc) is not int:
            raise ValueError("bad batch header")
        msgs = data[2:]
        for m in msgs:
            if type(m) is not dict:
                return node, inc, [m for m in msgs if type(m) is dict]
        return node, inc, msgs
    if type(data) is dict:
        node, inc = data.get("n"), data.get("i")
        return (node if type(node) is int else None, inc if type(inc) is int else None,
                [data])
    raise ValueError("not a message")
