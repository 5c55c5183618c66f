"""Lock modes, flags, status codes and the tables of the Linux DLM.

Modes follow ``linux/dlmconstants.h``: NL < CR < CW < PR < PW < EX, with the
VMS compatibility matrix.  ``IV`` (-1) marks "no mode" (a lock not yet
granted).  The LVB operation table is the kernel's ``dlm_lvb_operations``
(fs/dlm/lock.c) restricted to the six real modes.
"""

from __future__ import annotations

import enum


class Mode(enum.IntEnum):
    """DLM lock modes (value order is strength order)."""

    IV = -1  #: invalid / not granted
    NL = 0   #: null: no access, keeps the lock (and its LVB) around
    CR = 1   #: concurrent read
    CW = 2   #: concurrent write
    PR = 3   #: protected read (shared)
    PW = 4   #: protected write (update; readers with CR allowed)
    EX = 5   #: exclusive

    @classmethod
    def parse(cls, value: str | int | Mode) -> Mode:
        """``Mode`` from a name (``"ex"``, ``"PR"``) or number; ValueError otherwise."""
        try:
            mode = _PARSE.get(value)  # fast path: every valid spelling is in the table
        except TypeError:  # unhashable
            mode = None
        if mode is not None:
            return mode
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            try:
                mode = cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown lock mode {value!r} (NL CR CW PR PW EX)") from None
        else:
            mode = cls(value)
        if mode is Mode.IV:
            raise ValueError("IV is not a requestable lock mode")
        return mode


_PARSE: dict[object, Mode] = {}
for _m in Mode:
    if _m is not Mode.IV:
        _PARSE.update({_m.value: _m, _m.name: _m, _m.name.lower(): _m})

#: COMPAT[granted][requested] for NL..EX (the standard VMS/Linux matrix).
COMPAT: tuple[tuple[bool, ...], ...] = (
    #      NL    CR     CW     PR     PW     EX
    (True, True, True, True, True, True),        # NL
    (True, True, True, True, True, False),       # CR
    (True, True, True, False, False, False),     # CW
    (True, True, False, True, False, False),     # PR
    (True, True, False, False, False, False),    # PW
    (True, False, False, False, False, False),   # EX
)


def compatible(granted: int, requested: int) -> bool:
    """True if a lock held in ``granted`` lets another be granted ``requested``."""
    if granted < 0 or requested < 0:
        return True
    return COMPAT[granted][requested]


# LVB_OPS[grmode + 1][rqmode + 1]: 1 = copy the resource LVB to the lock,
# 0 = write the lock's LVB into the resource, -1 = nothing (fs/dlm/lock.c).
LVB_OPS: tuple[tuple[int, ...], ...] = (
    # UN  NL  CR  CW  PR  PW  EX
    (-1, 1, 1, 1, 1, 1, 1),     # UN (new request)
    (-1, 1, 1, 1, 1, 1, 1),     # NL
    (-1, -1, 1, 1, 1, 1, 1),    # CR
    (-1, -1, -1, 1, 1, 1, 1),   # CW
    (-1, -1, -1, -1, 1, 1, 1),  # PR
    (-1, 0, 0, 0, 0, 0, 1),     # PW
    (-1, 0, 0, 0, 0, 0, 0),     # EX
)


def lvb_op(grmode: int, rqmode: int) -> int:
    """What a grant from ``grmode`` to ``rqmode`` does with the LVB (1 read, 0 write, -1 none)."""
    return LVB_OPS[grmode + 1][rqmode + 1]


class Flag(enum.IntFlag):
    """Request flags (the subset of ``DLM_LKF_*`` storaged implements)."""

    NONE = 0
    NOQUEUE = 0x0001     #: fail with EAGAIN instead of waiting
    CANCEL = 0x0002      #: (internal) cancel marker
    CONVERT = 0x0004     #: request is a conversion of an existing lock
    VALBLK = 0x0008      #: read/write the lock value block
    QUECVT = 0x0010      #: conversion is queued behind other conversions (FIFO)
    IVVALBLK = 0x0020    #: invalidate the resource LVB on down-conversion/unlock
    CONVDEADLK = 0x0040  #: resolve conversion deadlock by demoting this lock to NL


class Status(enum.IntEnum):
    """Completion status codes (negated errno values, as the kernel DLM returns)."""

    OK = 0
    EAGAIN = -11      #: NOQUEUE request could not be granted at once
    EBUSY = -16       #: operation not allowed in the lock's current state
    EINVAL = -22      #: bad argument
    EDEADLK = -35     #: conversion deadlock
    ENOLCK = -37      #: lock lost (lockspace stopped, no quorum, node reset)
    ENOENT = -2       #: no such lock
    ECANCEL = -0x10001  #: request cancelled (DLM_ECANCEL)
    EUNLOCK = -0x10002  #: unlock completed (DLM_EUNLOCK)


#: Maximum resource name length in bytes (DLM_RESNAME_MAXLEN).
RESNAME_MAXLEN = 64
#: Default (and minimum) lock value block length in bytes.
LVB_LEN = 32


def check_name(name: bytes | str) -> bytes:
    """The resource name as bytes; ValueError if it is empty or longer than 64 bytes."""
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if not raw:
        raise ValueError("resource name must not be empty")
    if len(raw) > RESNAME_MAXLEN:
        raise ValueError(f"resource name is {len(raw)} bytes, the limit is {RESNAME_MAXLEN}")
    return raw
