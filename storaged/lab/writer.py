"""A lab writer: ``python -m storaged.lab.writer DIR ACKLOG NODE``.

Writes numbered 4 KiB files into DIR (a directory on a cluster mount), each
closed after fsync, and only then appends one JSON line for it to ACKLOG
(a file outside the lab, fsynced too): the log lists exactly the writes the
filesystem acknowledged.  On an error (EIO when the mount withdrew, ENOLCK
without quorum) it logs the error and stops: a fenced node's writer must
not be counted as acknowledging anything after that.  SIGTERM stops it
between writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

SIZE = 4096


def payload(node: str, i: int) -> bytes:
    """The bytes of write ``i`` of ``node`` (self-describing, so a checker can tell
    a lost write from one of another node or another index)."""
    head = f"{node} write {i}\n".encode()
    body = hashlib.sha256(head).hexdigest().encode()
    return (head + body * (SIZE // len(body) + 1))[:SIZE]


def main(argv: list[str]) -> int:
    directory, acklog, node = argv
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    ack = os.open(acklog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(rec: dict) -> None:
        os.write(ack, (json.dumps(rec) + "\n").encode())
        os.fsync(ack)
    try:
        os.makedirs(directory, exist_ok=True)
        i = 0
        while not stop:
            i += 1
            name = f"rec-{i:06d}"
            path = os.path.join(directory, name)
            data = payload(node, i)
            t0 = time.time()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                log({"node": node, "i": i, "error": e.strerror or str(e), "errno": e.errno,
                     "t": time.time(), "t_start": t0})
                return 0
            log({"node": node, "i": i, "file": f"{os.path.basename(directory)}/{name}",
                 "sha256": hashlib.sha256(data).hexdigest(), "t": time.time(),
                 "t_start": t0})
    finally:
        os.close(ack)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
