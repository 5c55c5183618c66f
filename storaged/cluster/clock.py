"""This host's kernel clock discipline state (adjtimex(2) with no change).

Cluster nodes must keep their clocks in sync (DESIGN: lock hold times,
lease-like timeouts and the logs an admin correlates across nodes).  The
membership layer measures the offset between nodes; this says whether the
kernel itself believes its clock is disciplined: STA_UNSYNC clear when an
NTP/PTP daemon (chrony, ntpd, systemd-timesyncd) steers it, and ``maxerror``,
the kernel's bound on the clock's error, which grows by 500 ppm a second
while nobody updates it (ntp_adjtime(3), RFC 1589).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

STA_UNSYNC = 0x0040       # <linux/timex.h>: clock unsynchronized
TIME_ERROR = 5            # adjtimex return: clock not synchronized


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    # struct timex of <sys/timex.h> (glibc, 64-bit and 32-bit alike: longs and ints)
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time", _Timeval), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class KernelClock:
    """What adjtimex reported: ``synced`` (STA_UNSYNC clear and state not TIME_ERROR),
    the error bounds in microseconds, and the raw status word."""

    synced: bool
    maxerror_us: int
    esterror_us: int
    status: int

    def as_wire(self) -> list[int]:
        """The heartbeat form: ``[synced, maxerror_us]``."""
        return [int(self.synced), self.maxerror_us]


_libc: ctypes.CDLL | None = None


def read_kernel_clock() -> KernelClock | None:
    """The kernel's clock state, or None where adjtimex is not available."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()   # modes 0: read only, no privilege needed
        state = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    synced = not (tx.status & STA_UNSYNC) and state != TIME_ERROR
    return KernelClock(synced, int(tx.maxerror), int(tx.esterror), int(tx.status))
