"""Incremental reading across runs (JSON Lines and arrays).

Real PostgreSQL, the real runner, the fake upstream for the ``api`` source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    api_entry,
    append_csv,
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
    run_etl,
    ticker,
    unified_rows,
    write_csv,
    write_json_array,
    write_json_lines,
    write_sources,
)

TICKERS = [ticker(f"Api Coin {i}", 100.0 + i, f"2026-01-02T00:00:{i:02d}Z") for i in range(5)]
COINS = [coin(f"Json Coin {i}", 200.0 + i, f"2026-01-03T00:00:{i:02d}Z") for i in range(4)]


def counts_of(run: dict[str, Any], source: str) -> tuple[int, int, int, int, int]:
    s = run["sources"][source]
    return s["fetched"], s["raw_inserted"], s["duplicates"], s["rejected"], s["unified_upserted"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(TICKERS) as upstream:
        yield upstream


async def test_second_run_over_unchanged_inputs_reads_and_changes_nothing(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    write_csv(tmp_path / "prices.csv", csv_rows(6))
    write_json_array(tmp_path / "coins.json", COINS)
    settings = make_settings(
        write_sources(
            tmp_path, api_entry(fake.url), csv_entry("prices.csv"), json_entry("coins.json")
        )
    )

    first = await run_etl(pool, settings)
    assert first["status"] == "success"
    assert counts_of(first, "api") == (5, 5, 0, 0, 5)
    assert counts_of(first, "csv") == (6, 6, 0, 0, 6)
    assert counts_of(first, "json") == (4, 4, 0, 0, 4)
    assert await raw_counts(pool) == {"api": 5, "csv": 6, "json": 4}
    assert await count(pool, "unified_data") == 15
    unified_before = await unified_rows(pool)

    second = await run_etl(pool, settings)
    assert second["status"] == "success"
    # The api and the JSON array are read whole again (they have no offsets):
    # every record is fetched and is a duplicate. The CSV resumes at its end.
    assert counts_of(second, "api") == (5, 0, 5, 0, 0)
    assert counts_of(second, "json") == (4, 0, 4, 0, 0)
    assert counts_of(second, "csv") == (0, 0, 0, 0, 0)
    for source in ("api", "csv", "json"):
        assert second["sources"][source]["error"] is None
    assert await raw_counts(pool) == {"api": 5, "csv": 6, "json": 4}
    assert await count(pool, "unified_data") == 15
    assert await unified_rows(pool) == unified_before
    assert len(fake.requests) == 2


async def test_rows_appended_to_the_csv_are_exactly_what_the_next_run_fetches(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    path = tmp_path / "prices.csv"
    write_csv(path, csv_rows(10))
    write_json_array(tmp_path / "coins.json", COINS)
    settings = make_settings(
        write_sources(tmp_path, api_entry(fake.url), csv_entry(path), json_entry("coins.json"))
    )
    await run_etl(pool, settings)

    appended = csv_rows(3, start=10)
    append_csv(path, appended)
    run = await run_etl(pool, settings)

    assert run["status"] == "success"
    assert counts_of(run, "csv") == (3, 3, 0, 0, 3)
    assert counts_of(run, "api") == (5, 0, 5, 0, 0)
    assert counts_of(run, "json") == (4, 0, 4, 0, 0)
    assert await raw_counts(pool) == {"api": 5, "csv": 13, "json": 4}
    payloads = await raw_payloads(pool, "raw_csv_data")
    assert payloads[-3:] == [csv_payload(r) for r in appended]
    cursor = await checkpoint(pool, "csv")
    assert cursor is not None
    assert cursor["offset"] == path.stat().st_size


async def test_csv_replaced_by_a_shorter_file_is_reread_without_duplicates(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    old = csv_rows(8)
    write_csv(path, old)
    settings = make_settings(write_sources(tmp_path, csv_entry(path)))
    await run_etl(pool, settings)
    old_size = path.stat().st_size

    # Two rows kept as they were, two new ones: shorter, and different.
    new = [old[0], old[5], ("Newcoin", "1.25", "2026-02-01T00:00:00Z"), ("Other", "2", "")]
    write_csv(path, new)
    assert path.stat().st_size < old_size
    run = await run_etl(pool, settings)

    assert run["status"] == "success"
    assert counts_of(run, "csv") == (4, 2, 2, 0, 2)
    distinct_ever = {tuple(r) for r in old} | {tuple(r) for r in new}
    assert await count(pool, "raw_csv_data") == len(distinct_ever) == 10
    payloads = await raw_payloads(pool, "raw_csv_data")
    assert len({tuple(sorted(p.items())) for p in payloads}) == 10
    assert await count(pool, "unified_data") == 10
    cursor = await checkpoint(pool, "csv")
    assert cursor is not None
    assert cursor["offset"] == path.stat().st_size


async def test_csv_cut_short_with_the_same_head_is_reread_from_the_start(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    old = csv_rows(300)
    write_csv(path, old)
    settings = make_settings(write_sources(tmp_path, csv_entry(path)))
    await run_etl(pool, settings)
    old_size = path.stat().st_size

    # Same first 4 KiB (the head signature), shorter than the committed offset.
    added = csv_rows(2, prefix="late")
    write_csv(path, [*old[:200], *added])
    assert 4096 < path.stat().st_size < old_size
    run = await run_etl(pool, settings)

    assert counts_of(run, "csv") == (202, 2, 200, 0, 2)
    assert await count(pool, "raw_csv_data") == 302


async def test_csv_replaced_by_a_longer_file_with_another_head_is_reread_from_the_start(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    write_csv(path, csv_rows(5))
    settings = make_settings(write_sources(tmp_path, csv_entry(path)))
    await run_etl(pool, settings)

    # Larger than the committed offset, so only the head tells it apart.
    write_csv(path, csv_rows(9, prefix="other"))
    run = await run_etl(pool, settings)

    assert counts_of(run, "csv") == (9, 9, 0, 0, 9)
    assert await count(pool, "raw_csv_data") == 14


async def test_csv_resumed_with_a_padded_header_maps_the_same_columns(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    path.write_bytes(b"name , value,updated_at \nAlpha,1,2026-01-01T00:00:00Z\n")
    settings = make_settings(write_sources(tmp_path, csv_entry(path)))
    first = await run_etl(pool, settings)
    assert counts_of(first, "csv") == (1, 1, 0, 0, 1)

    with path.open("ab") as handle:
        handle.write(b"Beta,2,2026-01-01T00:00:01Z\n")
    second = await run_etl(pool, settings)

    assert second["status"] == "success"
    assert counts_of(second, "csv") == (1, 1, 0, 0, 1)
    assert await raw_payloads(pool, "raw_csv_data") == [
        {"name": "Alpha", "value": "1", "updated_at": "2026-01-01T00:00:00Z"},
        {"name": "Beta", "value": "2", "updated_at": "2026-01-01T00:00:01Z"},
    ]


async def test_json_lines_appended_lines_are_the_only_ones_fetched(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "coins.jsonl"
    write_json_lines(path, COINS[:3])
    settings = make_settings(write_sources(tmp_path, json_entry(path)))

    first = await run_etl(pool, settings)
    assert counts_of(first, "json") == (3, 3, 0, 0, 3)

    again = await run_etl(pool, settings)
    assert counts_of(again, "json") == (0, 0, 0, 0, 0)

    # Appended lines may carry older timestamps: offsets, not a mark, decide.
    late = coin("Late Coin", 9.0, "2020-01-01T00:00:00Z")
    write_json_lines(path, [COINS[3], late], mode="a")
    third = await run_etl(pool, settings)

    assert third["status"] == "success"
    assert counts_of(third, "json") == (2, 2, 0, 0, 2)
    assert await raw_payloads(pool, "raw_third_source_data") == [*COINS, late]
    cursor = await checkpoint(pool, "json")
    assert cursor is not None
    assert cursor["offset"] == path.stat().st_size


async def test_json_array_rerun_stores_only_the_records_it_has_not_stored(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "coins.json"
    write_json_array(path, COINS)
    settings = make_settings(write_sources(tmp_path, json_entry(path)))

    first = await run_etl(pool, settings)
    assert counts_of(first, "json") == (4, 4, 0, 0, 4)
    assert await checkpoint(pool, "json") == {"mode": "array"}

    again = await run_etl(pool, settings)
    assert counts_of(again, "json") == (4, 0, 4, 0, 0)

    newer = coin("Json Coin 0", 250.0, "2026-01-04T00:00:00Z")
    # Older than every record of the first read: a real record all the same.
    older = coin("Json Coin 1", 150.0, "2026-01-01T00:00:00Z")
    write_json_array(path, [*COINS, newer, older])
    third = await run_etl(pool, settings)

    assert counts_of(third, "json") == (6, 2, 4, 0, 1)
    assert await count(pool, "raw_third_source_data") == 6
    assert await count(pool, "unified_data") == 4
    rows = {r["name"]: r["value"] for r in await unified_rows(pool)}
    assert rows["json coin 0"] == 250.0
    # The older record is kept in raw and loses to the newer one it met.
    assert rows["json coin 1"] == 201.0
