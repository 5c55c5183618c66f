"""Mode pages (SPC-4 §7.5, SBC-3 §6.4): defaults, changeable masks, current values.

Pages are kept as raw byte strings in their MODE SENSE layout (page code,
page length, parameters), which makes MODE SELECT validation a byte-wise
compare against the changeable mask.  No page is savable (PS=0), so the
"saved" values are the defaults and a logical unit reset restores them.
"""

from __future__ import annotations

from dataclasses import dataclass

CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

# caching page byte 2
WCE = 0x04
RCD = 0x01
# control page
D_SENSE = 0x04   # byte 2
SWP = 0x08       # byte 4


@dataclass(frozen=True, slots=True)
class PageDef:
    code: int
    default: bytes     # full page: code, length, parameters
    changeable: bytes  # same length; 1 bits may be changed by MODE SELECT

    @property
    def length(self) -> int:
        return len(self.default)


def _caching(wce: bool) -> PageDef:
    d = bytearray(20)
    d[0], d[1] = CACHING, 18
    d[2] = WCE if wce else 0
    ch = bytearray(20)
    ch[0], ch[1] = CACHING, 18
    ch[2] = WCE | RCD
    return PageDef(CACHING, bytes(d), bytes(ch))


def _control(d_sense: bool) -> PageDef:
    d = bytearray(12)
    d[0], d[1] = CONTROL, 10
    d[2] = D_SENSE if d_sense else 0        # TST=000b (one task set), GLTSD=0
    d[3] = 0x00                             # QUEUE ALGORITHM MODIFIER 0, QERR 00b
    d[4] = 0x00                             # UA_INTLCK_CTRL 00b, SWP 0
    d[5] = 0x00                             # ATO, TAS, AUTOLOAD 0
    d[8:10] = (0xFFFF).to_bytes(2, "big")   # BUSY TIMEOUT PERIOD: unlimited
    ch = bytearray(12)
    ch[0], ch[1] = CONTROL, 10
    ch[2] = D_SENSE
    ch[4] = SWP
    return PageDef(CONTROL, bytes(d), bytes(ch))


def _iec() -> PageDef:
    d = bytearray(12)
    d[0], d[1] = INFORMATIONAL_EXCEPTIONS, 10
    d[2] = 0x08                             # DEXCPT: informational exceptions off
    ch = bytearray(12)
    ch[0], ch[1] = INFORMATIONAL_EXCEPTIONS, 10
    return PageDef(INFORMATIONAL_EXCEPTIONS, bytes(d), bytes(ch))


class ModePages:
    """The mode pages of one logical unit (shared by all I_T nexuses)."""

    def __init__(self, wce: bool = True, d_sense: bool = False) -> None:
        self.defs: dict[int, PageDef] = {}
        for page in (_caching(wce), _control(d_sense), _iec()):
            self.defs[page.code] = page
        self.current: dict[int, bytearray] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the saved (= default) values, as after a logical unit reset."""
        self.current = {code: bytearray(p.default) for code, p in self.defs.items()}

    def codes(self) -> list[int]:
        return sorted(self.defs)

    def page(self, code: int, pc: int) -> bytes:
        """One page for page control ``pc`` (0 current, 1 changeable, 2 default)."""
        if pc == 0:
            return bytes(self.current[code])
        if pc == 1:
            return self.defs[code].changeable
        return self.defs[code].default

    def set_default_bit(self, code: int, byte: int, mask: int, on: bool) -> None:
        """Change a default (and the current) value: configuration, not MODE SELECT."""
        page = self.defs[code]
        d = bytearray(page.default)
        d[byte] = (d[byte] | mask) if on else (d[byte] & ~mask)
        self.defs[code] = PageDef(code, bytes(d), page.changeable)
        cur = self.current[code]
        cur[byte] = (cur[byte] | mask) if on else (cur[byte] & ~mask)

    def bit(self, code: int, byte: int, mask: int) -> bool:
        return bool(self.current[code][byte] & mask)
