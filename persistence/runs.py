"""Run records and the source leases that coordinate runs: open, renew, close, read back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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


def source_lock_key(source: str) -> int:
    """A transaction-scoped advisory-lock key per source (``etl reprocess`` holds them)."""
    import hashlib

    digest = hashlib.blake2b(f"kasparro:source:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class Opened:
    """What :func:`open_run` got: the sources the run holds, and the others'.

    Nothing was recorded when ``taken`` is empty.
    """

    taken: list[str]
    """Sources the run holds a lease on, in the order they were asked for."""
    busy: dict[str, uuid.UUID | None]
    """Every other source asked for, with the run that holds it (``None``: released
    since)."""


_INSERT_RUN = """
INSERT INTO etl_runs (id, trigger, status, started_at) VALUES ($1, $2, 'running', $3)
"""
_TAKE_LEASES = """
INSERT INTO etl_leases (source, run_id, owner, expires_at)
SELECT s, $2, $3, now() + make_interval(secs => $4) FROM unnest($1::text[]) AS s
ON CONFLICT (source) DO NOTHING
RETURNING source
"""
_INSERT_RUN_SOURCE = """
INSERT INTO etl_run_sources (run_id, source, position, status, started_at)
SELECT $1, s.source, s.position, 'running', $3
FROM unnest($2::text[]) WITH ORDINALITY AS s(source, position)
"""
_HOLDERS = "SELECT source, run_id FROM etl_leases WHERE source = ANY($1::text[])"


async def open_run(
    conn: Conn,
    run_id: uuid.UUID,
    trigger: str,
    sources: Sequence[str],
    *,
    owner: str,
    lease_seconds: float,
) -> Opened:
    """Take the lease of every free source and record the run with them, in one
    transaction; when no source is free, nothing is recorded at all.

    A lease still in force is never taken over, expired or not: only
    :func:`close_interrupted_runs` frees one, together with the run source it
    held, so two runs never both have a source open.
    """
    started = datetime.now(UTC)
    taken: list[str] = []
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(_INSERT_RUN, run_id, trigger, started)
        got = {
            r["source"]
            for r in await conn.fetch(_TAKE_LEASES, list(sources), run_id, owner, lease_seconds)
        }
        taken = [s for s in sources if s in got]
        if taken:
            await conn.execute(_INSERT_RUN_SOURCE, run_id, taken, started)
    except BaseException:
        await transaction.rollback()
        raise
    if taken:
        await transaction.commit()
    else:
        await transaction.rollback()
    busy: dict[str, uuid.UUID | None] = {}
    others = [s for s in sources if s not in taken]
    if others:
        holders = {r["source"]: r["run_id"] for r in await conn.fetch(_HOLDERS, others)}
        busy = {s: holders.get(s) for s in others}
    return Opened(taken, busy)


_RENEW_LEASES = """
UPDATE etl_leases SET renewed_at = now(), expires_at = now() + make_interval(secs => $2)
WHERE run_id = $1
RETURNING source
"""


async def renew_leases(conn: Conn, run_id: uuid.UUID, lease_seconds: float) -> set[str]:
    """The heartbeat: push the run's leases ``lease_seconds`` ahead; returns the
    sources it still holds (a lease that expired may have been freed since)."""
    return {r["source"] for r in await conn.fetch(_RENEW_LEASES, run_id, lease_seconds)}


_FINISH_SOURCE = """
UPDATE etl_run_sources SET status = $3, error = $4, drift = $5::jsonb, finished_at = now()
WHERE run_id = $1 AND source = $2 AND status = 'running'
"""


async def finish_source(
    conn: Conn,
    run_id: uuid.UUID,
    source: str,
    status: str,
    error: str | None,
    drift: list[dict[str, Any]],
) -> None:
    """Record a source's end (a source closed as interrupted meanwhile stays so)."""
    await conn.execute(
        _FINISH_SOURCE, run_id, source, status, error, msgspec.json.encode(drift).decode()
    )


_FINISH_RUN = """
UPDATE etl_runs SET status = $2, finished_at = $3, error = $4 WHERE id = $1 AND status = 'running'
"""


async def finish_run(
    conn: Conn, run_id: uuid.UUID, status: str, error: str | None = None
) -> datetime:
    """Record the run's end (a run closed as interrupted meanwhile stays so)."""
    finished = datetime.now(UTC)
    await conn.execute(_FINISH_RUN, run_id, status, finished, error)
    return finished


_RELEASE_LEASES = "DELETE FROM etl_leases WHERE run_id = $1"


async def release_leases(conn: Conn, run_id: uuid.UUID) -> None:
    """Free the run's sources; part of the transaction that records its end."""
    await conn.execute(_RELEASE_LEASES, run_id)


_DELETE_EXPIRED = "DELETE FROM etl_leases WHERE expires_at <= now()"
_CLOSE_SOURCES = """
UPDATE etl_run_sources AS s SET status = 'failed', error = coalesce(s.error, 'interrupted'),
    finished_at = coalesce(s.finished_at, now())
WHERE s.status = 'running'
  AND NOT EXISTS (SELECT FROM etl_leases AS l WHERE l.run_id = s.run_id AND l.source = s.source)
"""
_CLOSE_RUNS = """
UPDATE etl_runs AS r SET status = 'failed', error = 'interrupted',
    finished_at = coalesce(r.finished_at, now())
WHERE r.status = 'running'
  AND NOT EXISTS (SELECT FROM etl_run_sources AS s WHERE s.run_id = r.id AND s.status = 'running')
RETURNING r.id
"""


async def close_interrupted_runs(
    conn: Conn, *, release: uuid.UUID | None = None, lock_timeout: float = 5.0
) -> list[uuid.UUID]:
    """Close what processes that are gone left open; the one place that does it.

    In one transaction: expired leases are deleted (and those of ``release``, a
    run whose process is known to be gone), every open run source left without
    its lease is closed as ``failed`` / ``interrupted``, then every open run left
    without an open source. A batch of such a run that is still under way
    commits before its source is closed (the close waits for its row lock) or
    not at all (a closed run source refuses it, migration 0008). Runs of live
    processes keep their leases, and are left alone.

    Args:
        release: a run whose leases go now, expired or not.
        lock_timeout: how long to wait for a batch under way before giving up
            (the next caller tries again).

    Returns:
        The runs closed.
    """
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('lock_timeout', $1, true)", f"{int(lock_timeout * 1000)}ms"
        )
        if release is not None:
            await conn.execute(_RELEASE_LEASES, release)
        await conn.execute(_DELETE_EXPIRED)
        await conn.execute(_CLOSE_SOURCES)
        return [row["id"] for row in await conn.fetch(_CLOSE_RUNS)]


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


class RunSource(msgspec.Struct):
    """One source's part in a run."""

    status: str
    fetched: int
    raw_inserted: int
    duplicates: int
    rejected: int
    unified_upserted: int
    error: str | None
    drift: list[dict[str, Any]]
    """Drift events: ``kind``, ``field``, ``new_field``, ``confidence``, ``detail``."""


class Run(msgspec.Struct):
    """A run as ``/runs``, ``etl run --json`` and the events show it."""

    id: str
    trigger: str
    status: str
    started_at: str
    finished_at: str | None
    duration_seconds: float | None
    error: str | None
    sources: dict[str, RunSource]


def _run_object(row: asyncpg.Record) -> Run:
    started: datetime = row["started_at"]
    finished: datetime | None = row["finished_at"]
    end = finished or datetime.now(UTC)
    sources = {
        item["source"]: msgspec.convert(item, RunSource)
        for item in msgspec.json.decode(row["sources"])
    }
    return Run(
        id=str(row["id"]),
        trigger=row["trigger"],
        status=row["status"],
        started_at=iso(started) or "",
        finished_at=iso(finished),
        duration_seconds=round((end - started).total_seconds(), 3),
        error=row["error"],
        sources=sources,
    )


async def get_run(conn: Queryable, run_id: uuid.UUID) -> Run | None:
    """The run, or ``None``."""
    row = await conn.fetchrow(_GET_RUN, run_id)
    return None if row is None else _run_object(row)


async def list_runs(conn: Queryable, limit: int) -> list[Run]:
    """Newest first."""
    return [_run_object(row) for row in await conn.fetch(_LIST_RUNS, limit)]


async def unified_total(conn: Queryable) -> int:
    """Rows in ``unified_data``, from the counts its triggers keep (no table scan)."""
    total = await conn.fetchval("SELECT coalesce(sum(rows), 0)::bigint FROM unified_counts")
    return int(total)
