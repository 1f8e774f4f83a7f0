"""The controlled mid-run failure and the recovery after it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    api_entry,
    checkpoint,
    coin,
    count,
    csv_entry,
    csv_payload,
    csv_rows,
    json_entry,
    make_settings,
    raw_counts,
    raw_payloads,
    row_end_offsets,
    run_etl,
    ticker,
    write_csv,
    write_json_array,
    write_sources,
)

CSV_ROWS = csv_rows(40)
TICKERS = [ticker(f"Api Coin {i}", 10.0 + i, f"2026-01-02T00:00:{i:02d}Z") for i in range(5)]
COINS = [coin(f"Json Coin {i}", 20.0 + i, f"2026-01-03T00:00:{i:02d}Z") for i in range(4)]


def rows_before(path: Path, offset: int) -> int:
    """How many data rows of ``path`` end at or before byte ``offset``."""
    return sum(1 for end in row_end_offsets(path) if end <= offset)


async def assert_exactly_once(pool: asyncpg.Pool[Any], table: str, expected: list[Any]) -> None:
    payloads = await raw_payloads(pool, table)
    assert len(payloads) == len(expected)
    as_keys = sorted(json.dumps(p, sort_keys=True) for p in payloads)
    assert as_keys == sorted(json.dumps(p, sort_keys=True) for p in expected)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(TICKERS) as upstream:
        yield upstream


async def test_injected_failure_keeps_committed_batches_and_the_next_run_completes(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    write_csv(path, CSV_ROWS)
    sources_file = write_sources(tmp_path, csv_entry(path))

    # 12 records: batches of 6, so one batch commits before the failure hits.
    failing = await run_etl(pool, make_settings(sources_file, ETL_FAIL_AFTER_RECORDS=12))

    assert failing["status"] == "failed"
    csv = failing["sources"]["csv"]
    assert (csv["status"], csv["error"]) == ("failed", "injected failure")
    assert (csv["fetched"], csv["raw_inserted"], csv["unified_upserted"]) == (6, 6, 6)
    assert await count(pool, "raw_csv_data") == 6
    assert await raw_payloads(pool, "raw_csv_data") == [csv_payload(r) for r in CSV_ROWS[:6]]
    cursor = await checkpoint(pool, "csv")
    assert cursor is not None
    assert cursor["offset"] == row_end_offsets(path)[5]
    assert rows_before(path, cursor["offset"]) == 6

    recovered = await run_etl(pool, make_settings(sources_file))

    assert recovered["status"] == "success"
    csv = recovered["sources"]["csv"]
    assert (csv["fetched"], csv["raw_inserted"], csv["duplicates"]) == (34, 34, 0)
    await assert_exactly_once(pool, "raw_csv_data", [csv_payload(r) for r in CSV_ROWS])
    assert await count(pool, "unified_data") == 40
    assert (await checkpoint(pool, "csv") or {})["offset"] == path.stat().st_size


async def test_injected_failure_across_three_sources_fails_each_and_recovers_exactly_once(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    path = tmp_path / "prices.csv"
    write_csv(path, CSV_ROWS)
    write_json_array(tmp_path / "coins.json", COINS)
    sources_file = write_sources(
        tmp_path, api_entry(fake.url), csv_entry(path), json_entry("coins.json")
    )
    limit = 20

    failing = await run_etl(pool, make_settings(sources_file, ETL_FAIL_AFTER_RECORDS=limit))

    assert failing["status"] == "failed"
    assert {name: (s["status"], s["error"]) for name, s in failing["sources"].items()} == {
        name: ("failed", "injected failure") for name in ("api", "csv", "json")
    }
    committed = await raw_counts(pool)
    # Only batches read before the limit was reached can have committed.
    assert sum(committed.values()) < limit
    for name, stored in committed.items():
        assert failing["sources"][name]["raw_inserted"] == stored
    cursor = await checkpoint(pool, "csv")
    csv_offset = 0 if cursor is None else cursor["offset"]
    assert rows_before(path, csv_offset) == committed["csv"]
    assert await raw_payloads(pool, "raw_csv_data") == [
        csv_payload(r) for r in CSV_ROWS[: committed["csv"]]
    ]

    recovered = await run_etl(pool, make_settings(sources_file))

    assert recovered["status"] == "success"
    fetched = {name: s["fetched"] for name, s in recovered["sources"].items()}
    # Whole-document sources are read whole again; the CSV resumes at its offset.
    assert fetched == {"api": 5, "csv": 40 - committed["csv"], "json": 4}
    inserted = {name: s["raw_inserted"] for name, s in recovered["sources"].items()}
    assert inserted == {
        name: total - committed[name] for name, total in (("api", 5), ("csv", 40), ("json", 4))
    }
    await assert_exactly_once(pool, "raw_api_data", TICKERS)
    await assert_exactly_once(pool, "raw_csv_data", [csv_payload(r) for r in CSV_ROWS])
    await assert_exactly_once(pool, "raw_third_source_data", COINS)
    assert await count(pool, "unified_data") == 49
    assert (await checkpoint(pool, "csv") or {})["offset"] == path.stat().st_size
