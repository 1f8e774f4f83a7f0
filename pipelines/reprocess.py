"""``etl reprocess``: rebuild ``unified_data`` from the raw tables alone, identity included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import msgspec
import structlog

from config.sources import SourceConfig, id_sources
from persistence import batches, links, runs
from persistence.batches import UnifiedRow
from persistence.links import IDENTITY_LOCK_KEY, NewKey, StoredLink
from persistence.types import Conn
from pipelines.drift import detect_drift
from pipelines.identity import IdentityRules, Resolver, SourceKey
from pipelines.prepare import evaluate, source_key
from pipelines.transform import Unified

log = structlog.get_logger("kasparro.reprocess")

_decoder = msgspec.json.Decoder()


def _raw_rows_sql(table: str) -> str:
    return f"SELECT id, payload, ingested_at, run_id FROM {table} WHERE source = $1 ORDER BY id"


async def reprocess(
    pool: asyncpg.Pool[Any],
    sources: Sequence[SourceConfig],
    *,
    rules: IdentityRules | None = None,
    batch_size: int = 10_000,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Apply the identity file to the links, then truncate and rebuild the unified
    table, in one transaction; no source is contacted.

    Links stay as they are except where ``rules`` (the identity file) says
    otherwise: those keys, and keys without a link (stored before links
    existed), are decided again as their records are read, the file first.
    The winner rule sees the same raw ids, timestamps and priorities as the
    original ingestion, so with unchanged links the rebuilt content is
    identical. Readers see the old table until the transaction commits. Every
    source's ingestion lock and the identity lock are held meanwhile.

    Args:
        sources: every declared source, in the sources file's order.

    Returns:
        Unified rows written per source.
    """
    rules = rules or IdentityRules()
    resolver = Resolver(rules, id_sources(list(sources)))
    written: dict[str, int] = {}
    async with pool.acquire() as conn, conn.transaction():
        for source in sources:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", runs.source_lock_key(source.name)
            )
        await conn.execute("SELECT pg_advisory_xact_lock($1)", IDENTITY_LOCK_KEY)
        dropped = stale_links(await links.all_links(conn), rules)
        if dropped:
            await links.drop_links(conn, dropped)
            log.info("identity_links_dropped", count=len(dropped))
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
                    written_now, schema = await _apply(conn, source, rows, schema, resolver)
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
                    written_now, schema = await _apply(conn, source, rows, schema, resolver)
                    total += written_now
                    rows = []
                    if progress is not None:
                        progress(source.name, total)
            if rows:
                total += (await _apply(conn, source, rows, schema, resolver))[0]
            written[source.name] = total
            if progress is not None:
                progress(source.name, total)
    return written


def stale_links(stored: Sequence[StoredLink], rules: IdentityRules) -> list[SourceKey]:
    """The links the identity file contradicts, to be decided again (pure).

    - a ``manual`` link the file no longer backs;
    - keys a link group joins but that sit in another row than the group's
      oldest linked key, and keys of the same sources sitting in that row;
    - of keys a split keeps apart that share a row, all but the oldest.
    """
    by_key = {(s.source, s.key): s for s in stored}
    rows: dict[str, list[SourceKey]] = {}
    for s in stored:
        rows.setdefault(s.entity, []).append((s.source, s.key))
    drop: dict[SourceKey, None] = {}
    for s in stored:
        me = (s.source, s.key)
        if s.rule != "manual":
            continue
        group = rules.group(me)
        if group is None or not any(o in group for o in rows[s.entity] if o != me):
            drop[me] = None
    for group in rules.groups:
        linked = [m for m in by_key if m in group and m not in drop]
        if not linked:
            continue
        home = by_key[linked[0]].entity
        sources = {source for source, _ in group}
        for member in linked:
            if by_key[member].entity != home:
                drop[member] = None
        for other in rows[home]:
            if other not in group and other[0] in sources:
                drop[other] = None
    for split in rules.splits:
        kept: set[str] = set()
        for member in (m for m in by_key if m in split and m not in drop):
            entity = by_key[member].entity
            if entity in kept:
                drop[member] = None
            else:
                kept.add(entity)
    return list(drop)


async def _apply(
    conn: Conn,
    source: SourceConfig,
    rows: list[tuple[int, Any, Any, Any]],
    schema: dict[str, str] | None,
    resolver: Resolver,
) -> tuple[int, dict[str, str] | None]:
    """Upsert one batch; returns the rows written and the schema to judge the next by."""
    payloads = [r[1] for r in rows]
    outcome = detect_drift(source, payloads, schema)
    if outcome.error is not None:
        # Ingestion failed the source on this batch (a frozen schema, say) and
        # kept its records in raw only: they stay out of the unified table here
        # too, and the next batch is judged by the schema from before it.
        return 0, outcome.schema
    unified: list[UnifiedRow] = []
    latest: dict[str, UnifiedRow] = {}
    for (raw_id, _, ingested_at, run_id), (result, upstream_id, symbol) in zip(
        rows, evaluate(payloads, outcome.mapping), strict=True
    ):
        if not isinstance(result, Unified):
            continue  # rejections are stored already
        # As at ingestion, a record without a timestamp of its own counts as
        # observed when it was ingested.
        row = UnifiedRow(
            result.name,
            result.value,
            result.observed_at or ingested_at,
            raw_id,
            upstream_id,
            ingested_at,
            run_id,
            source_key(result, upstream_id),
            symbol,
        )
        unified.append(row)
        current = latest.get(row.key)
        if current is None or (row.observed_at, row.raw_id) >= (
            current.observed_at,
            current.raw_id,
        ):
            latest[row.key] = row
    if not unified:
        return 0, outcome.schema
    known = await links.linked_keys(conn, source.name, list(latest))
    new = [
        NewKey(row.key, row.name, row.symbol, row.value, row.observed_at)
        for row in _first_seen(unified, latest)
        if row.key not in known
    ]
    if new:
        decided = await resolver(conn, source.name, new)
        await links.insert_links(conn, source.name, list(zip(decided, new, strict=True)))
    await links.update_seen(
        conn,
        source.name,
        [
            (key, row.name, row.symbol)
            for key, row in latest.items()
            if key in known
            and (row.name not in known[key][1] or (row.symbol and row.symbol != known[key][2]))
        ],
    )
    written = await batches.upsert_unified(
        conn, unified, source=source.name, priority=source.priority
    )
    return written, outcome.schema


def _first_seen(unified: Sequence[UnifiedRow], latest: dict[str, UnifiedRow]) -> list[UnifiedRow]:
    """The latest row of each key, keys in the order they first appear."""
    order: dict[str, None] = {}
    for row in unified:
        order.setdefault(row.key, None)
    return [latest[key] for key in order]
