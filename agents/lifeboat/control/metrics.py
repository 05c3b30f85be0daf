"""Prometheus metrics of the configuration-server role (registered on the process server's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from .auth import REFUSAL_REASONS

JOB_RESULTS = ("succeeded", "failed")


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("lifeboat_control_requests_total", "Management API requests answered, by status class",
                                ["status"], registry=r)
        for status in ("2xx", "4xx", "5xx"):
            self.requests.labels(status)
        self.refusals = Counter("lifeboat_control_refusals_total",
                                "Management API calls refused for authentication or authorisation, by reason",
                                ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        self.schema_version = Gauge("lifeboat_control_schema_version", "Schema version of the control database",
                                    registry=r)
        # One series per protected machine (the inventory bounds the label; unprotect removes it).
        self.last_heartbeat = Gauge("lifeboat_control_machine_last_heartbeat_timestamp_seconds",
                                    "When the primary last received the machine's agent heartbeat (Unix time)",
                                    ["machine"], registry=r)
