"""The acknowledged-write checker: ``python -m storaged.lab.check DEVICE ACKDIR``.

Independent of the scenario that produced the writes: it reads the
writers' logs (every ``*.jsonl`` in ACKDIR) and the shared filesystem on
DEVICE (an ``iscsi://`` URL of the shared LUN, read with storaged's own
initiator, or the image file), mounted read-only in this process without
FUSE or a cluster, and verifies that every acknowledged file is there with
the bytes that were acknowledged.  Prints one line per problem and a
summary; exit 0 only when nothing acknowledged was lost.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import sys
from typing import Any


def load_acks(ack_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(acknowledged writes, error lines) of every writer log in ``ack_dir``."""
    acks, errors = [], []
    for path in sorted(glob.glob(os.path.join(ack_dir, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line: that write was never acknowledged
                (errors if "error" in rec else acks).append(rec)
    return acks, errors


class AlignedReader:
    """Read-only view of a BlockDevice that takes any offset and length: a LUN only
    takes whole blocks, the filesystem reads its superblock's 116 bytes."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.block_size = dev.block_size

    def read(self, offset: int, length: int) -> bytes:
        bs = self.block_size
        start = offset - offset % bs
        end = -(-(offset + length) // bs) * bs
        data = self.dev.read(start, end - start)
        return data[offset - start:offset - start + length]

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "the checker never writes")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.dev.close()


def open_device(device: str) -> Any:
    if device.startswith("iscsi://"):
        from storaged.initiator.device import RemoteBlockDevice
        return AlignedReader(RemoteBlockDevice(device))
    from storaged.block.file import FileBlockDevice
    return FileBlockDevice(device, block_size=512, read_only=True)


def check(device: str, ack_dir: str) -> dict[str, Any]:
    """Verify every acknowledged write; a JSON-ready report."""
    from storaged.clusterfs.fs import ClusterFS
    from storaged.clusterfs.locks import LocalLocks

    acks, errors = load_acks(ack_dir)
    dev = open_device(device)
    missing: list[str] = []
    wrong: list[str] = []
    try:
        fs = ClusterFS(dev, LocalLocks(), read_only=True).mount()
        for a in acks:
            path = "/" + a["file"]
            try:
                data = fs.read(path, 1 << 20, 0)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    missing.append(path)
                else:
                    wrong.append(f"{path}: {e.strerror or e}")
                continue
            if hashlib.sha256(data).hexdigest() != a["sha256"]:
                wrong.append(f"{path}: content differs from what was acknowledged")
    finally:
        dev.close()
    per_node: dict[str, int] = {}
    for a in acks:
        per_node[a["node"]] = per_node.get(a["node"], 0) + 1
    return {"device": device.split("?")[0], "acknowledged": len(acks),
            "verified": len(acks) - len(missing) - len(wrong), "missing": missing,
            "wrong": wrong, "per_node": per_node,
            "writer_errors": [{"node": e["node"], "error": e["error"]} for e in errors]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m storaged.lab.check DEVICE ACKDIR", file=sys.stderr)
        return 2
    try:
        rep = check(argv[0], argv[1])
    except OSError as e:
        print(f"check: cannot read {argv[0].split('?')[0]}: {e}", file=sys.stderr)
        return 1
    for p in rep["missing"]:
        print(f"LOST: {p} was acknowledged but is not on the device")
    for p in rep["wrong"]:
        print(f"WRONG: {p}")
    nodes = ", ".join(f"{n} {c}" for n, c in sorted(rep["per_node"].items()))
    print(f"check: {rep['verified']}/{rep['acknowledged']} acknowledged writes verified on "
          f"{rep['device']} ({nodes or 'none'})")
    print("CHECK-JSON " + json.dumps(rep))
    return 0 if rep["verified"] == rep["acknowledged"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
