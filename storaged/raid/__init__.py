"""md-compatible software RAID (levels 0, 1, 4, 5, 6, 10) over BlockDevices.

* :mod:`storaged.raid.superblock`: md v1.2 superblock codec and checksum;
* :mod:`storaged.raid.layout`: md's address mapping for every level;
* :mod:`storaged.raid.array`: :class:`RaidArray`, the BlockDevice (degraded
  I/O, failure marking, spares, recovery, scrub);
* :mod:`storaged.raid.manage`: create / assemble / examine;
* :mod:`storaged.raid.service`: arrays recorded in the state store, the
  operations the CLI and the daemon share;
* :mod:`storaged.raid.cli`: the ``storaged raid`` command group.
"""

from storaged.raid.array import RaidArray, RaidError
from storaged.raid.manage import assemble, create, examine

__all__ = ["RaidArray", "RaidError", "assemble", "create", "examine"]
