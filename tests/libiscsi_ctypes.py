"""Raw SCSI commands through the real libiscsi (libiscsi.so.7, package libiscsi7)
with ctypes, for CDBs libiscsi's tools do not send (REPORT/SET TARGET PORT
GROUPS).  The struct layouts are libiscsi 1.19's scsi-lowlevel.h."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

SCSI_XFER_NONE, SCSI_XFER_READ, SCSI_XFER_WRITE = 0, 1, 2
ISCSI_SESSION_NORMAL = 2


class ScsiSense(ctypes.Structure):
    # The three 1-bit fields share their first byte with bit_pointer (GCC layout).
    _fields_ = [("error_type", ctypes.c_ubyte), ("key", ctypes.c_int), ("ascq", ctypes.c_int),
                ("bits", ctypes.c_ubyte), ("bit_pointer", ctypes.c_ubyte),
                ("field_pointer", ctypes.c_uint16)]


class ScsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.POINTER(ctypes.c_ubyte))]


class ScsiTask(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int), ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int), ("cdb", ctypes.c_ubyte * 16),
                ("residual_status", ctypes.c_int), ("residual", ctypes.c_size_t),
                ("sense", ScsiSense), ("datain", ScsiData)]


class IscsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("data", ctypes.POINTER(ctypes.c_ubyte))]


def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libiscsi.so.7")
    except OSError:
        pytest.fail("libiscsi.so.7 not found: install the Debian package 'libiscsi7'")
    lib.iscsi_create_context.restype = ctypes.c_void_p
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    for name in ("iscsi_set_targetname", "iscsi_connect_sync"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_login_sync.argtypes = [ctypes.c_void_p]
    lib.iscsi_logout_sync.argtypes = [ctypes.c_void_p]
    lib.iscsi_destroy_context.argtypes = [ctypes.c_void_p]
    lib.iscsi_get_error.argtypes = [ctypes.c_void_p]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.scsi_create_task.restype = ctypes.POINTER(ScsiTask)
    lib.scsi_create_task.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.iscsi_scsi_command_sync.restype = ctypes.POINTER(ScsiTask)
    lib.iscsi_scsi_command_sync.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                            ctypes.POINTER(ScsiTask), ctypes.POINTER(IscsiData)]
    lib.scsi_free_scsi_task.argtypes = [ctypes.POINTER(ScsiTask)]
    return lib


class LibIscsi:
    """One libiscsi session: connect + login (no TEST UNIT READY, unlike
    iscsi_full_connect_sync, so a standby port can be logged into)."""

    def __init__(self, portal: str, target: str,
                 initiator: str = "iqn.2026-11.test:libiscsi-ctypes") -> None:
        self.lib = _lib()
        self.ctx = self.lib.iscsi_create_context(initiator.encode())
        assert self.ctx, "iscsi_create_context failed"
        self.lib.iscsi_set_targetname(self.ctx, target.encode())
        self.lib.iscsi_set_session_type(self.ctx, ISCSI_SESSION_NORMAL)
        if self.lib.iscsi_connect_sync(self.ctx, portal.encode()) != 0 or \
                self.lib.iscsi_login_sync(self.ctx) != 0:
            err = self.lib.iscsi_get_error(self.ctx)
            self.lib.iscsi_destroy_context(self.ctx)
            raise AssertionError(f"libiscsi login failed: {err!r}")

    def command(self, cdb: bytes, read_len: int = 0, data: bytes | None = None,
                lun: int = 0) -> tuple[int, bytes, tuple[int, int, int] | None]:
        """(status, Data-In, (key, asc, ascq) or None)."""
        direction = SCSI_XFER_WRITE if data else (SCSI_XFER_READ if read_len else SCSI_XFER_NONE)
        task = self.lib.scsi_create_task(len(cdb), cdb, direction,
                                         len(data) if data else read_len)
        assert task, "scsi_create_task failed"
        out = None
        if data:
            buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
            out = IscsiData(len(data), ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte)))
        done = self.lib.iscsi_scsi_command_sync(self.ctx, lun, task,
                                                ctypes.byref(out) if out else None)
        assert done, f"libiscsi: {self.lib.iscsi_get_error(self.ctx)!r}"
        t = task.contents
        datain = ctypes.string_at(t.datain.data, t.datain.size) if t.datain.size > 0 else b""
        sense = None
        if t.status == 0x02:
            sense = (t.sense.key, (t.sense.ascq >> 8) & 0xFF, t.sense.ascq & 0xFF)
        status = t.status
        self.lib.scsi_free_scsi_task(task)
        return status, datain, sense

    def close(self) -> None:
        self.lib.iscsi_logout_sync(self.ctx)
        self.lib.iscsi_destroy_context(self.ctx)
