"""Give a storage node's backstore the LU identity of another node's (lab only).

Storage nodes that serve one LU over the same backing storage must report
the same identity: VPD 83h NAA (``wwn``) and VPD 80h unit serial number
(SPC-4 §7.8.6, §7.8.18), so an initiator that follows the floating portal
address to another node sees the same disk, and shared persistent
reservations meet on one ``pr:<wwn>`` lock (docs/ha.md, "Shared LUs across
storage nodes").  docs/ha.md does it with ``config save``/``restore``; the
lab builds every node with the CLI and then copies the two fields, offline,
before the daemons start::

    python -m storaged.lab.identity FROM_DIR TO_DIR BACKSTORE
"""

from __future__ import annotations

import sys

from storaged.state import Store
from storaged.state.records import Backstore


def copy_identity(src_dir: str, dst_dir: str, name: str) -> tuple[str, str]:
    """Set ``dst_dir``'s backstore ``name`` to ``src_dir``'s wwn and serial; (wwn, serial)."""
    src = Store(src_dir)
    try:
        with src.read() as txn:
            b = txn.get(Backstore, name)
    finally:
        src.close()
    if b is None:
        raise LookupError(f"no backstore {name!r} in {src_dir}")
    dst = Store(dst_dir)
    try:
        with dst.write() as txn:
            d = txn.get(Backstore, name)
            if d is None:
                raise LookupError(f"no backstore {name!r} in {dst_dir}")
            d.wwn, d.serial = b.wwn, b.serial
            txn.put(d)
    finally:
        dst.close()
    return b.wwn, b.serial


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m storaged.lab.identity FROM_DIR TO_DIR BACKSTORE",
              file=sys.stderr)
        return 2
    try:
        wwn, serial = copy_identity(*argv)
    except LookupError as e:
        print(f"identity: {e.args[0]}", file=sys.stderr)
        return 1
    print(f"backstore {argv[2]} in {argv[1]}: wwn {wwn}, serial {serial}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
