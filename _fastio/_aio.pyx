# cython: language_level=3, boundscheck=False, wraparound=False
"""Linux native AIO (io_submit/io_getevents) with an eventfd, for O_DIRECT files.

The iSCSI shell submits the disk accesses of concurrent READs and WRITEs
here and gets their completions through an eventfd registered in its event
loop.  ``io_submit`` runs the filesystem's direct-I/O path (extent lookup,
bio submission) in the caller, about 10 us per 4 KiB operation, so a
submitter thread of plain C (it never takes the GIL) makes the system calls
while the event loop goes on with the next commands: the loop thread only
fills in the control blocks.  Same API and semantics as the thread-based
reference ``storaged.block.aio.ThreadAio`` (tests compare them).

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


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)


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


cdef struct SubmitQueue:
    # Control blocks the loop thread filled in, waiting for the submitter
    # thread; and slots whose io_submit failed, waiting for reap().  All
    # fields but ctx/efd are guarded by lock.
    pthread_mutex_t lock
    pthread_cond_t cond
    iocb **ring
    int head
    int count
    int cap
    int stop
    aio_context_t ctx
    int efd
    int *failed_slot
    long *failed_res
    int nfailed
    iocb **batch


cdef void *_submitter(void *arg) noexcept nogil:
    """The submitter thread: io_submit whatever the ring holds, in order."""
    cdef SubmitQueue *q = <SubmitQueue *>arg
    cdef int n, i, first, err
    cdef long got
    cdef uint64_t one = 1
    while True:
        pthread_mutex_lock(&q.lock)
        while q.count == 0 and not q.stop:
            pthread_cond_wait(&q.cond, &q.lock)
        if q.count == 0:
            pthread_mutex_unlock(&q.lock)
            return NULL
        n = q.count
        for i in range(n):
            q.batch[i] = q.ring[(q.head + i) % q.cap]
        q.head = (q.head + n) % q.cap
        q.count = 0
        pthread_mutex_unlock(&q.lock)
        first = 0
        while first < n:
            got = syscall(SYS_io_submit, q.ctx, <long>(n - first), q.batch + first)
            if got < 0:
                err = errno
                if err == EINTR:
                    continue
                # Nothing of the rest was queued: each is reported as failed.
                pthread_mutex_lock(&q.lock)
                for i in range(first, n):
                    q.failed_slot[q.nfailed] = <int>q.batch[i].aio_data
                    q.failed_res[q.nfailed] = -err
                    q.nfailed += 1
                pthread_mutex_unlock(&q.lock)
                write(q.efd, &one, 8)
                break
            first += got


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
    cdef SubmitQueue q
    cdef pthread_t thread
    cdef bint threaded

    def __cinit__(self, int depth=256):
        self.ctx = 0
        self.efd = -1
        self.threaded = False
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
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")
        if syscall(SYS_io_setup, depth, &self.ctx) < 0:
            raise OSError(errno, "io_setup failed")
        memset(&self.q, 0, sizeof(SubmitQueue))
        self.q.cap = depth
        self.q.ctx = self.ctx
        self.q.efd = self.efd
        self.q.ring = <iocb **>calloc(depth, sizeof(iocb *))
        self.q.batch = <iocb **>calloc(depth, sizeof(iocb *))
        self.q.failed_slot = <int *>calloc(depth, sizeof(int))
        self.q.failed_res = <long *>calloc(depth, sizeof(long))
        if self.q.ring == NULL or self.q.batch == NULL or self.q.failed_slot == NULL \
                or self.q.failed_res == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.q.lock, NULL)
        pthread_cond_init(&self.q.cond, NULL)
        if pthread_create(&self.thread, NULL, _submitter, &self.q) != 0:
            raise OSError(errno, "cannot start the AIO submitter thread")
        self.threaded = True

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
        cdef int slot, i
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
            # What was prepared before a bad entry is submitted all the same,
            # by the submitter thread, in this order.
            if n:
                pthread_mutex_lock(&self.q.lock)
                for i in range(n):
                    self.q.ring[(self.q.head + self.q.count) % self.q.cap] = self.ptrs[i]
                    self.q.count += 1
                pthread_cond_signal(&self.q.cond)
                pthread_mutex_unlock(&self.q.lock)

    cdef object _release(self, int slot):
        tag = self.tags[slot]
        self.tags[slot] = None
        PyBuffer_Release(&self.views[slot])
        self.free_slots.append(slot)
        return tag

    def reap(self):
        cdef uint64_t count
        cdef long got
        cdef int i
        cdef timespec zero
        zero.tv_sec = 0
        zero.tv_nsec = 0
        read(self.efd, &count, 8)          # reset the eventfd (EAGAIN when empty)
        out = []
        pthread_mutex_lock(&self.q.lock)   # what io_submit refused (submitter thread)
        for i in range(self.q.nfailed):
            out.append((self._release(self.q.failed_slot[i]), self.q.failed_res[i]))
        self.q.nfailed = 0
        pthread_mutex_unlock(&self.q.lock)
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
        return out

    cdef void _stop_thread(self) noexcept:
        if self.threaded:
            pthread_mutex_lock(&self.q.lock)
            self.q.stop = 1
            pthread_cond_signal(&self.q.cond)
            pthread_mutex_unlock(&self.q.lock)
            with nogil:
                pthread_join(self.thread, NULL)    # after it submitted what it holds
            self.threaded = False

    def close(self):
        """Wait for what is in flight (io_destroy does) and free the context."""
        cdef int slot
        self._stop_thread()
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
        self._stop_thread()
        if self.ctx:
            syscall(SYS_io_destroy, self.ctx)
            if self.views != NULL and self.tags is not None:
                for slot in range(self.depth):
                    if self.tags[slot] is not None:
                        PyBuffer_Release(&self.views[slot])
        if self.efd >= 0:
            close(self.efd)
        pthread_mutex_destroy(&self.q.lock)
        pthread_cond_destroy(&self.q.cond)
        free(self.q.ring)
        free(self.q.batch)
        free(self.q.failed_slot)
        free(self.q.failed_res)
        free(self.cbs)
        free(self.ptrs)
        free(self.events)
        free(self.views)
