"""``etl reprocess``: rebuild ``unified_data`` from the raw tables alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg
import msgspec

from persistence import batches, runs
from persistence.batches import UnifiedRow
from persistence.types import Conn
from pipelines.config import SourceConfig
from pipelines.drift import detect_drift
from pipelines.prepare import Evaluated, evaluate
from pipelines.transform import Unified

_decoder = msgspec.json.Decoder()


def _raw_rows_sql(table: str) -> str:
    return f"SELECT id, payload, ingested_at, run_id FROM {table} WHERE source = $1 ORDER BY id"


async def reprocess(
    pool: asyncpg.Pool[Any],
    sources: Sequence[SourceConfig],
    *,
    batch_size: int = 10_000,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Truncate and rebuild the unified table in one transaction; no source is contacted.

    The winner rule sees the same raw ids, timestamps and priorities as the original
    ingestion, so the rebuilt content is identical. Readers see the old table until
    the transaction commits. Every source's ingestion lock is held meanwhile.

    Returns:
        Unified rows written per source.
    """
    written: dict[str, int] = {}
    async with pool.acquire() as conn, conn.transaction():
        for source in sources:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", runs.source_lock_key(source.name)
            )
        await conn.execute("TRUNCATE unified_data")
        for source in sources:
            total = 0
            schema: dict[str, str] | None = None
            rows: list[tuple[int, Any, Any, Any]] = []
            cursor = conn.cursor(_raw_rows_sql(source.raw_table), source.name, prefetch=batch_size)
            async for record in cursor:
                if rows and rows[-1][3] != record["run_id"]:
                    # Drift is judged per run as ingestion did: a batch mixing records
                    # from before and after a followed rename would reject the newer.
                    written_now, schema = await _apply(conn, source, rows, schema)
                    total += written_now
                    rows = []
                rows.append(
                    (
                        record["id"],
                        _decoder.decode(record["payload"]),
                        record["ingested_at"],
                        record["run_id"],
                    )
                )
                if len(rows) >= batch_size:
                    written_now, schema = await _apply(conn, source, rows, schema)
                    total += written_now
                    rows = []
                    if progress is not None:
                        progress(source.name, total)
            if rows:
                total += (await _apply(conn, source, rows, schema))[0]
            written[source.name] = total
            if progress is not None:
                progress(source.name, total)
    return written


async def _apply(
    conn: Conn,
    source: SourceConfig,
    rows: list[tuple[int, Any, Any, Any]],
    schema: dict[str, str] | None,
) -> tuple[int, dict[str, str] | None]:
    """Upsert one batch; returns the rows written and the schema to judge the next by."""
    payloads = [r[1] for r in rows]
    outcome = detect_drift(source, payloads, schema)
    if outcome.error is not None:
        # Ingestion failed the source on this batch (a frozen schema, say) and
        # kept its records in raw only: they stay out of the unified table here
        # too, and the next batch is judged by the schema from before it.
        return 0, outcome.schema
    evaluated = evaluate(payloads, outcome.mapping)
    unified = _unified_rows(
        (raw_id, result, ingested_at, run_id)
        for (raw_id, _, ingested_at, run_id), result in zip(rows, evaluated, strict=True)
    )
    written = await batches.upsert_unified(
        conn, unified, source=source.name, priority=source.priority
    )
    return written, outcome.schema


def _unified_rows(rows: Iterable[tuple[int, Evaluated, Any, Any]]) -> list[UnifiedRow]:
    """The valid records as unified rows; as at ingestion, a record without its own
    timestamp counts as observed when it was ingested. Rejections are already stored."""
    return [
        UnifiedRow(
            result.name,
            result.value,
            result.observed_at or ingested_at,
            raw_id,
            record_id,
            ingested_at,
            run_id,
        )
        for raw_id, (result, record_id), ingested_at, run_id in rows
        if isinstance(result, Unified)
    ]
