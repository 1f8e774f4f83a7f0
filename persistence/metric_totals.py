"""The figures the etl_* metrics show, read from the totals tables (migration 0005).

The triggers of migration 0005 keep the totals in the transactions that write
the runs, so every replica reads the same figures. One statement reads them
all: a few dozen rows, whatever the number of runs (the in-progress count uses
the index on ``etl_runs.status`` and sees only the runs still open).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from persistence.types import Queryable


@dataclass(frozen=True, slots=True)
class SourceTotals:
    failures: int = 0
    records: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    """fetched, raw_inserted, duplicates, rejected, unified_upserted."""
    last_success_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EtlTotals:
    """What the database says about every run so far."""

    runs: dict[str, int] = field(default_factory=dict)
    """Finished runs per final status."""
    duration_seconds: float = 0.0
    """Sum of the durations of every finished run."""
    buckets: list[tuple[float, int]] = field(default_factory=list)
    """(upper bound, runs in it), ascending, not cumulative; the last bound is +Inf."""
    sources: dict[str, SourceTotals] = field(default_factory=dict)
    drift: dict[tuple[str, str], int] = field(default_factory=dict)
    """Events per (source, kind)."""
    unified_rows: int = 0
    runs_in_progress: int = 0


_READ = """
SELECT 'run' AS kind, status AS a, NULL AS b, ARRAY[runs] AS n, duration_seconds AS x,
    NULL::timestamptz AS t
FROM etl_metric_runs
UNION ALL
SELECT 'bucket', NULL, NULL, ARRAY[runs], le, NULL FROM etl_metric_durations
UNION ALL
SELECT 'source', source, NULL,
    ARRAY[failures, fetched, raw_inserted, duplicates, rejected, unified_upserted], NULL,
    last_success_at
FROM etl_metric_sources
UNION ALL
SELECT 'drift', source, kind, ARRAY[events], NULL, NULL FROM etl_metric_drift
UNION ALL
SELECT 'unified', NULL, NULL, ARRAY[coalesce(sum(rows), 0)::bigint], NULL, NULL
FROM unified_counts
UNION ALL
SELECT 'running', NULL, NULL, ARRAY[count(*)], NULL, NULL FROM etl_runs WHERE status = 'running'
"""


async def read_totals(conn: Queryable) -> EtlTotals:
    """Every figure the etl_* metrics show, from one statement (one snapshot)."""
    runs: dict[str, int] = {}
    duration = 0.0
    buckets: list[tuple[float, int]] = []
    sources: dict[str, SourceTotals] = {}
    drift: dict[tuple[str, str], int] = {}
    unified = running = 0
    for row in await conn.fetch(_READ):
        kind, counts = row["kind"], [int(c) for c in row["n"]]
        if kind == "run":
            runs[row["a"]] = counts[0]
            duration += float(row["x"])
        elif kind == "bucket":
            buckets.append((float(row["x"]), counts[0]))
        elif kind == "source":
            fetched, inserted, duplicates, rejected, upserted = counts[1:]
            records = (fetched, inserted, duplicates, rejected, upserted)
            sources[row["a"]] = SourceTotals(counts[0], records, row["t"])
        elif kind == "drift":
            drift[row["a"], row["b"]] = counts[0]
        elif kind == "unified":
            unified = counts[0]
        else:
            running = counts[0]
    return EtlTotals(runs, duration, sorted(buckets), sources, drift, unified, running)
