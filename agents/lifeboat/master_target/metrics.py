"""Prometheus metrics of the master target (one registry per instance, so tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge


class MasterTargetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.up = Gauge("lifeboat_mt_up", "1 while the master target runs", registry=r)
        self.up.set(1)
