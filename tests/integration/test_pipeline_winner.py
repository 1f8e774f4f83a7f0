"""One unified row per canonical name, newest wins whatever the arrival order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    api_entry,
    append_csv,
    coin,
    count,
    csv_entry,
    json_entry,
    make_settings,
    raw_counts,
    run_etl,
    ticker,
    unified_row,
    write_csv,
    write_json_array,
    write_sources,
)

T1, T2, T3 = "2026-03-01T00:00:00Z", "2026-03-01T01:00:00Z", "2026-03-01T02:00:00Z"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream([]) as upstream:
        yield upstream


def three_sources(
    tmp_path: Path,
    fake: FakeUpstream,
    *,
    api: tuple[float, str],
    csv: tuple[float, str],
    json: tuple[float, str],
    order: Sequence[str] = ("api", "csv", "json"),
) -> Path:
    fake.records = [ticker("Bitcoin", api[0], api[1], ticker_id="btc-bitcoin")]
    write_csv(tmp_path / "prices.csv", [(" BITCOIN ", str(csv[0]), csv[1])])
    write_json_array(tmp_path / "coins.json", [coin("bitcoin", json[0], json[1])])
    entries = {
        "api": api_entry(fake.url),
        "csv": csv_entry("prices.csv"),
        "json": json_entry("coins.json"),
    }
    return write_sources(tmp_path, *(entries[name] for name in order))


@pytest.mark.parametrize(
    "runs",
    [
        pytest.param([["csv"], ["api", "json"]], id="newest-first-then-older"),
        pytest.param([["api", "json"], ["csv"]], id="older-first-then-newest"),
        pytest.param([["api"], ["json"], ["csv"]], id="one-at-a-time-ascending"),
        pytest.param([["csv"], ["json"], ["api"]], id="one-at-a-time-descending"),
        pytest.param([["api", "csv", "json"]], id="all-in-one-run"),
    ],
)
async def test_same_coin_from_three_sources_is_one_row_holding_the_newest_value(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream, runs: list[list[str]]
) -> None:
    settings = make_settings(
        three_sources(tmp_path, fake, api=(1.0, T1), json=(2.0, T2), csv=(3.0, T3))
    )
    for names in runs:
        run = await run_etl(pool, settings, names)
        assert run["status"] == "success"
        assert sorted(run["sources"]) == sorted(names)

    assert await raw_counts(pool) == {"api": 1, "csv": 1, "json": 1}
    assert await count(pool, "unified_data") == 1
    assert await unified_row(pool, "bitcoin") == {
        "name": "bitcoin",
        "value": 3.0,
        "source": "csv",
        "observed_at": at(T3),
    }


async def test_older_records_arriving_later_do_not_touch_the_row(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    settings = make_settings(
        three_sources(tmp_path, fake, api=(1.0, T1), json=(2.0, T2), csv=(3.0, T3))
    )
    first = await run_etl(pool, settings, ["csv"])
    assert first["sources"]["csv"]["unified_upserted"] == 1

    later = await run_etl(pool, settings, ["api", "json"])

    assert later["sources"]["api"]["raw_inserted"] == 1
    assert later["sources"]["json"]["raw_inserted"] == 1
    assert later["sources"]["api"]["unified_upserted"] == 0
    assert later["sources"]["json"]["unified_upserted"] == 0


@pytest.mark.parametrize(
    "runs",
    [
        pytest.param([["api"], ["csv"], ["json"]], id="first-listed-arrives-last"),
        pytest.param([["json"], ["csv"], ["api"]], id="first-listed-arrives-first"),
        pytest.param([["api", "csv", "json"]], id="all-in-one-run"),
    ],
)
async def test_a_tie_on_observed_at_goes_to_the_source_listed_first(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream, runs: list[list[str]]
) -> None:
    # json is listed first, api last: file order, not name or arrival, decides.
    sources_file = three_sources(
        tmp_path,
        fake,
        api=(1.0, T2),
        csv=(2.0, T2),
        json=(3.0, T2),
        order=("json", "csv", "api"),
    )
    settings = make_settings(sources_file)
    for names in runs:
        assert (await run_etl(pool, settings, names))["status"] == "success"

    assert await count(pool, "unified_data") == 1
    assert await unified_row(pool, "bitcoin") == {
        "name": "bitcoin",
        "value": 3.0,
        "source": "json",
        "observed_at": at(T2),
    }


async def test_a_tie_within_one_source_goes_to_the_record_ingested_later(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    write_csv(path, [("Bitcoin", "5", T2), ("Ether", "7", T2)])
    settings = make_settings(write_sources(tmp_path, csv_entry(path)))
    await run_etl(pool, settings)

    append_csv(path, [("bitcoin", "6", T2), ("ETHER", "1", T1)])
    run = await run_etl(pool, settings)

    assert run["sources"]["csv"]["raw_inserted"] == 2
    assert run["sources"]["csv"]["unified_upserted"] == 1
    assert await unified_row(pool, "bitcoin") == {
        "name": "bitcoin",
        "value": 6.0,
        "source": "csv",
        "observed_at": at(T2),
    }
    assert await unified_row(pool, "ether") == {
        "name": "ether",
        "value": 7.0,
        "source": "csv",
        "observed_at": at(T2),
    }


async def test_within_one_batch_the_newest_wins_whatever_the_row_order(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    write_csv(
        tmp_path / "prices.csv",
        [("Bitcoin", "2", T2), ("  bitcoin", "3", T3), ("BITCOIN", "1", T1)],
    )
    settings = make_settings(write_sources(tmp_path, csv_entry("prices.csv")))
    run = await run_etl(pool, settings)

    assert run["sources"]["csv"]["raw_inserted"] == 3
    assert run["sources"]["csv"]["unified_upserted"] == 1
    assert await unified_row(pool, "bitcoin") == {
        "name": "bitcoin",
        "value": 3.0,
        "source": "csv",
        "observed_at": at(T3),
    }
