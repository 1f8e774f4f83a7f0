"""``etl reset`` and ``etl reprocess`` as processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    api_entry,
    checkpoint,
    cli_env,
    coin,
    count,
    csv_entry,
    json_entry,
    raw_counts,
    run_cli,
    ticker,
    unified_rows,
    write_csv,
    write_json_array,
    write_sources,
)

# Overlapping names across sources, repeated names within the CSV, a tie on
# observed_at between sources, a row with no timestamp and one rejected row.
TICKERS = [
    ticker("Bitcoin", 100.0, "2026-04-01T10:00:00Z"),
    ticker("Ethereum", 50.0, "2026-04-01T12:00:00Z"),
    ticker("Solana", 9.0, "2026-04-01T09:00:00Z"),
]
CSV_ROWS = [
    (" BITCOIN ", "101", "2026-04-01T11:00:00Z"),
    ("ethereum", "49", "2026-04-01T11:00:00Z"),
    ("Solana", "9.5", "2026-04-01T09:00:00Z"),
    ("Dogecoin", "0.1", "2026-04-01T08:00:00Z"),
    ("dogecoin ", "0.2", "2026-04-01T08:30:00Z"),
    ("Undated", "3", ""),
    ("Broken", "n/a", "2026-04-01T08:00:00Z"),
]
COINS = [
    coin("bitcoin", 99.0, "2026-04-01T10:30:00Z"),
    coin("Cardano", 0.5, "2026-04-01T07:00:00Z"),
    coin("Dogecoin", 0.3, "2026-04-01T08:30:00Z"),
]
EXPECTED = {
    "bitcoin": (101.0, "csv"),
    "ethereum": (50.0, "api"),
    "solana": (9.0, "api"),
    "dogecoin": (0.2, "csv"),
    "undated": (3.0, "csv"),
    "cardano": (0.5, "json"),
}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(TICKERS) as upstream:
        yield upstream


async def cli(*args: str, env: dict[str, str]) -> Any:
    return await asyncio.to_thread(run_cli, *args, env=env)


async def test_reset_rerun_adds_nothing_and_reprocess_rebuilds_identical_rows(
    database_url: str, pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    write_csv(tmp_path / "prices.csv", CSV_ROWS)
    write_json_array(tmp_path / "coins.json", COINS)
    env = cli_env(
        database_url,
        write_sources(
            tmp_path, api_entry(fake.url), csv_entry("prices.csv"), json_entry("coins.json")
        ),
    )
    first = await cli("etl", "run", env=env)
    assert first.returncode == 3, first.stderr  # partial: one rejected row
    raw_before = await raw_counts(pool)
    assert raw_before == {"api": 3, "csv": 7, "json": 3}
    before = await unified_rows(pool)
    assert {r["name"]: (r["value"], r["source"]) for r in before} == EXPECTED

    reset = await cli("etl", "reset", "--source", "csv", env=env)
    assert reset.returncode == 0, reset.stderr
    assert await checkpoint(pool, "csv") is None
    assert await checkpoint(pool, "json") is not None

    again = await cli("etl", "run", "--json", "--source", "csv", env=env)
    assert again.returncode == 0, again.stderr
    csv = json.loads(again.stdout)["sources"]["csv"]
    assert (csv["fetched"], csv["raw_inserted"], csv["duplicates"], csv["unified_upserted"]) == (
        7,
        0,
        7,
        0,
    )
    assert await raw_counts(pool) == raw_before
    assert await unified_rows(pool) == before  # every column, updated_at included

    await pool.execute("DELETE FROM unified_data")
    rebuilt = await cli("etl", "reprocess", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "6 rows" in rebuilt.stdout
    assert len(fake.requests) == 1  # the first run's only: reprocess contacts no source

    after = await unified_rows(pool)
    columns = set(before[0])
    # updated_at and seq say when the row was last written; reprocess writes every row.
    compared = columns - {"updated_at", "seq"}
    assert compared >= {
        "name",
        "value",
        "source",
        "observed_at",
        "ingested_at",
        "raw_id",
        "priority",
        "source_record_id",
        "run_id",
    }
    assert [{c: r[c] for c in compared} for r in after] == [
        {c: r[c] for c in compared} for r in before
    ]
    assert await raw_counts(pool) == raw_before
    assert await count(pool, "unified_data") == 6
