"""XDR (RFC 4506) as declarative type tables.

Each wire type is an ``XdrType`` with ``pack(value, out)`` (append to a
bytearray) and ``unpack(buf, off) -> (value, new_off)``.  Protocol modules
(``rpc``, ``nfs3``, ``mount``, ``portmap``, ``nlm``) describe their
structures by composing these, mirroring the ``.x`` definitions of the RFCs
line by line, e.g. ``Struct("specdata3", ("specdata1", UINT32),
("specdata2", UINT32))``.

Value conventions:

* integers are ints, ``bool`` is bool, ``void`` is None;
* ``opaque``/``string`` are bytes on pack (any buffer) and zero-copy
  memoryview slices of the input on unpack for ``Opaque``; ``String`` unpacks
  to bytes (file names are byte strings in NFS: no charset is assumed);
* a struct is a dict keyed by field name;
* a discriminated union is a ``(discriminant, arm_value)`` tuple;
* an optional-data ``*T`` is None or the value;
* the "linked list" idiom (``entry *next``, RFC 4506 §4.19) is a Python list
  (``List``).

Malformed input raises ``XdrError`` (callers answer GARBAGE_ARGS).  Structs
whose fields are all fixed-size primitives compile to one ``struct.Struct``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any


class XdrError(ValueError):
    """Input does not decode as the expected XDR type (short, too long, bad value)."""


def pad(n: int) -> int:
    """Bytes of zero padding after ``n`` bytes of opaque data (RFC 4506 §3.9)."""
    return -n & 3


_ZEROS = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by n & 3


class XdrType:
    """Base class: a named XDR type; ``fmt`` is set for fixed-size primitives."""

    name: str = "?"
    fmt: str | None = None  # struct format (without byte order) when fixed-size primitive

    def pack(self, value: Any, out: bytearray) -> None:
        raise NotImplementedError

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        """The XDR bytes of ``value``."""
        out = bytearray()
        self.pack(value, out)
        return bytes(out)

    def decode(self, data: bytes | bytearray | memoryview, exact: bool = True) -> Any:
        """Decode ``data``; with ``exact`` trailing bytes are an error."""
        buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        value, off = self.unpack(buf, 0)
        if exact and off != len(buf):
            raise XdrError(f"{self.name}: {len(buf) - off} trailing bytes")
        return value

    def __repr__(self) -> str:
        return f"<xdr {self.name}>"


class Prim(XdrType):
    """A fixed-size primitive: int, unsigned int, hyper, unsigned hyper."""

    def __init__(self, name: str, fmt: str, lo: int, hi: int) -> None:
        self.name = name
        self.fmt = fmt
        self._st = struct.Struct(">" + fmt)
        self.size = self._st.size
        self.lo, self.hi = lo, hi

    def pack(self, value: Any, out: bytearray) -> None:
        try:
            out += self._st.pack(value)
        except struct.error as e:
            raise XdrError(f"{self.name}: cannot encode {value!r}: {e}") from None

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        end = off + self.size
        if end > len(buf):
            raise XdrError(f"{self.name}: short input")
        return self._st.unpack_from(buf, off)[0], end


INT32 = Prim("int", "i", -(1 << 31), (1 << 31) - 1)
UINT32 = Prim("unsigned int", "I", 0, (1 << 32) - 1)
INT64 = Prim("hyper", "q", -(1 << 63), (1 << 63) - 1)
UINT64 = Prim("unsigned hyper", "Q", 0, (1 << 64) - 1)


class _Bool(XdrType):
    name = "bool"

    def pack(self, value: Any, out: bytearray) -> None:
        out += b"\0\0\0\1" if value else b"\0\0\0\0"

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        v, off = UINT32.unpack(buf, off)
        if v > 1:
            raise XdrError(f"bool: bad value {v}")
        return bool(v), off


BOOL = _Bool()


class _Void(XdrType):
    name = "void"

    def pack(self, value: Any, out: bytearray) -> None:
        pass

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        return None, off


VOID = _Void()


class Enum(XdrType):
    """An enum: an int32 restricted to ``values`` (unknown values are XdrError)."""

    def __init__(self, name: str, values: Iterable[int]) -> None:
        self.name = name
        self.values = frozenset(int(v) for v in values)

    def pack(self, value: Any, out: bytearray) -> None:
        if value not in self.values:
            raise XdrError(f"{self.name}: {value!r} is not a member")
        out += struct.pack(">i", value)

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        v, off = INT32.unpack(buf, off)
        if v not in self.values:
            raise XdrError(f"{self.name}: {v} is not a member")
        return v, off


class FixedOpaque(XdrType):
    """``opaque name[n]``: exactly n bytes plus padding."""

    def __init__(self, n: int, name: str | None = None) -> None:
        self.n = n
        self.name = name or f"opaque[{n}]"

    def pack(self, value: Any, out: bytearray) -> None:
        if len(value) != self.n:
            raise XdrError(f"{self.name}: need {self.n} bytes, got {len(value)}")
        out += value
        out += _ZEROS[self.n & 3]

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        end = off + self.n
        if end + pad(self.n) > len(buf):
            raise XdrError(f"{self.name}: short input")
        return bytes(buf[off:end]), end + pad(self.n)


class Opaque(XdrType):
    """``opaque name<max>``: length, bytes, padding.  Unpacks to a memoryview slice."""

    def __init__(self, maxlen: int | None = None, name: str | None = None,
                 copy: bool = False) -> None:
        self.maxlen = maxlen
        self.copy = copy
        self.name = name or f"opaque<{'' if maxlen is None else maxlen}>"

    def pack(self, value: Any, out: bytearray) -> None:
        n = len(value)
        if self.maxlen is not None and n > self.maxlen:
            raise XdrError(f"{self.name}: {n} bytes exceeds {self.maxlen}")
        out += n.to_bytes(4, "big")
        out += value
        out += _ZEROS[n & 3]

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        n, off = UINT32.unpack(buf, off)
        if self.maxlen is not None and n > self.maxlen:
            raise XdrError(f"{self.name}: {n} bytes exceeds {self.maxlen}")
        end = off + n
        if end + pad(n) > len(buf):
            raise XdrError(f"{self.name}: short input")
        data = buf[off:end]
        return (bytes(data) if self.copy else data), end + pad(n)


class String(Opaque):
    """``string name<max>``: like opaque, unpacked as bytes (no charset assumed)."""

    def __init__(self, maxlen: int | None = None, name: str | None = None) -> None:
        super().__init__(maxlen, name or f"string<{'' if maxlen is None else maxlen}>",
                         copy=True)

    def pack(self, value: Any, out: bytearray) -> None:
        super().pack(value.encode() if isinstance(value, str) else value, out)


class Array(XdrType):
    """``T name<max>``: count then elements."""

    def __init__(self, elem: XdrType, maxlen: int | None = None,
                 name: str | None = None) -> None:
        self.elem = elem
        self.maxlen = maxlen
        self.name = name or f"{elem.name}<{'' if maxlen is None else maxlen}>"

    def pack(self, value: Any, out: bytearray) -> None:
        if self.maxlen is not None and len(value) > self.maxlen:
            raise XdrError(f"{self.name}: {len(value)} elements exceeds {self.maxlen}")
        out += len(value).to_bytes(4, "big")
        for v in value:
            self.elem.pack(v, out)

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        n, off = UINT32.unpack(buf, off)
        if self.maxlen is not None and n > self.maxlen:
            raise XdrError(f"{self.name}: {n} elements exceeds {self.maxlen}")
        if n * 4 > len(buf) - off:  # every element takes at least 4 bytes
            raise XdrError(f"{self.name}: short input")
        items = []
        for _ in range(n):
            v, off = self.elem.unpack(buf, off)
            items.append(v)
        return items, off


class Optional(XdrType):
    """``T *name``: a bool then, if true, the value (None when absent)."""

    def __init__(self, elem: XdrType, name: str | None = None) -> None:
        self.elem = elem
        self.name = name or f"*{elem.name}"

    def pack(self, value: Any, out: bytearray) -> None:
        if value is None:
            out += b"\0\0\0\0"
        else:
            out += b"\0\0\0\1"
            self.elem.pack(value, out)

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        present, off = BOOL.unpack(buf, off)
        if not present:
            return None, off
        return self.elem.unpack(buf, off)


class List(XdrType):
    """The optional-data linked list (``struct entry { ...; entry *next; }``).

    On the wire each element is preceded by TRUE and the list ends with FALSE
    (RFC 4506 §4.19); in Python it is a list of the element values.  ``elem``
    describes an element *without* its ``next`` pointer.
    """

    def __init__(self, elem: XdrType, name: str | None = None,
                 max_items: int = 1 << 20) -> None:
        self.elem = elem
        self.max_items = max_items
        self.name = name or f"list of {elem.name}"

    def pack(self, value: Any, out: bytearray) -> None:
        for v in value:
            out += b"\0\0\0\1"
            self.elem.pack(v, out)
        out += b"\0\0\0\0"

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        items = []
        while True:
            more, off = BOOL.unpack(buf, off)
            if not more:
                return items, off
            if len(items) >= self.max_items:
                raise XdrError(f"{self.name}: more than {self.max_items} items")
            v, off = self.elem.unpack(buf, off)
            items.append(v)


class Struct(XdrType):
    """``struct name { T1 f1; T2 f2; ... }`` as a dict; all-primitive ones use one struct.Struct."""

    def __init__(self, name: str, *fields: tuple[str, XdrType]) -> None:
        self.name = name
        self.fields = fields
        self.names = tuple(f for f, _ in fields)
        if fields and all(isinstance(t, Prim) for _, t in fields):
            fmt = "".join(t.fmt for _, t in fields)  # type: ignore[misc]
            self._st: struct.Struct | None = struct.Struct(">" + fmt)
        else:
            self._st = None

    def pack(self, value: Any, out: bytearray) -> None:
        try:
            if self._st is not None:
                out += self._st.pack(*[value[n] for n in self.names])
                return
            for n, t in self.fields:
                t.pack(value[n], out)
        except KeyError as e:
            raise XdrError(f"{self.name}: missing field {e}") from None
        except struct.error as e:
            raise XdrError(f"{self.name}: {e}") from None

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        if self._st is not None:
            end = off + self._st.size
            if end > len(buf):
                raise XdrError(f"{self.name}: short input")
            return dict(zip(self.names, self._st.unpack_from(buf, off), strict=True)), end
        out = {}
        for n, t in self.fields:
            out[n], off = t.unpack(buf, off)
        return out, off


class Union(XdrType):
    """``union switch (disc) { case v: T; ... default: T; }`` as ``(disc, value)``.

    ``arms`` maps discriminant values to arm types; ``default`` is the arm for
    any other value (None means other values are an error).
    """

    def __init__(self, name: str, disc: XdrType, arms: dict[int, XdrType],
                 default: XdrType | None = None) -> None:
        self.name = name
        self.disc = disc
        self.arms = arms
        self.default = default

    def _arm(self, d: int) -> XdrType:
        arm = self.arms.get(d, self.default)
        if arm is None:
            raise XdrError(f"{self.name}: no arm for discriminant {d}")
        return arm

    def pack(self, value: Any, out: bytearray) -> None:
        d, v = value
        arm = self._arm(d)
        self.disc.pack(d, out)
        arm.pack(v, out)

    def unpack(self, buf: memoryview, off: int) -> tuple[Any, int]:
        d, off = self.disc.unpack(buf, off)
        v, off = self._arm(d).unpack(buf, off)
        return (d, v), off


class Custom(XdrType):
    """A hand-written codec given as two functions (for hot paths with a table reference)."""

    def __init__(self, name: str, pack: Callable[[Any, bytearray], None],
                 unpack: Callable[[memoryview, int], tuple[Any, int]]) -> None:
        self.name = name
        self.pack = pack  # type: ignore[method-assign]
        self.unpack = unpack  # type: ignore[method-assign]
