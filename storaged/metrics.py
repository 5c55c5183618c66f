"""Prometheus metrics: sessions, per-LUN operations, bytes, latency, errors.

The per-command path only bumps plain integers in a LunMeter (no locks, no
label look-ups); a custom collector turns them into Prometheus families at
scrape time.  prometheus-client's own Counter/Histogram take a lock per
update, which costs more than the rest of a 4 KiB read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

REGISTRY = CollectorRegistry()

BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
           100e-3, 250e-3, 1.0)
CLASSES = ("read", "write", "other")

_READS = frozenset({0x08, 0x28, 0xA8, 0x88})
_WRITES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E})


def op_class(opcode: int) -> int:
    """Index into CLASSES for a SCSI opcode."""
    if opcode in _READS:
        return 0
    if opcode in _WRITES:
        return 1
    return 2


class LunMeter:
    """Counters of one LUN of one target."""

    __slots__ = ("target", "lun", "ops", "lat_buckets", "lat_sum", "bytes_read",
                 "bytes_written", "errors")

    def __init__(self, target: str, lun: int) -> None:
        self.target = target
        self.lun = str(lun)
        self.ops = [0, 0, 0]
        self.lat_buckets = [[0] * (len(BUCKETS) + 1) for _ in CLASSES]
        self.lat_sum = [0.0, 0.0, 0.0]
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors: dict[int, int] = {}

    def record(self, opcode: int, seconds: float, nread: int, nwritten: int,
               status: int) -> None:
        c = op_class(opcode)
        self.ops[c] += 1
        self.lat_buckets[c][bisect_left(BUCKETS, seconds)] += 1
        self.lat_sum[c] += seconds
        self.bytes_read += nread
        self.bytes_written += nwritten
        if status:
            self.errors[status] = self.errors.get(status, 0) + 1


class StoragedCollector:
    """Builds the metric families from live daemon state at scrape time."""

    def __init__(self, meters: Callable[[], list[LunMeter]],
                 sessions: Callable[[], dict[str, int]]) -> None:
        self.meters = meters
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        s = GaugeMetricFamily("storaged_iscsi_sessions", "Logged-in iSCSI sessions",
                              labels=["target"])
        for target, n in sorted(self.sessions().items()):
            s.add_metric([target], n)
        yield s
        ops = CounterMetricFamily("storaged_scsi_commands", "SCSI commands completed",
                                  labels=["target", "lun", "op"])
        nbytes = CounterMetricFamily("storaged_scsi_bytes", "Bytes moved by SCSI commands",
                                     labels=["target", "lun", "direction"])
        errs = CounterMetricFamily("storaged_scsi_errors",
                                   "SCSI commands that ended in an error status",
                                   labels=["target", "lun", "status"])
        lat = HistogramMetricFamily("storaged_scsi_command_seconds",
                                    "SCSI command service time",
                                    labels=["target", "lun", "op"])
        for m in self.meters():
            for i, c in enumerate(CLASSES):
                ops.add_metric([m.target, m.lun, c], m.ops[i])
                cumulative = 0
                buckets = []
                for bound, n in zip(BUCKETS + (float("inf"),), m.lat_buckets[i], strict=True):
                    cumulative += n
                    buckets.append((repr(bound) if bound != float("inf") else "+Inf",
                                    cumulative))
                lat.add_metric([m.target, m.lun, c], buckets, m.lat_sum[i])
            nbytes.add_metric([m.target, m.lun, "read"], m.bytes_read)
            nbytes.add_metric([m.target, m.lun, "write"], m.bytes_written)
            for status, n in sorted(m.errors.items()):
                errs.add_metric([m.target, m.lun, f"0x{status:02x}"], n)
        yield ops
        yield nbytes
        yield errs
        yield lat


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics on host:port in a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)


class ClusterCollector:
    """Cluster gauges: each node's kernel clock state and measured offset to this node."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        try:
            st = self.status()
        except RuntimeError:   # a dict changed under the scrape thread: next scrape
            return
        synced = GaugeMetricFamily("storaged_cluster_clock_synced",
                                   "1 if the node's kernel clock is synchronized (adjtimex)",
                                   labels=["node"])
        maxerr = GaugeMetricFamily("storaged_cluster_clock_maxerror_seconds",
                                   "The node's kernel clock maxerror (adjtimex)",
                                   labels=["node"])
        for node, c in st.get("clock", {}).items():
            synced.add_metric([node], 1.0 if c["synced"] else 0.0)
            maxerr.add_metric([node], c["maxerror_ms"] / 1000)
        skew = GaugeMetricFamily("storaged_cluster_clock_offset_seconds",
                                 "Measured clock offset of a peer node (peer minus this node)",
                                 labels=["node"])
        for node, ms in st.get("skew_ms", {}).items():
            skew.add_metric([node], ms / 1000)
        yield synced
        yield maxerr
        yield skew
