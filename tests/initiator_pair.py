"""An initiator core and a target core wired back to back in memory."""

from __future__ import annotations

from storaged.block.file import FileBlockDevice
from storaged.initiator import session as s
from storaged.iscsi.chap import Credentials
from storaged.iscsi.connection import Close, Connection, Execute
from storaged.iscsi.target import Registry, TargetContext
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget

TARGET = "iqn.2026-11.org.storaged:mem"
LOCAL = ("127.0.0.1", 3260)


def make_registry(path: str, size: int = 4 << 20, chap: Credentials | None = None,
                  params: dict[str, str] | None = None, queue_depth: int = 128) -> Registry:
    dev = FileBlockDevice(path, block_size=512, create_size=size)
    lu = LogicalUnit(dev, name="lun0", serial="SN-MEM", wwn="6001405" + "0" * 16 + "1abcdef12")
    scsi = ScsiTarget(TARGET)
    scsi.set_luns({0: lu})
    reg = Registry()
    reg.targets[TARGET] = TargetContext(TARGET, scsi, portals=[LOCAL], open_access=True,
                                        chap=chap, params=params or {},
                                        queue_depth=queue_depth)
    return reg


class Pair:
    """Moves bytes between the two cores and runs the target's commands.

    ``chunk`` splits every transfer into pieces of that size so PDUs straddle
    reads as they do on a socket."""

    def __init__(self, reg: Registry, opts: s.LoginOptions, chunk: int = 0) -> None:
        self.reg = reg
        self.tgt = Connection(reg, LOCAL, ("127.0.0.1", 40000))
        self.ini = s.InitiatorConnection(opts)
        self.chunk = chunk
        self.events: list = []
        self.target_closed = False
        self.hold = False          # keep Execute events in ``held`` instead of running them
        self.held: list = []

    def _feed(self, out, sink) -> bool:
        raw = b"".join(bytes(b) for b in out)
        if not raw:
            return False
        step = self.chunk or len(raw)
        for i in range(0, len(raw), step):
            sink(raw[i:i + step])
        return True

    def pump(self) -> list:
        moved = True
        while moved:
            moved = self._feed(self.ini.data_to_send(), self.tgt.receive_data)
            for ev in self.tgt.next_events():
                if isinstance(ev, Execute) and self.hold:
                    self.held.append(ev.task)
                elif isinstance(ev, Execute):
                    t = ev.task
                    self.tgt.complete(t, self.tgt.target.scsi.execute(t.command))
                elif isinstance(ev, Close):
                    self.target_closed = True
            moved = self._feed(self.tgt.data_to_send(), self.ini.receive_data) or moved
            self.events += self.ini.next_events()
        ev, self.events = self.events, []
        return ev

    def release(self) -> list:
        """Run the held commands, then pump."""
        self.hold = False
        for t in self.held:
            self.tgt.complete(t, self.tgt.target.scsi.execute(t.command))
        self.held = []
        return self.pump()

    def login(self) -> list:
        self.ini.start()
        return self.pump()
