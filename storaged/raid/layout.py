"""md's address mapping: where each array byte lives on which member.

Everything here is pure arithmetic on chunk numbers, mirroring the kernel:

* RAID-0 (drivers/md/raid0.c ``map_sector``), equal-sized members, so one
  strip zone: chunk ``c`` is on member ``c % n`` at row ``c // n``.
* RAID-4/5/6 (drivers/md/raid5.c ``raid5_compute_sector``): chunk ``c`` is
  data index ``c % data_disks`` of stripe ``c // data_disks``; the parity
  (P) and for RAID-6 the syndrome (Q) member and the data members of a
  stripe depend on the layout algorithm.  RAID-4 always keeps parity on the
  last member (md ignores the layout for level 4).
* RAID-6 Q coefficients: md's ``set_syndrome_sources`` feeds the data blocks
  to ``gen_syndrome`` in member order starting just after Q (``raid6_d0``)
  and wrapping, skipping P and Q; the i-th block in that order is multiplied
  by g**i (g = 2 in GF(2^8), polynomial 0x11d).
* RAID-10 "near" layouts (drivers/md/raid10.c ``__raid10_find_phys``):
  chunk ``c`` becomes virtual chunk ``c * near_copies``; its member is
  ``v % n`` and its row ``v // n``; further copies go on the next members,
  wrapping to member 0 one row down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

# raid5/6 layout algorithms (include/linux/raid/pq.h / md_p.h ALGORITHM_*)
LEFT_ASYMMETRIC = 0
RIGHT_ASYMMETRIC = 1
LEFT_SYMMETRIC = 2
RIGHT_SYMMETRIC = 3
PARITY_0 = 4
PARITY_N = 5

PARITY_LAYOUTS: dict[str, int] = {
    "left-asymmetric": LEFT_ASYMMETRIC,
    "right-asymmetric": RIGHT_ASYMMETRIC,
    "left-symmetric": LEFT_SYMMETRIC,
    "right-symmetric": RIGHT_SYMMETRIC,
    "parity-first": PARITY_0,
    "parity-last": PARITY_N,
}
LEVELS = (0, 1, 4, 5, 6, 10)
MIN_DISKS = {0: 1, 1: 2, 4: 3, 5: 3, 6: 4, 10: 2}
REDUNDANCY = {0: 0, 1: None, 4: 1, 5: 1, 6: 2, 10: None}  # None: per mirror set
DEFAULT_CHUNK = 512 * 1024
RAID10_DEFAULT = 0x102  # near=2, far=1


def layout_code(level: int, name: str | None) -> int:
    """md's numeric layout for a level and an mdadm layout name (None: the default)."""
    if level in (5, 6):
        if name is None:
            return LEFT_SYMMETRIC
        if name not in PARITY_LAYOUTS:
            raise ValueError(f"unknown layout {name!r} (known: {', '.join(PARITY_LAYOUTS)})")
        return PARITY_LAYOUTS[name]
    if level == 10:
        if name is None:
            return RAID10_DEFAULT
        if len(name) == 2 and name[0] == "n" and name[1] in "23":
            return 0x100 | int(name[1])
        raise ValueError(f"unsupported raid10 layout {name!r} (supported: n2, n3)")
    if name is not None:
        raise ValueError(f"level {level} has no layout choice")
    return 0


def layout_name(level: int, layout: int) -> str:
    """mdadm's name for a layout (``left-symmetric``, ``near=2``, ...)."""
    if level in (5, 6):
        for name, code in PARITY_LAYOUTS.items():
            if code == layout:
                return name
        return f"layout-{layout}"
    if level == 10:
        return f"near={layout & 0xFF}"
    if level == 4:
        return "parity-last"
    return "-"


@dataclass(frozen=True)
class StripeMap:
    """One stripe of a parity array: members for each data index, P, Q and Q order.

    ``data[k]`` is the member holding data index ``k``; ``qexp[k]`` is the
    power of g that multiplies it in Q (md's syndrome order); ``pd``/``qd``
    are the parity members (``qd`` is -1 below RAID-6).
    """

    data: tuple[int, ...]
    pd: int
    qd: int
    qexp: tuple[int, ...]

    @property
    def by_qorder(self) -> tuple[int, ...]:
        """Data indices sorted by their Q coefficient exponent."""
        return tuple(sorted(range(len(self.data)), key=lambda k: self.qexp[k]))


@lru_cache(maxsize=4096)
def stripe_map(level: int, layout: int, n: int, stripe_mod: int) -> StripeMap:
    """The member mapping of a stripe (``stripe_mod`` = stripe number mod ``n``)."""
    if level == 6:
        dd = n - 2
    elif level in (4, 5):
        dd = n - 1
    else:
        raise ValueError(f"level {level} has no parity stripes")
    s = stripe_mod
    data: list[int] = []
    qd = -1
    if level == 4:
        pd = dd
        data = list(range(dd))
    elif level == 5:
        if layout == LEFT_ASYMMETRIC:
            pd = dd - s % n
            data = [k + 1 if k >= pd else k for k in range(dd)]
        elif layout == RIGHT_ASYMMETRIC:
            pd = s % n
            data = [k + 1 if k >= pd else k for k in range(dd)]
        elif layout == LEFT_SYMMETRIC:
            pd = dd - s % n
            data = [(pd + 1 + k) % n for k in range(dd)]
        elif layout == RIGHT_SYMMETRIC:
            pd = s % n
            data = [(pd + 1 + k) % n for k in range(dd)]
        elif layout == PARITY_0:
            pd = 0
            data = [k + 1 for k in range(dd)]
        elif layout == PARITY_N:
            pd = dd
            data = list(range(dd))
        else:
            raise ValueError(f"unsupported raid5 layout {layout}")
    else:
        if layout in (LEFT_ASYMMETRIC, RIGHT_ASYMMETRIC):
            pd = n - 1 - s % n if layout == LEFT_ASYMMETRIC else s % n
            if pd == n - 1:
                qd = 0                                     # Q D D D P
                data = [k + 1 for k in range(dd)]
            else:
                qd = pd + 1                                # D D P Q D
                data = [k + 2 if k >= pd else k for k in range(dd)]
        elif layout in (LEFT_SYMMETRIC, RIGHT_SYMMETRIC):
            pd = n - 1 - s % n if layout == LEFT_SYMMETRIC else s % n
            qd = (pd + 1) % n
            data = [(pd + 2 + k) % n for k in range(dd)]
        elif layout == PARITY_0:
            pd, qd = 0, 1
            data = [k + 2 for k in range(dd)]
        elif layout == PARITY_N:
            pd, qd = dd, dd + 1
            data = list(range(dd))
        else:
            raise ValueError(f"unsupported raid6 layout {layout}")
    if level == 6:
        d0 = (qd + 1) % n                                  # md's raid6_d0
        rank = {}
        i, r = d0, 0
        for _ in range(n):
            if i not in (pd, qd):
                rank[i] = r
                r += 1
            i = (i + 1) % n
        qexp = tuple(rank[d] for d in data)
    else:
        qexp = tuple(range(dd))
    return StripeMap(tuple(data), pd, qd, qexp)


@dataclass(frozen=True)
class Geometry:
    """Array shape: level, layout, chunk (bytes), member count and per-member data bytes."""

    level: int
    layout: int
    chunk: int
    raid_disks: int
    member_bytes: int        # usable data bytes per member (sb.size * 512)

    @cached_property
    def data_disks(self) -> int:
        """Members holding data in each stripe (computed once: it is on every I/O)."""
        return {0: self.raid_disks, 1: 1, 4: self.raid_disks - 1, 5: self.raid_disks - 1,
                6: self.raid_disks - 2}.get(self.level, self.raid_disks)

    @property
    def near_copies(self) -> int:
        return self.layout & 0xFF if self.level == 10 else 1

    @property
    def size(self) -> int:
        """Array capacity in bytes (md's ``raid*_size``)."""
        if self.level == 1:
            return self.member_bytes
        if self.level == 10:
            chunks = self.member_bytes // self.chunk
            return (chunks * self.raid_disks // self.near_copies) * self.chunk
        return self.data_disks * self.member_bytes

    def stripe(self, stripe_no: int) -> StripeMap:
        return stripe_map(self.level, self.layout, self.raid_disks, stripe_no % self.raid_disks)

    def raid10_copies(self, chunk_no: int) -> list[tuple[int, int]]:
        """(member, row) of every copy of array chunk ``chunk_no`` (near layouts)."""
        n, nc = self.raid_disks, self.near_copies
        v = chunk_no * nc
        row, dev = divmod(v, n)
        out = []
        for _ in range(nc):
            out.append((dev, row))
            dev += 1
            if dev >= n:
                dev = 0
                row += 1
        return out

    def raid10_chunk_of(self, member: int, row: int) -> int | None:
        """Inverse of ``raid10_copies``: the array chunk stored at (member, row), if any."""
        c = (row * self.raid_disks + member) // self.near_copies
        return c if c * self.chunk < self.size else None

    def validate(self) -> None:
        """ValueError if md could not run this geometry."""
        if self.level not in LEVELS:
            raise ValueError(f"unsupported level {self.level}")
        if self.raid_disks < MIN_DISKS[self.level]:
            raise ValueError(f"raid{self.level} needs at least {MIN_DISKS[self.level]} members")
        if self.level != 1 and (self.chunk < 4096 or self.chunk & (self.chunk - 1)):
            raise ValueError("chunk must be a power of two of at least 4 KiB")
        if self.level == 10:
            if self.layout & ~0x1FF or (self.layout >> 8) != 1:
                raise ValueError("only raid10 near layouts are supported")
            if not 2 <= self.near_copies <= self.raid_disks:
                raise ValueError("raid10 needs at least as many members as copies")
        if self.level in (5, 6):
            self.stripe(0)
