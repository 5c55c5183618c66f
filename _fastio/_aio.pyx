# cython: language_level=3, boundscheck=False, wraparound=False
"""Linux native AIO (io_submit/io_getevents) with an eventfd, for O_DIRECT files.

The iSCSI shell submits the disk accesses of concurrent READs and WRITEs
here and gets their completions through an eventfd registered in its event
loop: no thread wakes up, nothing contends for the GIL, one system call
submits a whole batch.  Same API and semantics as the thread-based reference
``storaged.block.aio.ThreadAio`` (tests compare them).

Kernel AIO is asynchronous for O_DIRECT I/O on the common filesystems (ext4,
XFS, block devices); elsewhere io_submit does the I/O before it returns,
which is slower but still correct.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int16_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)

from collections import deque


cdef extern from "<linux/aio_abi.h>":
    ctypedef unsigned long aio_context_t
    cdef struct iocb:
        uint64_t aio_data
        uint32_t aio_key
        uint32_t aio_rw_flags
        uint16_t aio_lio_opcode
        int16_t aio_reqprio
        uint32_t aio_fildes
        uint64_t aio_buf
        uint64_t aio_nbytes
        int64_t aio_offset
        uint64_t aio_reserved2
        uint32_t aio_flags
        uint32_t aio_resfd
    cdef struct io_event:
        uint64_t data
        uint64_t obj
        int64_t res
        int64_t res2
    enum:
        IOCB_CMD_PREAD
        IOCB_CMD_PWRITE
        IOCB_FLAG_RESFD


cdef extern from "<sys/syscall.h>":
    enum:
        SYS_io_setup
        SYS_io_destroy
        SYS_io_submit
        SYS_io_getevents


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)


cdef extern from "<time.h>":
    cdef struct timespec:
        long tv_sec
        long tv_nsec


cdef extern from "<sys/eventfd.h>":
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC


READ = 0
WRITE = 1


cdef class Aio:
    """An AIO context of ``depth`` slots.

    ``submit([(op, fd, offset, buffer, tag), ...])`` starts reads (op 0, into
    a writable buffer) and writes (op 1); what does not fit in the free slots
    waits and is submitted as slots free up.  ``reap()`` returns the finished
    ones as ``(tag, result)``: bytes transferred, or ``-errno``.  ``fileno()``
    is an eventfd that becomes readable when there is something to reap.
    Buffers are held until their operation finished; O_DIRECT needs them
    aligned (storaged.block.file.AlignedBuffers)."""

    cdef aio_context_t ctx
    cdef int efd
    cdef int depth
    cdef iocb *cbs
    cdef iocb **ptrs
    cdef io_event *events
    cdef Py_buffer *views
    cdef list tags
    cdef list free_slots
    cdef object waiting
    cdef list failed

    def __cinit__(self, int depth=256):
        self.ctx = 0
        self.efd = -1
        if depth < 1:
            raise ValueError(f"depth out of range: {depth!r}")
        self.depth = depth
        self.cbs = <iocb *>calloc(depth, sizeof(iocb))
        self.ptrs = <iocb **>calloc(depth, sizeof(iocb *))
        self.events = <io_event *>calloc(depth, sizeof(io_event))
        self.views = <Py_buffer *>calloc(depth, sizeof(Py_buffer))
        if self.cbs == NULL or self.ptrs == NULL or self.events == NULL or self.views == NULL:
            raise MemoryError()
        self.tags = [None] * depth
        self.free_slots = list(range(depth - 1, -1, -1))
        self.waiting = deque()
        self.failed = []
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")
        if syscall(SYS_io_setup, depth, &self.ctx) < 0:
            raise OSError(errno, "io_setup failed")

    def fileno(self):
        return self.efd

    @property
    def pending(self):
        """Operations submitted or waiting for a slot, not yet reaped."""
        return self.depth - len(self.free_slots) + len(self.waiting)

    def submit(self, ops):
        self.waiting.extend(ops)
        self._start()

    cdef void _start(self) except *:
        cdef int n = 0
        cdef int slot, i, first, err
        cdef long got
        cdef iocb *cb
        cdef Py_buffer *view
        try:
            while self.waiting and self.free_slots:
                op, fd, offset, buf, tag = self.waiting.popleft()
                slot = self.free_slots.pop()
                view = &self.views[slot]
                try:
                    PyObject_GetBuffer(buf, view,
                                       PyBUF_WRITABLE if op == READ else PyBUF_SIMPLE)
                except BaseException:
                    self.free_slots.append(slot)
                    raise
                self.tags[slot] = tag
                cb = &self.cbs[slot]
                memset(cb, 0, sizeof(iocb))
                cb.aio_data = slot
                cb.aio_lio_opcode = IOCB_CMD_PREAD if op == READ else IOCB_CMD_PWRITE
                cb.aio_fildes = fd
                cb.aio_buf = <uint64_t><size_t>view.buf
                cb.aio_nbytes = view.len
                cb.aio_offset = offset
                cb.aio_flags = IOCB_FLAG_RESFD
                cb.aio_resfd = self.efd
                self.ptrs[n] = cb
                n += 1
        finally:
            # What was prepared before a bad entry is submitted all the same.
            first = 0
            while first < n:
                with nogil:
                    got = syscall(SYS_io_submit, self.ctx, <long>(n - first),
                                  self.ptrs + first)
                if got < 0:
                    err = errno
                    if err == EINTR:
                        continue
                    # Nothing of the rest was queued: report each as failed.
                    for i in range(first, n):
                        self._fail(<int>self.ptrs[i].aio_data, -err)
                    break
                first += got
            if self.failed:
                self._wake()

    cdef void _fail(self, int slot, long res) except *:
        self.failed.append((self._release(slot), res))

    cdef object _release(self, int slot):
        tag = self.tags[slot]
        self.tags[slot] = None
        PyBuffer_Release(&self.views[slot])
        self.free_slots.append(slot)
        return tag

    cdef void _wake(self) noexcept:
        cdef uint64_t one = 1
        write(self.efd, &one, 8)

    def reap(self):
        cdef uint64_t count
        cdef long got
        cdef int i
        cdef timespec zero
        zero.tv_sec = 0
        zero.tv_nsec = 0
        read(self.efd, &count, 8)          # reset the eventfd (EAGAIN when empty)
        out = self.failed
        self.failed = []
        while True:
            got = syscall(SYS_io_getevents, self.ctx, <long>0, <long>self.depth,
                          self.events, &zero)
            if got < 0:
                if errno == EINTR:
                    continue
                raise OSError(errno, "io_getevents failed")
            if got == 0:
                break
            for i in range(got):
                out.append((self._release(<int>self.events[i].data), self.events[i].res))
        if self.waiting and self.free_slots:
            self._start()
            if self.failed:
                out.extend(self.failed)
                self.failed = []
        return out

    def close(self):
        """Wait for what is in flight (io_destroy does) and free the context."""
        cdef int slot
        if self.ctx:
            syscall(SYS_io_destroy, self.ctx)
            self.ctx = 0
            for slot in range(self.depth):
                if self.tags[slot] is not None:
                    self._release(slot)
        self.waiting.clear()
        if self.efd >= 0:
            close(self.efd)
            self.efd = -1

    def __dealloc__(self):
        cdef int slot
        if self.ctx:
            syscall(SYS_io_destroy, self.ctx)
            if self.views != NULL and self.tags is not None:
                for slot in range(self.depth):
                    if self.tags[slot] is not None:
                        PyBuffer_Release(&self.views[slot])
        if self.efd >= 0:
            close(self.efd)
        free(self.cbs)
        free(self.ptrs)
        free(self.events)
        free(self.views)
