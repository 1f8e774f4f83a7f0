"""The batch transaction: raw rows, rejections, unified upserts, checkpoint, counters.

Everything a batch changes commits together or not at all,
so a crash at any instant loses nothing and duplicates nothing.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import msgspec

from persistence import links
from persistence.links import IDENTITY_LOCK_KEY, NewKey, NewLink
from persistence.types import Conn, Queryable

_json = msgspec.json.Encoder()


class Resolver(Protocol):
    """Decides the links of a source's new keys (``pipelines.identity.Resolver``)."""

    async def __call__(self, conn: Conn, source: str, keys: Sequence[NewKey]) -> list[NewLink]:
        """The link of each key, in order."""

    async def plain(self, conn: Conn, source: str) -> bool:
        """Whether each new key of ``source`` that is a canonical name without a
        ticker starts a row of its own named by the key, with nothing to compare."""


@dataclass(slots=True)
class UnifiedRow:
    """A valid record, placed by the raw id it was stored under; ``key`` is its key
    in its source (see ``persistence.links``)."""

    name: str
    value: float
    observed_at: datetime
    raw_id: int
    source_record_id: str | None
    ingested_at: datetime
    run_id: uuid.UUID
    key: str
    symbol: str | None = None


@dataclass(slots=True)
class BatchCounts:
    fetched: int = 0
    raw_inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unified_upserted: int = 0

    def add(self, other: BatchCounts) -> None:
        self.fetched += other.fetched
        self.raw_inserted += other.raw_inserted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.unified_upserted += other.unified_upserted


def _raw_insert_sql(table: str) -> str:
    # Idempotent on (source, content_hash): a re-read record is a duplicate, not a row.
    return f"""
INSERT INTO {table} (source, run_id, content_hash, payload, ingested_at)
SELECT $1, $2, t.h, t.p::jsonb, $5
FROM unnest($3::bytea[], $4::text[]) WITH ORDINALITY AS t(h, p, n)
ORDER BY t.n
ON CONFLICT (source, content_hash) DO NOTHING
RETURNING id, content_hash
"""


# The WHERE clause is the newest-wins guard: the stored row is replaced only by a
# record that is newer, or as new from a source listed earlier, or as new from
# the same source and ingested later. The outcome is independent of arrival order.
# Used by ``etl reprocess``, which has the raw rows already: each key's row is
# found through its link.
UPSERT_UNIFIED = """
WITH t AS (
    SELECT DISTINCT ON (l.name) l.name, t.value, t.observed_at, t.raw_id, t.record_id,
        t.ingested_at, t.run_id
    FROM unnest($1::text[], $2::float8[], $5::timestamptz[], $6::bigint[], $7::text[],
                $8::timestamptz[], $9::uuid[])
        AS t(key, value, observed_at, raw_id, record_id, ingested_at, run_id)
    JOIN unified_links l ON l.source = $3 AND l.source_key = t.key COLLATE "C"
    ORDER BY l.name, t.observed_at DESC, t.raw_id DESC
)
INSERT INTO unified_data AS u
    (name, value, source, observed_at, ingested_at, priority, raw_id, source_record_id,
     run_id, updated_at)
SELECT t.name, t.value, $3, t.observed_at, t.ingested_at, $4, t.raw_id, t.record_id,
    t.run_id, now()
FROM t
ON CONFLICT (name) DO UPDATE SET
    value = excluded.value, source = excluded.source, observed_at = excluded.observed_at,
    ingested_at = excluded.ingested_at, priority = excluded.priority,
    raw_id = excluded.raw_id, source_record_id = excluded.source_record_id,
    run_id = excluded.run_id, updated_at = now()
WHERE (excluded.observed_at, -excluded.priority, excluded.raw_id)
    > (u.observed_at, -u.priority, u.raw_id)
RETURNING 1
"""

ADD_COUNTS = """
UPDATE etl_run_sources SET
    fetched = fetched + $3, raw_inserted = raw_inserted + $4, duplicates = duplicates + $5,
    rejected = rejected + $6, unified_upserted = unified_upserted + $7
WHERE run_id = $1 AND source = $2
"""

INSERT_DRIFT = """
INSERT INTO etl_drift_events (run_id, source, kind, field, new_field, confidence, detail)
SELECT $1, $2, t.kind, t.field, t.new_field, t.confidence, t.detail
FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[], $7::text[])
    AS t(kind, field, new_field, confidence, detail)
"""


@dataclass(slots=True)
class BatchColumns:
    """A batch as parallel columns, one entry per distinct record (in source order).

    ``name`` and ``value`` are ``None`` for a rejected record, whose field and
    reason are in ``rejected_field`` / ``rejected_reason``; ``observed_at`` is
    ``None`` when the record has no timestamp of its own (ingestion time is used).
    ``key`` (the record's key in its source) defaults to ``record_id``, else ``name``.
    """

    content_hash: list[bytes] = field(default_factory=list)
    payload: list[str] = field(default_factory=list)
    name: list[str | None] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)
    observed_at: list[datetime | None] = field(default_factory=list)
    record_id: list[str | None] = field(default_factory=list)
    rejected_field: list[str | None] = field(default_factory=list)
    rejected_reason: list[str | None] = field(default_factory=list)
    symbol: list[str | None] = field(default_factory=list)
    document: str | None = None
    """The batch already encoded (:func:`encode_rows`) by the parser; the other
    lists but ``content_hash`` are then left empty (they would only travel)."""
    keys: list[BatchKey] | None = None
    """Each valid key of the batch once, in the order keys first appear, with its
    latest record (see :func:`batch_keys`); computed from the lists when ``None``."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The parse process hands columns over pickled. Pickling the keys' tuples
        # of datetimes took it 10 ms per batch of 10,000; msgpack takes 0.3 ms.
        keys = None if self.keys is None else _KEYS_ENCODER.encode(self.keys)
        state = [getattr(self, name) for name in _COLUMN_FIELDS]
        return (_unpickle_columns, (state, keys))


#: A key of a batch and its latest record: key, canonical name, symbol, value,
#: observed_at (``None``: the record has no timestamp of its own).
BatchKey = tuple[str, str, str | None, float, datetime | None]


_KEYS_ENCODER = msgspec.msgpack.Encoder()
_KEYS_DECODER = msgspec.msgpack.Decoder(list[tuple[str, str, str | None, float, datetime | None]])
_COLUMN_FIELDS = tuple(f for f in BatchColumns.__slots__ if f != "keys")


def _unpickle_columns(state: list[Any], keys: bytes | None) -> BatchColumns:
    cols = BatchColumns(**dict(zip(_COLUMN_FIELDS, state, strict=True)))
    if keys is not None:
        cols.keys = _KEYS_DECODER.decode(keys)
    return cols


def batch_keys(
    rows: Sequence[tuple[str, str, str | None, float, datetime | None]],
) -> list[BatchKey]:
    """Each key once, in first-appearance order, with its latest record (the one
    the unified upsert would take: newest ``observed_at``, then the later one;
    a record without a timestamp counts as newest, being observed when ingested)."""
    latest: dict[str, BatchKey] = {}
    for row in rows:
        current = latest.get(row[0])
        if current is None or _newer(row, current):
            latest[row[0]] = row
    return list(latest.values())


def _newer(a: BatchKey, b: BatchKey) -> bool:
    if a[4] is None or b[4] is None:
        return a[4] is None
    return a[4] >= b[4]


@functools.cache
def _write_batch_sql(table: str, optimistic: bool) -> str:
    # The whole batch is ONE statement, hence one implicit transaction and one
    # round trip: the raw insert's RETURNING feeds the rejections and the unified
    # upsert, and the checkpoint and run counters move in the same statement.
    # Data-modifying CTEs always run to completion, referenced or not.
    #
    # Identity: every key of the batch has a link, stored or in $15 and $17 (the
    # new ones, decided by the caller); $14 maps each key whose row is named
    # otherwise than the key itself to that row, so the statement looks no link
    # up (see SourceLinks); $16 holds the known keys seen under a new name or
    # ticker.
    #
    # DISTINCT ON keeps one row per key (the batch's winner), because an upsert
    # may not touch a row twice; a row holds one key per source, so that is one
    # per row too.
    #
    # ``optimistic`` drops ON CONFLICT from the raw insert: the unique index still
    # refuses a stored record (the whole statement then fails and changes
    # nothing), but a batch of new records skips the speculative insertion that
    # ON CONFLICT pays on every row (measured: about 40% of the raw insert).
    conflict = "" if optimistic else "ON CONFLICT (source, content_hash) DO NOTHING"
    return f"""
WITH input AS (
    -- The batch arrives as ONE jsonb array of rows (see encode_rows): the
    -- server parses it in C, where binding eight arrays element by element
    -- cost the client more than a microsecond per value. A payload is taken
    -- from the document as jsonb: parsed once, stored as received.
    SELECT decode(r->>0, 'base64') AS h, r->1 AS p, r->>2 AS name,
        (r->>3)::float8 AS value, (r->>4)::timestamptz AS observed_at,
        r->>5 AS record_id, r->>6 AS rej_field, r->>7 AS rej_reason,
        coalesce(r->>8, r->>2) AS key
    FROM jsonb_array_elements($3::jsonb) AS r
),
ins AS (
    -- A plain scan of the document inserts in its order, so raw ids follow the
    -- source's order (no sort: it would move every payload once more).
    INSERT INTO {table} (source, run_id, content_hash, payload, ingested_at)
    SELECT $1, $2, h, p, $4 FROM input
    {conflict}
    RETURNING id, content_hash
),
fresh AS (
    -- Only what the next steps read: the payloads stay out of this join.
    SELECT i.key, i.value, i.observed_at, i.record_id, i.rej_field, i.rej_reason,
        ins.id AS raw_id
    FROM ins JOIN input i ON i.h = ins.content_hash
),
rej AS (
    INSERT INTO etl_rejections (run_id, source, raw_table, raw_id, field, reason)
    SELECT $2, $1, '{table}', raw_id, rej_field, rej_reason FROM fresh
    WHERE rej_field IS NOT NULL
    ORDER BY raw_id
    RETURNING 1
),
new_links AS (
    INSERT INTO unified_links (source, source_key, name, rule, confidence, names_seen, symbol)
    SELECT $1, x->>0, x->>1, x->>2, (x->>3)::float8, ARRAY[x->>4], x->>5
    FROM jsonb_array_elements($15::jsonb) AS x
),
own_links AS (
    -- New keys that are canonical names, each starting the row of its name.
    INSERT INTO unified_links (source, source_key, name, rule, confidence, names_seen)
    SELECT $1, k, k, 'new', 1.0, ARRAY[k] FROM unnest($17::text[]) AS k
),
seen AS (
    -- A known key under a new name or ticker: the link remembers it (a name
    -- once seen finds the row in /data?name=).
    UPDATE unified_links AS l SET
        names_seen = CASE WHEN l.names_seen @> ARRAY[x->>1] THEN l.names_seen
                          ELSE l.names_seen || (x->>1) END,
        symbol = coalesce(x->>2, l.symbol)
    FROM jsonb_array_elements($16::jsonb) AS x
    WHERE l.source = $1 AND l.source_key = (x->>0) COLLATE "C"
),
best AS (
    SELECT DISTINCT ON (key) coalesce($14::jsonb ->> key, key) AS name, value,
        coalesce(observed_at, $4) AS observed_at, raw_id, record_id
    FROM fresh
    WHERE rej_field IS NULL
    ORDER BY key, coalesce(observed_at, $4) DESC, raw_id DESC
),
contenders AS (
    -- Only rows that beat the stored one reach the upsert: a losing row would
    -- still be locked by ON CONFLICT (a write and a WAL record) for nothing. The
    -- upsert keeps its own guard, so a concurrent writer cannot be overtaken.
    SELECT b.* FROM best b LEFT JOIN unified_data cur ON cur.name = b.name
    WHERE cur.name IS NULL
        OR (b.observed_at, -$5::int, b.raw_id) > (cur.observed_at, -cur.priority, cur.raw_id)
),
up AS (
    INSERT INTO unified_data AS u
        (name, value, source, observed_at, ingested_at, priority, raw_id, source_record_id,
         run_id, updated_at)
    SELECT name, value, $1, observed_at, $4, $5, raw_id, record_id, $2, now() FROM contenders
    ON CONFLICT (name) DO UPDATE SET
        value = excluded.value, source = excluded.source, observed_at = excluded.observed_at,
        ingested_at = excluded.ingested_at, priority = excluded.priority,
        raw_id = excluded.raw_id, source_record_id = excluded.source_record_id,
        run_id = excluded.run_id, updated_at = now()
    WHERE (excluded.observed_at, -excluded.priority, excluded.raw_id)
        > (u.observed_at, -u.priority, u.raw_id)
    RETURNING 1
),
counted AS (
    SELECT (SELECT count(*) FROM ins) AS inserted,
           (SELECT count(*) FROM rej) AS rejected,
           (SELECT count(*) FROM up) AS upserted
),
checkpoint AS (
    INSERT INTO etl_checkpoint (source, cursor, schema, updated_at)
    VALUES ($1, $7::jsonb, $8::jsonb, now())
    ON CONFLICT (source) DO UPDATE SET
        cursor = excluded.cursor, schema = coalesce(excluded.schema, etl_checkpoint.schema),
        updated_at = now()
),
drift AS (
    INSERT INTO etl_drift_events (run_id, source, kind, field, new_field, confidence, detail)
    SELECT $2, $1, d.kind, d.field, d.new_field, d.confidence, d.detail
    FROM unnest($9::text[], $10::text[], $11::text[], $12::float8[], $13::text[])
        AS d(kind, field, new_field, confidence, detail)
),
counters AS (
    UPDATE etl_run_sources AS r SET
        fetched = r.fetched + $6, raw_inserted = r.raw_inserted + c.inserted,
        duplicates = r.duplicates + ($6 - c.inserted), rejected = r.rejected + c.rejected,
        unified_upserted = r.unified_upserted + c.upserted
    FROM counted c
    WHERE r.run_id = $2 AND r.source = $1
)
SELECT inserted, rejected, upserted FROM counted
"""


#: One row of the batch document: hash, payload (raw JSON), name, value,
#: observed_at, record_id, rejected_field, rejected_reason, key (``None``: the
#: name), symbol.
BatchRow = tuple[
    bytes,
    msgspec.Raw,
    str | None,
    float | None,
    datetime | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
]


def encode_rows(rows: Sequence[BatchRow]) -> str:
    """The batch as one JSON array of rows, the statement's only large parameter.

    Hashes travel as base64 and payloads as the JSON they are. Floats are written
    in their shortest round-trip form, so the server reads back the very same value.
    """
    return _json.encode(rows).decode()


def batch_document(cols: BatchColumns) -> str:
    """:func:`encode_rows` of the per-field lists of ``cols``."""
    symbols = cols.symbol or [None] * len(cols.content_hash)
    keys = [
        None if rej is not None else rid
        for rid, rej in zip(cols.record_id, cols.rejected_field, strict=True)
    ]
    return encode_rows(
        list(
            zip(
                cols.content_hash,
                [msgspec.Raw(p.encode()) for p in cols.payload],
                cols.name,
                cols.value,
                cols.observed_at,
                cols.record_id,
                cols.rejected_field,
                cols.rejected_reason,
                keys,
                symbols,
                strict=True,
            )
        )
    )


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch statement did."""

    inserted: int
    rejected: int
    upserted: int


async def write_batch(
    conn: Conn,
    table: str,
    cols: BatchColumns,
    *,
    source: str,
    priority: int,
    run_id: uuid.UUID,
    ingested_at: datetime,
    fetched: int,
    cursor: dict[str, Any],
    schema: dict[str, str] | None,
    drift: Sequence[dict[str, Any]] = (),
    optimistic: bool = False,
    rows: Mapping[str, str] | None = None,
    new_links: Sequence[tuple[NewLink, NewKey]] = (),
    own_rows: Sequence[str] = (),
    seen: Sequence[tuple[str, str, str | None]] = (),
) -> Written:
    """Commit one batch: new raw records, rejections, new links, unified winners,
    checkpoint, drift events and run counters, atomically (a single statement).

    Args:
        fetched: records the source emitted for this batch, within-batch
            repeats included (they count as duplicates).
        optimistic: expect every record to be new (see :class:`InsertMode`);
            raises ``asyncpg.UniqueViolationError``, having changed nothing,
            when one is already stored.
        rows: the row of each key of the batch whose row is not named like the
            key (a key missing here belongs to the row of its own name).
        new_links: links to store, for keys that have none yet.
        own_rows: new keys, canonical names without a ticker, each linked to the
            row of its own name.
        seen: known keys seen under a new name or ticker: ``(key, name, symbol)``.
    """
    row = await conn.fetchrow(
        _write_batch_sql(table, optimistic),
        source,
        run_id,
        cols.document if cols.document is not None else batch_document(cols),
        ingested_at,
        priority,
        fetched,
        _json.encode(cursor).decode(),
        None if schema is None else _json.encode(schema).decode(),
        [e["kind"] for e in drift],
        [e["field"] for e in drift],
        [e.get("new_field") for e in drift],
        [e.get("confidence") for e in drift],
        [e.get("detail", "") for e in drift],
        _json.encode(rows or {}).decode(),
        _json.encode(
            [
                (link.key, link.entity, link.rule, link.confidence, new.name, new.symbol)
                for link, new in new_links
            ]
        ).decode(),
        _json.encode(seen).decode(),
        list(own_rows),
    )
    assert row is not None
    return Written(int(row["inserted"]), int(row["rejected"]), int(row["upserted"]))


SAFE_BATCHES_AFTER_DUPLICATE = 16
"""Batches written the careful way after one of a source held a stored record."""


@dataclass(slots=True)
class InsertMode:
    """Per source and run: may the next batch expect only new records?

    A first load, or new rows appended to a file, brings only new records, and
    the raw insert is then cheaper without ON CONFLICT. A re-read (after a reset,
    a rewritten file, an API that returns the same records every run) brings
    stored ones: the optimistic statement fails as a whole, changing nothing,
    and the batch is written again the careful way; the next batches stay
    careful until a run of them finds nothing already stored.
    """

    careful: int = 0
    links: SourceLinks = field(default_factory=lambda: SourceLinks())


#: What is known of a linked key: its row, names seen and ticker; ``None`` for
#: the common case of a key whose row is named like the key, seen under that
#: name only and without a ticker (a source keyed by canonical names).
KnownKey = tuple[str, tuple[str, ...], str | None] | None


@dataclass(slots=True)
class SourceLinks:
    """The links of one source's keys seen in this run, as stored.

    Only the source's own ingestion (which holds the source) and ``etl
    reprocess`` (which holds every source) write a source's links, so what was
    read or written here stays true for the run: a key is looked up once, and
    a batch statement needs no look-up at all. Entries are added once their
    batch has committed.
    """

    known: dict[str, KnownKey] = field(default_factory=dict)
    any_stored: bool | None = None
    """Whether the source had links when the run met it (``None``: not asked
    yet). Without any, a key not in ``known`` is new: no look-up."""


KNOWN_KEYS_MAX = 200_000
"""Keys remembered per source and run; past that the memory is started afresh
(keys are then looked up again), so a source of millions of names stays bounded."""


def _raw_unique_constraint(table: str) -> str:
    return f"uq_{table}_content_hash_source"


@dataclass(frozen=True, slots=True)
class Decided:
    """The links of a batch's new keys."""

    own_rows: list[str] = field(default_factory=list)
    """Keys that are canonical names, each linked to the row of its name."""
    links: list[tuple[NewLink, NewKey]] = field(default_factory=list)


#: Decides the links of a batch's new keys inside its transaction.
Decide = Callable[[Conn], Awaitable[Decided]]


async def _write_batch_tuned(
    conn: Conn,
    table: str,
    cols: BatchColumns,
    decide: Decide | None,
    rows: dict[str, str],
    **kwargs: Any,
) -> tuple[Written, Decided]:
    if decide is None:
        # One statement is its own transaction: no BEGIN and COMMIT round trips.
        written = await write_batch(conn, table, cols, rows=rows, **kwargs)
        return written, Decided()
    async with conn.transaction():
        # New keys: decided under the identity lock, against every link
        # committed before, and written in the same transaction.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", IDENTITY_LOCK_KEY)
        decided = await decide(conn)
        rows = dict(rows)
        for link, _ in decided.links:
            if link.entity != link.key:
                rows[link.key] = link.entity
        written = await write_batch(
            conn,
            table,
            cols,
            rows=rows,
            new_links=decided.links,
            own_rows=decided.own_rows,
            **kwargs,
        )
        return written, decided


async def _write_raw_adaptive(
    conn: Conn, table: str, cols: BatchColumns, mode: InsertMode, **kwargs: Any
) -> tuple[Written, Decided]:
    """:func:`write_batch`, optimistic while records keep being new."""
    if mode.careful == 0:
        try:
            return await _write_batch_tuned(conn, table, cols, optimistic=True, **kwargs)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _raw_unique_constraint(table):
                raise
        mode.careful = SAFE_BATCHES_AFTER_DUPLICATE
    written, decided = await _write_batch_tuned(conn, table, cols, optimistic=False, **kwargs)
    if written.inserted < len(cols.content_hash):
        mode.careful = SAFE_BATCHES_AFTER_DUPLICATE
    else:
        mode.careful -= 1
    return written, decided


async def write_batch_adaptive(
    conn: Conn,
    table: str,
    cols: BatchColumns,
    mode: InsertMode,
    *,
    resolver: Resolver,
    source: str,
    ingested_at: datetime,
    **kwargs: Any,
) -> tuple[int, int, int]:
    """:func:`write_batch`, with the links of the batch's keys on the way.

    Keys this run has not met yet are looked up (once); a batch whose keys all
    have links is one statement. When some have none, the resolver decides
    them in the batch's transaction, under the identity lock.

    Returns:
        ``(raw_inserted, rejected, unified_upserted)``.
    """
    cache = mode.links
    if len(cache.known) > KNOWN_KEYS_MAX:
        cache.known.clear()
        cache.any_stored = None
    known = cache.known
    keys = cols.keys if cols.keys is not None else _keys_of(cols)
    if cache.any_stored is None:
        cache.any_stored = await links.any_links(conn, source)
    unseen = [k[0] for k in keys if k[0] not in known] if cache.any_stored else []
    if unseen:
        stored = await links.linked_keys(conn, source, unseen)
        for stored_key, (stored_row, stored_names, stored_ticker) in stored.items():
            known[stored_key] = _known(stored_key, stored_row, tuple(stored_names), stored_ticker)
    new: list[BatchKey] = []
    rows: dict[str, str] = {}
    seen: list[tuple[str, str, str | None]] = []
    for batch_key in keys:
        key, name, symbol = batch_key[0], batch_key[1], batch_key[2]
        if key not in known:
            new.append(batch_key)
            continue
        entry = known[key]
        if entry is None:
            if name != key or symbol is not None:
                seen.append((key, name, symbol))
            continue
        entity, names, stored_symbol = entry
        if entity != key:
            rows[key] = entity
        if name not in names or (symbol is not None and symbol != stored_symbol):
            seen.append((key, name, symbol))
    # The common first load: keys that are canonical names without tickers.
    named = all(k[0] == k[1] and k[2] is None for k in new)

    async def decide(tx: Conn) -> Decided:
        if named and await resolver.plain(tx, source):
            return Decided(own_rows=[k[0] for k in new])
        pending = [
            NewKey(key, name, symbol, value, observed_at or ingested_at)
            for key, name, symbol, value, observed_at in new
        ]
        return Decided(links=list(zip(await resolver(tx, source, pending), pending, strict=True)))

    written, decided = await _write_raw_adaptive(
        conn,
        table,
        cols,
        mode,
        decide=decide if new else None,
        rows=rows,
        source=source,
        ingested_at=ingested_at,
        seen=seen,
        **kwargs,
    )
    known.update(dict.fromkeys(decided.own_rows))
    for link, decided_key in decided.links:
        known[link.key] = _known(link.key, link.entity, (decided_key.name,), decided_key.symbol)
    for seen_key, seen_name, seen_symbol in seen:
        was = known[seen_key]
        row_name, seen_names, was_symbol = was if was is not None else (seen_key, (seen_key,), None)
        known[seen_key] = _known(
            seen_key,
            row_name,
            seen_names if seen_name in seen_names else (*seen_names, seen_name),
            seen_symbol if seen_symbol is not None else was_symbol,
        )
    return written.inserted, written.rejected, written.upserted


def _known(key: str, entity: str, names: tuple[str, ...], symbol: str | None) -> KnownKey:
    if entity == key and names == (key,) and symbol is None:
        return None
    return (entity, names, symbol)


def _keys_of(cols: BatchColumns) -> list[BatchKey]:
    return batch_keys(
        [
            (rid if rid is not None else name, name, symbol, value, observed_at)
            for name, value, observed_at, rid, rej, symbol in zip(
                cols.name,
                cols.value,
                cols.observed_at,
                cols.record_id,
                cols.rejected_field,
                cols.symbol or [None] * len(cols.name),
                strict=True,
            )
            if rej is None and name is not None and value is not None
        ]
    )


async def insert_raw(
    conn: Conn,
    table: str,
    source: str,
    run_id: uuid.UUID,
    cols: BatchColumns,
    ingested_at: datetime,
) -> dict[bytes, int]:
    """Store new records only; returns the raw id of each newly stored content hash."""
    if not cols.content_hash:
        return {}
    rows = await conn.fetch(
        _raw_insert_sql(table),
        source,
        run_id,
        cols.content_hash,
        cols.payload,
        ingested_at,
    )
    return {row["content_hash"]: row["id"] for row in rows}


async def upsert_unified(
    conn: Conn,
    rows: Sequence[UnifiedRow],
    *,
    source: str,
    priority: int,
) -> int:
    """Upsert the newest record of each row (every key linked already); returns how
    many unified rows changed."""
    if not rows:
        return 0
    changed = await conn.fetch(
        UPSERT_UNIFIED,
        [r.key for r in rows],
        [r.value for r in rows],
        source,
        priority,
        [r.observed_at for r in rows],
        [r.raw_id for r in rows],
        [r.source_record_id for r in rows],
        [r.ingested_at for r in rows],
        [r.run_id for r in rows],
    )
    return len(changed)


async def add_counts(conn: Conn, run_id: uuid.UUID, source: str, counts: BatchCounts) -> None:
    await conn.execute(
        ADD_COUNTS,
        run_id,
        source,
        counts.fetched,
        counts.raw_inserted,
        counts.duplicates,
        counts.rejected,
        counts.unified_upserted,
    )


async def insert_drift(
    conn: Conn,
    run_id: uuid.UUID,
    source: str,
    events: Sequence[dict[str, Any]],
) -> None:
    if events:
        await conn.execute(
            INSERT_DRIFT,
            run_id,
            source,
            [e["kind"] for e in events],
            [e["field"] for e in events],
            [e.get("new_field") for e in events],
            [e.get("confidence") for e in events],
            [e.get("detail", "") for e in events],
        )


LOAD_CHECKPOINTS = (
    "SELECT source, cursor, schema FROM etl_checkpoint WHERE source = ANY($1::text[])"
)


async def load_checkpoints(
    conn: Queryable, sources: Sequence[str]
) -> dict[str, tuple[dict[str, Any], dict[str, str] | None]]:
    """Committed cursor and last seen schema of each source."""
    found: dict[str, tuple[dict[str, Any], dict[str, str] | None]] = {}
    for row in await conn.fetch(LOAD_CHECKPOINTS, list(sources)):
        cursor = msgspec.json.decode(row["cursor"]) if row["cursor"] else {}
        schema = msgspec.json.decode(row["schema"]) if row["schema"] else None
        found[row["source"]] = (cursor, schema)
    return found


async def reset_checkpoint(conn: Queryable, source: str) -> bool:
    """Forget a source's cursor (its last seen schema too); True when one existed."""
    result: str = await conn.execute("DELETE FROM etl_checkpoint WHERE source = $1", source)
    return result.endswith(" 1")
