"""Prometheus metrics of the mobility agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RESYNC_REASONS = ("no_local_state", "geometry_changed", "server_behind", "map_damaged", "agent_restart",
                  "no_change_log", "unclean_stop", "ring_overrun", "bitmap_budget", "corrupt_record",
                  "corrupt_header", "io_error", "tracking_lost")
TIER_REASONS = ("spill_full", "extent_budget", "bitmap_budget", "unclean_stop", "geometry_changed", "corrupt_header",
                "corrupt_record", "io_error", "caught_up", "resync_done", "ring_overrun", "agent_restart",
                "no_change_log", "initial_copy", "other")
SNAPSHOT_PROVIDERS = ("reflink", "lvm", "freeze-copy", "none")


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
        self.freeze_seconds = Histogram("lifeboat_mobility_freeze_seconds",
                                        "Filesystem freeze window per cycle (first freeze to last thaw)",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.snapshots = Counter("lifeboat_mobility_snapshots_total", "Per-disk cycle snapshots, by provider",
                                 ["provider"], registry=r)
        for provider in SNAPSHOT_PROVIDERS:
            self.snapshots.labels(provider)
        self.tracker_unavailable = Counter("lifeboat_mobility_tracker_unavailable_total",
                                           "Times the tracepoint tracker could not start (digest used instead)",
                                           registry=r)
        self.tier = Gauge("lifeboat_mobility_tracking_tier",
                          "Change log tier per disk: 0 data kept, 1 extents only, 2 dirty bitmap, 3 resync required",
                          ["disk"], registry=r)
        self.tier_changes = Counter("lifeboat_mobility_tier_changes_total", "Change log tier changes, by new tier "
                                    "and reason", ["tier", "reason"], registry=r)
        self.script_failures = Counter("lifeboat_mobility_script_failures_total", "Failed pre/post scripts", ["phase"], registry=r)
