"""Prometheus metrics of the process server (one registry per instance, so tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REJECTION_REASONS = ("unauthenticated", "bad_request", "too_large", "malformed", "truncated",
                     "out_of_order", "busy", "cache_full", "repository_unavailable", "internal",
                     "forbidden", "auth_unavailable", "timeout", "replay_mismatch")


class ProcessServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.batches = Counter("lifeboat_ps_batches_total", "Batches answered, by result", ["result"], registry=r)
        self.rejections = Counter("lifeboat_ps_rejections_total", "Requests rejected, by reason", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.received_bytes = Counter("lifeboat_ps_received_bytes_total", "Batch body bytes stored in the cache", registry=r)
        self.cache_used = Gauge("lifeboat_ps_cache_used_bytes", "Bytes of complete batches in the cache", registry=r)
        self.cache_capacity = Gauge("lifeboat_ps_cache_capacity_bytes", "Cache capacity", registry=r)
        self.cache_free_ratio = Gauge("lifeboat_ps_cache_free_ratio", "Free fraction of the cache", registry=r)
        self.backlog = Gauge("lifeboat_ps_backlog_bytes", "Cached bytes not yet uploaded, per disk", ["disk"], registry=r)
        self.upload_source_bytes = Counter("lifeboat_ps_upload_source_bytes_total", "Plaintext frame bytes uploaded", registry=r)
        self.upload_stored_bytes = Counter("lifeboat_ps_upload_stored_bytes_total", "Segment bytes written to the repository", registry=r)
        self.compression_ratio = Gauge("lifeboat_ps_compression_ratio", "Plaintext / stored bytes of the last segment", registry=r)
        self.upload_seconds = Histogram("lifeboat_ps_upload_seconds", "Time to encode and store one segment",
                                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.upload_errors = Counter("lifeboat_ps_upload_errors_total", "Failed segment uploads, by kind", ["kind"], registry=r)
        self.points = Counter("lifeboat_ps_points_published_total", "Recovery points published to the catalog", registry=r)
        self.last_point = Gauge("lifeboat_ps_last_point_timestamp_seconds",
                                "Capture time of the newest recovery point published, per disk (RPO = now - this)",
                                ["disk"], registry=r)
        self.uploaded_seq = Gauge("lifeboat_ps_uploaded_seq", "Highest uploaded sequence number, per disk", ["disk"], registry=r)
        self.forwarded_bytes = Counter("lifeboat_ps_forwarded_bytes_total",
                                       "Batch body bytes forwarded to a master target (failback)", registry=r)
        self.forward_dropped = Counter("lifeboat_ps_forward_dropped_batches_total",
                                       "Cached batches dropped because the master target went back past them "
                                       "(failback cancel or rollback)", registry=r)
