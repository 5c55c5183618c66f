"""storaged.block.aio: the compiled native-AIO context and the thread-based
reference give the same results on an O_DIRECT file."""

from __future__ import annotations

import errno
import mmap
import os
import select

import pytest

from storaged.block import aio

IMPLS = [aio.ThreadAio]
if aio.IMPLEMENTATION == "compiled":
    IMPLS.append(aio.Aio)


def _wait_all(ctx, n: int, timeout: float = 10.0) -> dict:
    got: dict = {}
    while len(got) < n:
        r, _w, _x = select.select([ctx.fileno()], [], [], timeout)
        assert r, f"no completion within {timeout} s ({len(got)} of {n})"
        got.update(ctx.reap())
    return got


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, max(mmap.PAGESIZE, len(data)))
    buf[:len(data)] = data
    return buf


def test_the_compiled_context_is_built():
    # setup.sh builds the extensions; a silent fallback would hide a broken build.
    from storaged import fastio
    if fastio.IMPLEMENTATION == "compiled":
        assert aio.IMPLEMENTATION == "compiled"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__name__)
def test_writes_then_reads_on_an_o_direct_file(tmp_path, impl):
    path = str(tmp_path / "f.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    ctx = impl(depth=4)          # fewer slots than operations: the rest waits its turn
    try:
        blocks = [os.urandom(4096) for _ in range(12)]
        bufs = [_aligned(b) for b in blocks]
        ctx.submit([(aio.WRITE, fd, i * 8192, memoryview(b)[:4096], ("w", i))
                    for i, b in enumerate(bufs)])
        assert ctx.pending == 12
        done = _wait_all(ctx, 12)
        assert done == {("w", i): 4096 for i in range(12)}
        assert ctx.pending == 0
        with open(path, "rb") as f:
            for i, b in enumerate(blocks):
                f.seek(i * 8192)
                assert f.read(4096) == b
        outs = [mmap.mmap(-1, 4096) for _ in blocks]
        ctx.submit([(aio.READ, fd, i * 8192, o, i) for i, o in enumerate(outs)])
        done = _wait_all(ctx, 12)
        assert done == {i: 4096 for i in range(12)}
        assert [bytes(o) for o in outs] == blocks
        # At the end of the file a read is short: the result says how much.
        tail = mmap.mmap(-1, 8192)
        ctx.submit([(aio.READ, fd, (1 << 20) - 4096, tail, "tail")])
        assert _wait_all(ctx, 1) == {"tail": 4096}
        # Errors come back as -errno, never as an exception from submit.
        ctx.submit([(aio.READ, 987654, 0, mmap.mmap(-1, 4096), "badfd")])
        assert _wait_all(ctx, 1) == {"badfd": -errno.EBADF}
        misaligned = bytearray(4097)
        ctx.submit([(aio.READ, fd, 1, memoryview(misaligned)[1:], "einval")])
        assert _wait_all(ctx, 1) == {"einval": -errno.EINVAL}
    finally:
        ctx.close()
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__name__)
def test_reads_need_a_writable_buffer(impl):
    ctx = impl()
    try:
        with pytest.raises(BufferError):
            ctx.submit([(aio.READ, 0, 0, b"read-only", "x")])
        assert ctx.pending == 0
    finally:
        ctx.close()
