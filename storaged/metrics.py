"""Prometheus metrics: sessions, per-LUN operations, bytes, latency, errors.

Label children are cached per (target, lun, class) so the per-command cost
is two dict look-ups and a few additions.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

SESSIONS = Gauge("storaged_iscsi_sessions", "Logged-in iSCSI sessions", ["target"],
                 registry=REGISTRY)
CONNECTIONS = Gauge("storaged_iscsi_connections", "Open iSCSI TCP connections",
                    registry=REGISTRY)
OPS = Counter("storaged_scsi_commands_total", "SCSI commands completed",
              ["target", "lun", "op"], registry=REGISTRY)
BYTES = Counter("storaged_scsi_bytes_total", "Bytes moved by SCSI commands",
                ["target", "lun", "direction"], registry=REGISTRY)
LATENCY = Histogram("storaged_scsi_command_seconds", "SCSI command service time",
                    ["target", "lun", "op"], registry=REGISTRY,
                    buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
                             10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0))
ERRORS = Counter("storaged_scsi_errors_total", "SCSI commands that ended in an error status",
                 ["target", "lun", "status"], registry=REGISTRY)

_READS = frozenset({0x08, 0x28, 0xA8, 0x88})
_WRITES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E})


def op_class(opcode: int) -> str:
    if opcode in _READS:
        return "read"
    if opcode in _WRITES:
        return "write"
    return "other"


class LunMeter:
    """Cached metric children for one LUN."""

    __slots__ = ("ops", "lat", "rbytes", "wbytes", "target", "lun")

    def __init__(self, target: str, lun: int) -> None:
        self.target = target
        self.lun = str(lun)
        self.ops = {c: OPS.labels(target, self.lun, c) for c in ("read", "write", "other")}
        self.lat = {c: LATENCY.labels(target, self.lun, c) for c in ("read", "write", "other")}
        self.rbytes = BYTES.labels(target, self.lun, "read")
        self.wbytes = BYTES.labels(target, self.lun, "write")

    def record(self, opcode: int, started: float, nread: int, nwritten: int,
               status: int) -> None:
        c = op_class(opcode)
        self.ops[c].inc()
        self.lat[c].observe(time.perf_counter() - started)
        if nread:
            self.rbytes.inc(nread)
        if nwritten:
            self.wbytes.inc(nwritten)
        if status:
            ERRORS.labels(self.target, self.lun, f"0x{status:02x}").inc()


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics on host:port in a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
