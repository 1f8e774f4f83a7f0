#!/usr/bin/env python3
"""The minimal correct loader the bench compares Kasparro with.

Standalone on purpose (the standard library and asyncpg, nothing from the
project): it does the least work that still keeps the contract's promises, one
20k-record batch at a time, sequentially, each batch in one transaction:

1. COPY the batch into a temporary staging table (content hash, payload, name,
   value, observed_at);
2. insert into a raw table whose 16-byte content hash is unique,
   ``ON CONFLICT DO NOTHING`` (re-reads store nothing twice);
3. upsert the batch's newest row per canonical name into the unified table,
   guarded so an older record never overwrites a newer one;
4. advance the checkpoint.

Records are read with the ``csv`` / ``json`` modules (or ``urllib`` for a paged
HTTP source) and hashed with ``hashlib.blake2b(digest_size=16)`` over their
canonical JSON. Prints one JSON line: records read, rows stored, seconds.

    python bench/reference.py --database-url URL --kind csv --location data.csv \\
        --name name --value value --observed-at updated_at
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import sys
import time
import unicodedata
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg

SCHEMA = """
CREATE TABLE IF NOT EXISTS ref_raw (
    id bigserial PRIMARY KEY,
    content_hash bytea NOT NULL UNIQUE,
    payload jsonb NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ref_unified (
    name text PRIMARY KEY,
    value double precision NOT NULL,
    source text NOT NULL,
    observed_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS ref_checkpoint (
    source text PRIMARY KEY,
    position bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
"""

STAGING = """
CREATE TEMPORARY TABLE ref_stage (
    content_hash bytea NOT NULL,
    payload jsonb NOT NULL,
    name text,
    value double precision,
    observed_at timestamptz NOT NULL
) ON COMMIT DELETE ROWS
"""

INSERT_RAW = """
INSERT INTO ref_raw (content_hash, payload)
SELECT content_hash, payload FROM ref_stage
ON CONFLICT (content_hash) DO NOTHING
"""

UPSERT_UNIFIED = """
INSERT INTO ref_unified AS u (name, value, source, observed_at, ingested_at)
SELECT DISTINCT ON (name) name, value, $1, observed_at, now()
FROM ref_stage
WHERE name IS NOT NULL AND value IS NOT NULL
ORDER BY name, observed_at DESC
ON CONFLICT (name) DO UPDATE
SET value = excluded.value, source = excluded.source,
    observed_at = excluded.observed_at, ingested_at = excluded.ingested_at
WHERE excluded.observed_at > u.observed_at
"""

SAVE_CHECKPOINT = """
INSERT INTO ref_checkpoint (source, position, updated_at) VALUES ($1, $2, now())
ON CONFLICT (source) DO UPDATE SET position = excluded.position, updated_at = now()
"""

StageRow = tuple[bytes, str, str | None, float | None, datetime]


def canonical_name(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    name = " ".join(unicodedata.normalize("NFKC", raw).casefold().split())
    return name or None


def parse_value(raw: Any) -> float | None:
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_time(raw: Any, default: datetime) -> datetime:
    if not isinstance(raw, str) or not raw:
        return default
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError:
        return default
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def dig(record: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


def stage_row(payload: Any, args: argparse.Namespace, now: datetime) -> StageRow:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    observed = parse_time(dig(payload, args.observed_at), now) if args.observed_at else now
    return (
        digest,
        text,
        canonical_name(dig(payload, args.name)),
        parse_value(dig(payload, args.value)),
        observed,
    )


def read_csv(location: str) -> Iterator[tuple[Any, int]]:
    with open(location, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=1):
            yield row, number


def read_jsonl(location: str) -> Iterator[tuple[Any, int]]:
    with open(location, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield json.loads(line), number


def read_http(location: str, page_size: int) -> Iterator[tuple[Any, int]]:
    page = 1
    while True:
        url = f"{location}?page={page}&per_page={page_size}"
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a local URL
            items = json.loads(response.read())
        for item in items:
            yield item, page
        if len(items) < page_size:
            return
        page += 1


async def write_batch(
    conn: Any, rows: list[StageRow], source: str, position: int
) -> tuple[int, int]:
    async with conn.transaction():
        await conn.copy_records_to_table(
            "ref_stage",
            records=rows,
            columns=["content_hash", "payload", "name", "value", "observed_at"],
        )
        raw_status = await conn.execute(INSERT_RAW)
        unified_status = await conn.execute(UPSERT_UNIFIED, source)
        await conn.execute(SAVE_CHECKPOINT, source, position)
    return int(raw_status.split()[-1]), int(unified_status.split()[-1])


async def load(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    conn = await asyncpg.connect(args.database_url)
    try:
        await conn.execute(SCHEMA)
        await conn.execute(STAGING)
        if args.kind == "csv":
            records = read_csv(args.location)
        elif args.kind == "jsonl":
            records = read_jsonl(args.location)
        else:
            records = read_http(args.location, args.page_size)
        fetched = raw_inserted = unified = batches = 0
        rows: list[StageRow] = []
        position = 0
        now = datetime.now(UTC)
        for payload, position in records:
            rows.append(stage_row(payload, args, now))
            if len(rows) >= args.batch_size:
                inserted, upserted = await write_batch(conn, rows, args.source, position)
                fetched, raw_inserted, unified = (
                    fetched + len(rows),
                    raw_inserted + inserted,
                    unified + upserted,
                )
                batches += 1
                rows = []
                now = datetime.now(UTC)
        if rows:
            inserted, upserted = await write_batch(conn, rows, args.source, position)
            fetched, raw_inserted, unified = (
                fetched + len(rows),
                raw_inserted + inserted,
                unified + upserted,
            )
            batches += 1
        unified_rows = await conn.fetchval("SELECT count(*) FROM ref_unified")
    finally:
        await conn.close()
    return {
        "fetched": fetched,
        "raw_inserted": raw_inserted,
        "unified_upserted": unified,
        "unified_rows": unified_rows,
        "batches": batches,
        "seconds": round(time.perf_counter() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--kind", choices=("csv", "jsonl", "http"), required=True)
    parser.add_argument("--location", required=True, help="a file path, or the HTTP endpoint")
    parser.add_argument("--source", default="reference")
    parser.add_argument("--name", required=True, help="dotted path of the name field")
    parser.add_argument("--value", required=True, help="dotted path of the value field")
    parser.add_argument("--observed-at", default=None, help="dotted path of the timestamp field")
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--page-size", type=int, default=1000, help="HTTP: records per page")
    args = parser.parse_args(argv)
    result = asyncio.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
