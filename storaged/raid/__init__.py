"""md-compatible software RAID (levels 0, 1, 4, 5, 6, 10) over BlockDevices.

* :mod:`storaged.raid.superblock`: md v1.2 superblock codec and checksum;
* :mod:`storaged.raid.layout`: md's address mapping for every level;
* :mod:`storaged.raid.array`: :class:`RaidArray`, the BlockDevice facade
  (superblocks, bitmap, read/write/flush), made of the parts below;
* :mod:`storaged.raid.members`: members, their states, fail/add/remove/replace
  and member I/O;
* :mod:`storaged.raid.stripes`: stripe reads, reconstruction, parity,
  reconstruct-writes;
* :mod:`storaged.raid.journaling`: the write-hole journal's use
  (:mod:`storaged.raid.journal` is its format);
* :mod:`storaged.raid.sync`: the background recovery/resync/check/repair worker;
* :mod:`storaged.raid.manage`: create / assemble / examine;
* :mod:`storaged.raid.records`: the array record of the state store;
* :mod:`storaged.raid.service`: arrays recorded in the state store, the
  operations the CLI and the daemon share;
* :mod:`storaged.raid.cli`: the ``storaged raid`` command group.
"""

from storaged.raid.array import RaidArray
from storaged.raid.manage import assemble, create, examine
from storaged.raid.members import RaidError

__all__ = ["RaidArray", "RaidError", "assemble", "create", "examine"]
