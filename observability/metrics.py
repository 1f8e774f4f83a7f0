"""Prometheus metrics of contract section 3.

Labels only ever carry bounded values: source names from the sources file,
stages, statuses, drift kinds, HTTP methods and route templates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """All metrics, on a registry of their own so tests and apps do not collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.runs = Counter("etl_runs", "ETL runs finished, by status.", ["status"], registry=r)
        self.failures = Counter(
            "etl_failures", "Sources that failed in a run.", ["source"], registry=r
        )
        self.records = Counter(
            "etl_records", "Records per source and stage.", ["source", "stage"], registry=r
        )
        self.duration = Histogram(
            "etl_duration_seconds", "Duration of ETL runs.", buckets=_RUN_BUCKETS, registry=r
        )
        self.last_success = Gauge(
            "etl_last_success_timestamp_seconds",
            "Unix time of the last successful run of each source.",
            ["source"],
            registry=r,
        )
        self.drift = Counter(
            "etl_schema_drift", "Schema drift events.", ["source", "kind"], registry=r
        )
        self.running = Gauge("etl_run_in_progress", "1 while a run is in progress.", registry=r)
        self.loop_crashes = Counter(
            "etl_loop_crashes", "Unexpected errors of the ingestion loop.", registry=r
        )
        self.unified_rows = Gauge(
            "etl_unified_records", "Rows in unified_data after the last run.", registry=r
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests served, by route template.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )

    def observe_run(self, run: Mapping[str, Any], unified_rows: int | None = None) -> None:
        """Count one finished run from its run object (contract section 3).

        The same figures whether the run happened in this process or in a child
        process that handed its run object back.
        """
        self.runs.labels(status=str(run["status"])).inc()
        self.duration.observe(float(run.get("duration_seconds") or 0.0))
        now = time.time()
        for name, source in (run.get("sources") or {}).items():
            for stage, key in _STAGES:
                self.records.labels(source=name, stage=stage).inc(int(source.get(key) or 0))
            for event in source.get("drift") or ():
                self.drift.labels(source=name, kind=str(event.get("kind"))).inc()
            if source.get("status") == "failed":
                self.failures.labels(source=name).inc()
            else:
                self.last_success.labels(source=name).set(now)
        if unified_rows is not None:
            self.unified_rows.set(unified_rows)


_STAGES = (
    ("fetched", "fetched"),
    ("raw_inserted", "raw_inserted"),
    ("duplicate", "duplicates"),
    ("rejected", "rejected"),
    ("unified_upserted", "unified_upserted"),
)
