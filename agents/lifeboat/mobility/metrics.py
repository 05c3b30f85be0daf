"""Prometheus metrics of the mobility agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RESYNC_REASONS = ("no_local_state", "geometry_changed", "server_behind", "map_damaged")


class MobilityMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.cycles = Counter("lifeboat_mobility_cycles_total", "Replication cycles, by result", ["result"], registry=r)
        self.cycle_seconds = Histogram("lifeboat_mobility_cycle_seconds", "Duration of a cycle (quiesce to last ack)",
                                       buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.read_bytes = Counter("lifeboat_mobility_read_bytes_total", "Bytes read from protected disks", ["disk"], registry=r)
        self.changed_bytes = Counter("lifeboat_mobility_changed_bytes_total", "Changed (non-zero) bytes sent", ["disk"], registry=r)
        self.sent_bytes = Counter("lifeboat_mobility_sent_bytes_total", "Batch bytes acknowledged by the process server", registry=r)
        self.resyncs = Counter("lifeboat_mobility_resyncs_total", "Full resyncs, by reason", ["reason"], registry=r)
        for reason in RESYNC_REASONS:
            self.resyncs.labels(reason)
        self.last_point = Gauge("lifeboat_mobility_last_point_timestamp_seconds", "Capture time of the newest point", registry=r)
        self.script_failures = Counter("lifeboat_mobility_script_failures_total", "Failed pre/post scripts", ["phase"], registry=r)
