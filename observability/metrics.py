"""Prometheus metrics.

Two kinds, served together on ``/metrics``:

- the ``etl_*`` figures describe the data, not the process: they are read from
  the database at each scrape (:class:`EtlCollector` over the totals that
  migration 0005 keeps), so every replica reports the same values, runs made by
  ``kasparro etl run`` count as much as the service's own, and a restart loses
  nothing. Every known label value is exported from the first scrape, at 0
  where nothing happened yet, so ``rate()`` and alerts see the first event.
  ``etl_metrics_db_up`` says whether the database answered that scrape;
- what this process does (HTTP requests, crashes of its ingestion loop) lives
  in :class:`Metrics`, a registry of the process.

Labels only ever carry bounded values: source names from the sources file,
stages, statuses, drift kinds, HTTP methods and route templates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from persistence.metric_totals import EtlTotals

_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

#: Final run statuses, as ``etl_runs_total{status}`` exports them.
RUN_STATUSES = ("success", "partial", "failed")
#: ``etl_records_total{stage}``, in the order of :attr:`SourceTotals.records`.
STAGES = ("fetched", "raw_inserted", "duplicate", "rejected", "unified_upserted")


class Metrics:
    """The process's own metrics, on a registry of their own (tests and apps do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.loop_crashes = Counter(
            "kasparro_loop_crashes",
            "Unexpected errors of this process's ingestion loop.",
            registry=r,
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


class EtlCollector(Collector):
    """The ``etl_*`` families of one scrape, from the totals read for it.

    Args:
        totals: what the database said; ``None`` when it could not be read (only
            ``etl_metrics_db_up 0`` is exported then).
        sources: the declared source names.
        drift_kinds: every kind of schema drift event.
    """

    def __init__(
        self, totals: EtlTotals | None, sources: Sequence[str], drift_kinds: Sequence[str]
    ) -> None:
        self.totals = totals
        self.sources = list(sources)
        self.drift_kinds = list(drift_kinds)

    def collect(self) -> Iterator[Metric]:
        totals = self.totals
        yield GaugeMetricFamily(
            "etl_metrics_db_up",
            "1 when this scrape read the etl_* figures from the database, else 0.",
            value=0 if totals is None else 1,
        )
        if totals is None:
            return
        runs = CounterMetricFamily("etl_runs", "ETL runs finished, by status.", labels=["status"])
        for status in RUN_STATUSES:
            runs.add_metric([status], totals.runs.get(status, 0))
        yield runs

        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in totals.buckets:
            cumulative += count
            buckets.append((_le(bound), cumulative))
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(
            "etl_duration_seconds",
            "Duration of ETL runs, one observation per finished run.",
            buckets=buckets,
            sum_value=totals.duration_seconds,
        )

        failures = CounterMetricFamily(
            "etl_failures", "Sources that failed in a run.", labels=["source"]
        )
        records = CounterMetricFamily(
            "etl_records", "Records per source and stage.", labels=["source", "stage"]
        )
        last_success = GaugeMetricFamily(
            "etl_last_success_timestamp_seconds",
            "Unix time at which the last run in which the source succeeded finished (0: never).",
            labels=["source"],
        )
        drift = CounterMetricFamily(
            "etl_schema_drift", "Schema drift events.", labels=["source", "kind"]
        )
        for name in self.sources:
            source = totals.sources.get(name)
            failures.add_metric([name], source.failures if source else 0)
            for stage, count in zip(STAGES, source.records if source else (0,) * 5, strict=True):
                records.add_metric([name, stage], count)
            when = source.last_success_at if source else None
            last_success.add_metric([name], when.timestamp() if when else 0.0)
            kinds = [*self.drift_kinds]
            kinds += sorted({k for s, k in totals.drift if s == name} - set(kinds))
            for kind in kinds:
                drift.add_metric([name, kind], totals.drift.get((name, kind), 0))
        yield failures
        yield records
        yield last_success
        yield drift
        yield GaugeMetricFamily(
            "etl_unified_records", "Rows in unified_data.", value=totals.unified_rows
        )
        yield GaugeMetricFamily(
            "etl_run_in_progress",
            "Runs recorded as in progress (by any replica or command).",
            value=totals.runs_in_progress,
        )


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client spells it: ``0.25``, ``10.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def exposition(
    metrics: Metrics,
    totals: EtlTotals | None,
    sources: Sequence[str],
    drift_kinds: Sequence[str],
) -> bytes:
    """The text exposition of one scrape: the process's metrics, then the ``etl_*`` ones."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(EtlCollector(totals, sources, drift_kinds))
    return generate_latest(metrics.registry) + generate_latest(scrape)
