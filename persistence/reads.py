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


@dataclass(frozen=True, slots=True)
class DataPage:
    total: int
    """Rows matching the filters (not only those after the cursor)."""
    items: str
    """The page's rows as one JSON array, rendered by the database (see ``ITEM_JSON``)."""
    last_name: str | None
    """Name of the page's last row; ``None`` for an empty page."""
    more: bool
    """Whether rows follow the page."""
    version: int
    """``unified_version`` in the snapshot the page was read from."""


#: Changes with every transaction that changes ``unified_data`` (migration 0003).
DATA_VERSION = "SELECT version FROM unified_version"


async def data_version(db: Executor) -> int:
    """The current version of ``unified_data``: a page read at another version may be stale."""
    version: int = await db.fetchval(DATA_VERSION, timeout=READ_TIMEOUT_SECONDS)
    return version


def _timestamp_json(column: str) -> str:
    # msgspec's form of an aware UTC datetime: microseconds only when non-zero, then Z.
    # to_char ignores the session's DateStyle and TimeZone.
    return (
        f"replace(to_char({column} AT TIME ZONE 'UTC', "
        f"""'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), '.000000Z', 'Z')"""
    )


#: One ``unified_data`` row as the JSON object ``/data`` shows, built in SQL so a
#: page reaches the API as one string, not decoded into Python objects only to be
#: encoded again (the larger part of a request's CPU otherwise).
#: The text is the one msgspec writes for the same row, except that floats keep
#: PostgreSQL's shortest exact form (``1e+16`` for msgspec's ``1e16``: the same
#: double; an integral value gets ``.0`` either way, so it still reads as a float).
#: ``float8`` prints its shortest exact text when ``extra_float_digits`` is positive,
#: which the statement that renders rows sets for itself (see ``SHORTEST_FLOATS``).
ITEM_JSON = f"""'{{"name":' || to_json(name)::text
    || ',"value":' || CASE WHEN value = trunc(value) AND abs(value) < 1e15
        THEN value::text || '.0' ELSE value::text END
    || ',"source":' || to_json(source)::text
    || ',"observed_at":"' || {_timestamp_json("observed_at")}
    || '","ingested_at":"' || {_timestamp_json("ingested_at")} || '"}}'"""


#: Joined first by a statement that renders floats, whose rows then reference it
#: (so it is evaluated before them): ``extra_float_digits`` for that statement's
#: transaction only, whatever the server's default, with no session state, which
#: behind a transaction pooler is not ours to set.
SHORTEST_FLOATS = "(SELECT set_config('extra_float_digits', '1', true) AS digits) AS floats"


def _data_statement(*, source: bool, name: bool, after: bool) -> str:
    """The page query for one combination of filters.

    One statement per combination, rather than ``$1 IS NULL OR ...`` guards:
    a guarded predicate keeps PostgreSQL from starting the index scan at the
    cursor, and a cached generic plan would then read every earlier row.

    It reads one row more than the page shows, to tell whether another page
    follows, and answers with one row: the exact total, the page as a JSON array,
    its last name, how many rows it read and the version of the data. The total comes from
    ``unified_counts`` (rows per winning source, kept exact by statement triggers
    in the same transactions that change ``unified_data``) unless a name is
    given, which is a primary-key lookup.
    """
    args: list[str] = []
    filters: list[str] = []
    if source:
        args.append("source")
        filters.append(f"source = ${len(args)}")
    if name:
        args.append("name")
        # The row of that name, and every row one of whose keys was seen under
        # it: a few primary-key lookups. The GIN index on unified_links.names_seen
        # holds only links seen under a name besides their row's (migration
        # 0009); the first branch finds the others.
        filters.append(
            f"name IN (SELECT ${len(args)}::text UNION SELECT l.name FROM unified_links l "
            f"WHERE l.names_seen @> ARRAY[${len(args)}::text]"
            ' AND l.names_seen <> ARRAY[l.name COLLATE "default"])'
        )
    if name:
        total = f"SELECT count(*) AS total FROM unified_data WHERE {' AND '.join(filters)}"
    else:
        # Kept exact by statement triggers (migration 0002): no table scan per page.
        where = "WHERE source = $1" if source else ""
        total = f"SELECT coalesce(sum(rows), 0)::bigint AS total FROM unified_counts {where}"
    page_filters = list(filters)
    if after:
        args.append("after")
        page_filters.append(f"name > ${len(args)}")
    page_filters.append("floats.digits IS NOT NULL")
    page_where = " AND ".join(page_filters)
    limit, offset = len(args) + 1, len(args) + 2
    return f"""
SELECT t.total, p.items, p.last_name, p.read, v.version
FROM ({total}) AS t
CROSS JOIN unified_version AS v
CROSS JOIN {SHORTEST_FLOATS}
CROSS JOIN LATERAL (
    SELECT
        '[' || coalesce(string_agg(s.item, ',' ORDER BY s.name) FILTER (WHERE s.k <= ${limit}), '')
            || ']' AS items,
        max(s.name) FILTER (WHERE s.k <= ${limit}) AS last_name,
        count(*) AS read
    FROM (
        SELECT name, row_number() OVER (ORDER BY name) AS k, {ITEM_JSON} AS item
        FROM (
            SELECT name, value, source, observed_at, ingested_at
            FROM unified_data
            WHERE {page_where}
            ORDER BY name
            LIMIT ${limit} + 1 OFFSET ${offset}
        ) AS page
    ) AS s
) AS p
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
    """Up to ``limit`` rows of ``unified_data`` ordered by name, and the exact filtered total.

    Args:
        source: keep rows won by this source.
        name: keep the row of this canonical name and the rows one of whose keys
            had this canonical name.
        after: keyset cursor: keep names strictly greater than this one.
        limit: page size.
        offset: rows to skip after the cursor.
    """
    statement = DATA_PAGE[(source is not None, name is not None, after is not None)]
    args: list[object] = [v for v in (source, name, after) if v is not None]
    found = await db.fetchrow(statement, *args, limit, offset, timeout=READ_TIMEOUT_SECONDS)
    assert found is not None  # an aggregate over the page: always one row
    total, items, last_name, read, version = found
    return DataPage(int(total), items, last_name, read > limit, version)


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
