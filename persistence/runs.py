"""Run records: open, close, close the interrupted, and read them back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from persistence.types import Conn, Queryable

RUN_STATUSES = ("running", "success", "partial", "failed")


def iso(ts: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` suffix, or ``None``."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def run_lock_key(run_id: uuid.UUID) -> int:
    """The advisory-lock key a live run holds; free once its process is gone."""
    return int.from_bytes(run_id.bytes[:8], "big", signed=True)


def source_lock_key(source: str) -> int:
    """The advisory-lock key of one source's ingestion, shared by all replicas."""
    import hashlib

    digest = hashlib.blake2b(f"kasparro:source:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_INSERT_RUN = """
INSERT INTO etl_runs (id, trigger, status, started_at) VALUES ($1, $2, 'running', $3)
"""
_INSERT_RUN_SOURCE = """
INSERT INTO etl_run_sources (run_id, source, position, status, started_at)
SELECT $1, s.source, s.position, 'running', $3
FROM unnest($2::text[]) WITH ORDINALITY AS s(source, position)
"""


async def open_run(conn: Conn, run_id: uuid.UUID, trigger: str, sources: Sequence[str]) -> datetime:
    started = datetime.now(UTC)
    async with conn.transaction():
        await conn.execute(_INSERT_RUN, run_id, trigger, started)
        await conn.execute(_INSERT_RUN_SOURCE, run_id, list(sources), started)
    return started


_FINISH_SOURCE = """
UPDATE etl_run_sources SET status = $3, error = $4, drift = $5::jsonb, finished_at = now()
WHERE run_id = $1 AND source = $2
"""


async def finish_source(
    conn: Conn,
    run_id: uuid.UUID,
    source: str,
    status: str,
    error: str | None,
    drift: list[dict[str, Any]],
) -> None:
    await conn.execute(
        _FINISH_SOURCE, run_id, source, status, error, msgspec.json.encode(drift).decode()
    )


_FINISH_RUN = """
UPDATE etl_runs SET status = $2, finished_at = $3, error = $4 WHERE id = $1
"""


async def finish_run(
    conn: Conn, run_id: uuid.UUID, status: str, error: str | None = None
) -> datetime:
    finished = datetime.now(UTC)
    await conn.execute(_FINISH_RUN, run_id, status, finished, error)
    return finished


_RUNNING = "SELECT id FROM etl_runs WHERE status = 'running'"
_CLOSE_INTERRUPTED = """
WITH closed AS (
    UPDATE etl_runs SET status = 'failed', error = 'interrupted',
        finished_at = coalesce(finished_at, now())
    WHERE id = $1 AND status = 'running' RETURNING id
)
UPDATE etl_run_sources SET status = 'failed', error = coalesce(error, 'interrupted'),
    finished_at = coalesce(finished_at, now())
WHERE run_id IN (SELECT id FROM closed) AND status = 'running'
"""


async def close_interrupted_runs(conn: Conn) -> list[uuid.UUID]:
    """Close runs left ``running`` by a process that is gone.

    A live run holds its advisory lock; when we can take it, the owner died.
    Runs of other live replicas are left alone.
    """
    closed: list[uuid.UUID] = []
    for row in await conn.fetch(_RUNNING):
        run_id: uuid.UUID = row["id"]
        key = run_lock_key(run_id)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            try:
                await conn.execute(_CLOSE_INTERRUPTED, run_id)
                closed.append(run_id)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
    return closed


_RUN_COLUMNS = """
r.id, r.trigger, r.status, r.started_at, r.finished_at, r.error,
coalesce((
    SELECT jsonb_agg(jsonb_build_object(
        'source', s.source, 'status', s.status, 'fetched', s.fetched,
        'raw_inserted', s.raw_inserted, 'duplicates', s.duplicates, 'rejected', s.rejected,
        'unified_upserted', s.unified_upserted, 'error', s.error, 'drift', s.drift,
        'started_at', s.started_at, 'finished_at', s.finished_at) ORDER BY s.position)
    FROM etl_run_sources s WHERE s.run_id = r.id), '[]'::jsonb)::text AS sources
"""
_GET_RUN = f"SELECT {_RUN_COLUMNS} FROM etl_runs r WHERE r.id = $1"
_LIST_RUNS = f"SELECT {_RUN_COLUMNS} FROM etl_runs r ORDER BY r.started_at DESC, r.id LIMIT $1"


def _run_object(row: asyncpg.Record) -> dict[str, Any]:
    started: datetime = row["started_at"]
    finished: datetime | None = row["finished_at"]
    end = finished or datetime.now(UTC)
    sources: dict[str, Any] = {}
    for item in msgspec.json.decode(row["sources"]):
        name = item.pop("source")
        item.pop("started_at", None)
        item.pop("finished_at", None)
        sources[name] = item
    return {
        "id": str(row["id"]),
        "trigger": row["trigger"],
        "status": row["status"],
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_seconds": round((end - started).total_seconds(), 3),
        "error": row["error"],
        "sources": sources,
    }


async def get_run(conn: Queryable, run_id: uuid.UUID) -> dict[str, Any] | None:
    """The run object of contract section 3, or ``None``."""
    row = await conn.fetchrow(_GET_RUN, run_id)
    return None if row is None else _run_object(row)


async def list_runs(conn: Queryable, limit: int) -> list[dict[str, Any]]:
    """Newest first."""
    return [_run_object(row) for row in await conn.fetch(_LIST_RUNS, limit)]


async def unified_total(conn: Queryable) -> int:
    """Rows in ``unified_data``, from the counts its triggers keep (no table scan)."""
    total = await conn.fetchval("SELECT coalesce(sum(rows), 0)::bigint FROM unified_counts")
    return int(total)
