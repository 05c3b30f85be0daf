"""Prometheus metrics of the master target (one registry per instance, so tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REJECTION_REASONS = ("unauthenticated", "bad_request", "too_large", "malformed", "truncated", "out_of_order",
                     "busy", "journal_full", "unknown_disk", "wrong_size", "disk_exists", "internal")


class MasterTargetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.up = Gauge("lifeboat_mt_up", "1 while the master target runs", registry=r)
        self.up.set(1)
        self.batches = Counter("lifeboat_mt_batches_total", "Batches answered, by result", ["result"], registry=r)
        self.rejections = Counter("lifeboat_mt_rejections_total", "Requests rejected, by reason", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.received_bytes = Counter("lifeboat_mt_received_bytes_total", "Batch body bytes journaled", registry=r)
        self.applied_bytes = Counter("lifeboat_mt_applied_bytes_total", "Bytes written (data and zeros) to targets",
                                     registry=r)
        self.digest_bytes = Counter("lifeboat_mt_digest_bytes_total", "Block-digest bytes served for reprotect",
                                    registry=r)
        self.points = Counter("lifeboat_mt_points_total", "Failback recovery points applied", registry=r)
        self.acked_seq = Gauge("lifeboat_mt_acked_seq", "Highest journaled (acknowledged) sequence, per disk",
                               ["disk"], registry=r)
        self.applied_seq = Gauge("lifeboat_mt_applied_seq", "Highest sequence applied to the target, per disk",
                                 ["disk"], registry=r)
        self.lag = Gauge("lifeboat_mt_apply_lag_bytes", "Journaled bytes not yet applied, per disk", ["disk"], registry=r)
        self.last_point = Gauge("lifeboat_mt_last_point_timestamp_seconds",
                                "Capture time of the newest applied failback point, per disk (RPO = now - this)",
                                ["disk"], registry=r)
        self.apply_errors = Counter("lifeboat_mt_apply_errors_total", "Failed apply attempts (retried)", registry=r)
