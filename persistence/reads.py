"""Read queries of the HTTP API: unified rows, stats, rejections, run comparison.

Every statement is a named constant next to the function that runs it; the API's
handlers call these functions and never hold SQL themselves. JSON columns are
cast to text in SQL so the result does not depend on the pool's type codecs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    # Generic only in the stubs: these aliases exist for the type checker alone.
    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    Executor: TypeAlias = asyncpg.Pool[Any] | Connection

#: Upper bound of a read query; the API answers 503 rather than hang on a stuck database.
READ_TIMEOUT_SECONDS = 10.0

# -- health --------------------------------------------------------------------

LAST_RUN_STATUS = "SELECT status FROM etl_runs ORDER BY started_at DESC LIMIT 1"


async def ping(conn: Connection) -> str | None:
    """Round trip to the database; returns the newest run's status (``None``: no run yet)."""
    status: str | None = await conn.fetchval(LAST_RUN_STATUS)
    return status


# -- /data -----------------------------------------------------------------------


class UnifiedRow(msgspec.Struct, gc=False):
    """One row of ``unified_data`` as the API shows it (a Struct: a page builds
    hundreds, and msgspec encodes them directly)."""

    name: str
    value: float
    source: str
    observed_at: datetime
    ingested_at: datetime


@dataclass(frozen=True, slots=True)
class DataPage:
    total: int
    rows: list[UnifiedRow]


def _data_statement(*, source: bool, name: bool, after: bool) -> str:
    """The page query for one combination of filters.

    One statement per combination, rather than ``$1 IS NULL OR ...`` guards:
    a guarded predicate keeps PostgreSQL from starting the index scan at the
    cursor, and a cached generic plan would then read every earlier row.

    The exact total comes back in the same round trip, laterally joined to the
    page: from ``unified_counts`` (rows per winning source, kept exact by
    statement triggers in the same transactions that change ``unified_data``)
    unless a name is given, which is a primary-key lookup.
    """
    args: list[str] = []
    filters: list[str] = []
    if source:
        args.append("source")
        filters.append(f"source = ${len(args)}")
    if name:
        args.append("name")
        filters.append(f"name = ${len(args)}")
    if name:
        # A primary-key lookup: at most one row to count.
        total = f"SELECT count(*) AS total FROM unified_data WHERE {' AND '.join(filters)}"
    else:
        # Kept exact by statement triggers (migration 0002): no table scan per page.
        where = "WHERE source = $1" if source else ""
        total = f"SELECT coalesce(sum(rows), 0)::bigint AS total FROM unified_counts {where}"
    page_filters = list(filters)
    if after:
        args.append("after")
        page_filters.append(f"name > ${len(args)}")
    page_where = " AND ".join(page_filters) or "true"
    limit, offset = len(args) + 1, len(args) + 2
    return f"""
SELECT t.total, p.name, p.value, p.source, p.observed_at, p.ingested_at
FROM ({total}) AS t
LEFT JOIN LATERAL (
    SELECT name, value, source, observed_at, ingested_at
    FROM unified_data
    WHERE {page_where}
    ORDER BY name
    LIMIT ${limit} OFFSET ${offset}
) AS p ON true
ORDER BY p.name
"""


DATA_PAGE: dict[tuple[bool, bool, bool], str] = {
    (s, n, a): _data_statement(source=s, name=n, after=a)
    for s in (False, True)
    for n in (False, True)
    for a in (False, True)
}


async def data_page(
    db: Executor,
    *,
    source: str | None,
    name: str | None,
    after: str | None,
    limit: int,
    offset: int,
) -> DataPage:
    """Rows of ``unified_data`` ordered by name, and the exact filtered total.

    Args:
        source: keep rows won by this source.
        name: keep the row of this canonical name.
        after: keyset cursor: keep names strictly greater than this one.
        limit: page size (callers ask one more than they show to detect the last page).
        offset: rows to skip after the cursor.
    """
    statement = DATA_PAGE[(source is not None, name is not None, after is not None)]
    args: list[object] = [v for v in (source, name, after) if v is not None]
    records = await db.fetch(statement, *args, limit, offset, timeout=READ_TIMEOUT_SECONDS)
    total = int(records[0]["total"]) if records else 0
    rows = [UnifiedRow(r[1], r[2], r[3], r[4], r[5]) for r in records if r[1] is not None]
    return DataPage(total, rows)


# -- /stats ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceStats:
    last_success_at: datetime | None
    last_failure_at: datetime | None
    raw_records: int
    checkpoint: dict[str, Any] | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Stats:
    last_run_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_status: str | None
    last_duration_seconds: float | None
    runs_total: int
    records_processed_total: int
    unified_records: int
    sources: dict[str, SourceStats]


STATS_TOTALS = """
SELECT
    (SELECT count(*) FROM etl_runs) AS runs_total,
    (SELECT coalesce(sum(fetched), 0) FROM etl_run_sources) AS records_processed_total,
    (SELECT coalesce(sum(rows), 0)::bigint FROM unified_counts) AS unified_records,
    (SELECT max(finished_at) FROM etl_runs WHERE status = 'success') AS last_success_at,
    (SELECT max(finished_at) FROM etl_runs WHERE status = 'failed') AS last_failure_at,
    last.status AS last_status,
    last.started_at AS last_run_at,
    (SELECT extract(epoch FROM f.finished_at - f.started_at)::float8
     FROM etl_runs f WHERE f.finished_at IS NOT NULL
     ORDER BY f.started_at DESC LIMIT 1) AS last_duration_seconds
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT status, started_at FROM etl_runs ORDER BY started_at DESC LIMIT 1
) AS last ON true
"""

# Each sub-select walks the (source, finished_at) index backwards, so the cost does
# not grow with the number of past runs. Raw rows are never deleted and every one
# was counted in ``raw_inserted`` by the statement that stored it, so their sum is
# the exact raw count without reading the raw tables.
STATS_SOURCES = """
SELECT n.source,
    (SELECT s.finished_at FROM etl_run_sources s
     WHERE s.source = n.source AND s.status = 'success' AND s.finished_at IS NOT NULL
     ORDER BY s.finished_at DESC LIMIT 1) AS last_success_at,
    (SELECT s.finished_at FROM etl_run_sources s
     WHERE s.source = n.source AND s.status = 'failed' AND s.finished_at IS NOT NULL
     ORDER BY s.finished_at DESC LIMIT 1) AS last_failure_at,
    (SELECT s.error FROM etl_run_sources s
     WHERE s.source = n.source AND s.status = 'failed' AND s.finished_at IS NOT NULL
     ORDER BY s.finished_at DESC LIMIT 1) AS last_error,
    (SELECT coalesce(sum(s.raw_inserted), 0) FROM etl_run_sources s
     WHERE s.source = n.source)::bigint AS raw_records,
    (SELECT c.cursor::text FROM etl_checkpoint c WHERE c.source = n.source) AS checkpoint
FROM (
    SELECT d.source, d.position FROM unnest($1::text[]) WITH ORDINALITY AS d(source, position)
    UNION ALL
    SELECT c.source, NULL FROM etl_checkpoint c WHERE c.source <> ALL($1::text[])
) AS n
ORDER BY n.position NULLS LAST, n.source
"""


def _object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = msgspec.json.decode(text)
    return value if isinstance(value, dict) else {"value": value}


async def stats(conn: Connection, declared: Sequence[str]) -> Stats:
    """Run totals and per-source state; every declared source appears, data or not.

    Sources that are no longer declared but still have a checkpoint are listed
    after the declared ones.
    """
    totals = await conn.fetchrow(STATS_TOTALS, timeout=READ_TIMEOUT_SECONDS)
    assert totals is not None  # the statement always returns one row
    per_source = await conn.fetch(STATS_SOURCES, list(declared), timeout=READ_TIMEOUT_SECONDS)
    return Stats(
        last_run_at=totals["last_run_at"],
        last_success_at=totals["last_success_at"],
        last_failure_at=totals["last_failure_at"],
        last_status=totals["last_status"],
        last_duration_seconds=totals["last_duration_seconds"],
        runs_total=int(totals["runs_total"]),
        records_processed_total=int(totals["records_processed_total"]),
        unified_records=int(totals["unified_records"]),
        sources={
            r["source"]: SourceStats(
                last_success_at=r["last_success_at"],
                last_failure_at=r["last_failure_at"],
                raw_records=int(r["raw_records"]),
                checkpoint=_object(r["checkpoint"]),
                last_error=r["last_error"],
            )
            for r in per_source
        },
    )


# -- /rejections --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RejectionRow:
    id: int
    run_id: uuid.UUID
    source: str
    raw_table: str
    raw_id: int
    field: str
    reason: str
    payload: Any
    created_at: datetime


# The raw table is named by a column; joining each known table on it keeps the
# statement fixed (no identifier ever comes from data).
LIST_REJECTIONS = """
SELECT j.id, j.run_id, j.source, j.raw_table, j.raw_id, j.field, j.reason, j.created_at,
    coalesce(a.payload, c.payload, t.payload)::text AS payload
FROM etl_rejections j
LEFT JOIN raw_api_data a ON j.raw_table = 'raw_api_data' AND a.id = j.raw_id
LEFT JOIN raw_csv_data c ON j.raw_table = 'raw_csv_data' AND c.id = j.raw_id
LEFT JOIN raw_third_source_data t ON j.raw_table = 'raw_third_source_data' AND t.id = j.raw_id
WHERE ($1::uuid IS NULL OR j.run_id = $1)
  AND ($2::text IS NULL OR j.source = $2)
  AND j.id > $3
ORDER BY j.id
LIMIT $4
"""


async def list_rejections(
    db: Executor,
    *,
    run_id: uuid.UUID | None,
    source: str | None,
    after_id: int,
    limit: int,
) -> list[RejectionRow]:
    """Rejections in id order, each with the raw record it points at."""
    records = await db.fetch(
        LIST_REJECTIONS, run_id, source, after_id, limit, timeout=READ_TIMEOUT_SECONDS
    )
    return [
        RejectionRow(
            id=r["id"],
            run_id=r["run_id"],
            source=r["source"],
            raw_table=r["raw_table"],
            raw_id=r["raw_id"],
            field=r["field"],
            reason=r["reason"],
            payload=None if r["payload"] is None else msgspec.json.decode(r["payload"]),
            created_at=r["created_at"],
        )
        for r in records
    ]


# -- /compare-runs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRun:
    status: str
    fetched: int
    raw_inserted: int
    duplicates: int
    rejected: int
    unified_upserted: int
    error: str | None
    drift: list[dict[str, Any]]
    duration_seconds: float | None


@dataclass(frozen=True, slots=True)
class RunDetail:
    id: uuid.UUID
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_seconds: float | None
    sources: dict[str, SourceRun]


RUN_DETAIL = """
SELECT r.id, r.trigger, r.status, r.started_at, r.finished_at,
    extract(epoch FROM r.finished_at - r.started_at)::float8 AS duration_seconds,
    s.source, s.status AS source_status, s.fetched, s.raw_inserted, s.duplicates,
    s.rejected, s.unified_upserted, s.error, s.drift::text AS drift,
    extract(epoch FROM s.finished_at - s.started_at)::float8 AS source_duration_seconds
FROM etl_runs r
LEFT JOIN etl_run_sources s ON s.run_id = r.id
WHERE r.id = $1
ORDER BY s.position, s.source
"""


async def run_detail(db: Executor, run_id: uuid.UUID) -> RunDetail | None:
    """A run with per-source counters and durations, or ``None`` when unknown."""
    records = await db.fetch(RUN_DETAIL, run_id, timeout=READ_TIMEOUT_SECONDS)
    if not records:
        return None
    head = records[0]
    sources: dict[str, SourceRun] = {}
    for r in records:
        if r["source"] is None:
            continue
        drift = msgspec.json.decode(r["drift"]) if r["drift"] is not None else []
        sources[r["source"]] = SourceRun(
            status=r["source_status"],
            fetched=int(r["fetched"]),
            raw_inserted=int(r["raw_inserted"]),
            duplicates=int(r["duplicates"]),
            rejected=int(r["rejected"]),
            unified_upserted=int(r["unified_upserted"]),
            error=r["error"],
            drift=drift if isinstance(drift, list) else [],
            duration_seconds=r["source_duration_seconds"],
        )
    return RunDetail(
        id=head["id"],
        trigger=head["trigger"],
        status=head["status"],
        started_at=head["started_at"],
        finished_at=head["finished_at"],
        duration_seconds=head["duration_seconds"],
        sources=sources,
    )


MEDIAN_DURATION_BEFORE = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d.seconds), count(*)
FROM (
    SELECT extract(epoch FROM finished_at - started_at)::float8 AS seconds
    FROM etl_runs
    WHERE finished_at IS NOT NULL AND started_at < $1
    ORDER BY started_at DESC
    LIMIT $2
) AS d
"""


async def median_duration_before(
    db: Executor, started_at: datetime, runs: int = 10
) -> tuple[float | None, int]:
    """Median duration of the last ``runs`` finished runs started before ``started_at``.

    Returns:
        The median (``None`` when there is no such run) and how many runs it covers.
    """
    record = await db.fetchrow(
        MEDIAN_DURATION_BEFORE, started_at, runs, timeout=READ_TIMEOUT_SECONDS
    )
    assert record is not None  # an aggregate always returns one row
    median: float | None = record[0]
    return median, int(record[1])
