"""No record is dropped for its timestamp: JSON arrays and the HTTP source.

Upstreams stamp each record on its own. On a real CoinPaprika ``/v1/tickers``
response (tests/captures/coinpaprika) most coins carry the time of the fetch,
while Shiba Inu lags 88 s behind the newest stamp. A reader that skipped
records at or below the previous fetch's newest ``observed_at`` would lose a
coin entering the list with such a stamp, a lagging coin's new observation, and
a corrected record re-exported with the same stamp. Each case runs through the
``api`` source (a real aiohttp upstream on 127.0.0.1) and through a ``json``
source reading the same records as a JSON array file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    API_MAPPING,
    REPO_ROOT,
    api_entry,
    count,
    make_settings,
    raw_payloads,
    run_etl,
    unified_row,
    write_json_array,
    write_sources,
)

CAPTURE = REPO_ROOT / "tests" / "captures" / "coinpaprika" / "tickers_2021-10-22T1811Z.json"
TICKERS: list[dict[str, Any]] = json.loads(CAPTURE.read_text(encoding="utf-8"))
LAGGING_ID = "shib-shiba-inu"
NEWEST = max(t["last_updated"] for t in TICKERS)
RAW_TABLE = {"api": "raw_api_data", "file": "raw_third_source_data"}

Deliver = Callable[[Sequence[dict[str, Any]]], Awaitable[dict[str, Any]]]


def by_id(ticker_id: str) -> dict[str, Any]:
    return next(t for t in TICKERS if t["id"] == ticker_id)


def at(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).astimezone(UTC)


def test_the_capture_has_a_lagging_coin() -> None:
    # What the cases below rely on: one coin stamped well before the newest.
    lagging = by_id(LAGGING_ID)
    assert (at(NEWEST) - at(lagging["last_updated"])).total_seconds() == 88
    assert sum(t["last_updated"] == NEWEST for t in TICKERS) >= 2


@pytest.fixture(params=["api", "file"])
async def deliver(
    request: pytest.FixtureRequest, pool: asyncpg.Pool[Any], tmp_path: Path
) -> AsyncIterator[tuple[str, Deliver]]:
    """Runs ETL once per call over the given records, as the upstream's response or
    as a re-exported JSON array file; returns the source's counts in that run."""
    kind: str = request.param
    async with FakeUpstream() as upstream:
        if kind == "api":
            entry = api_entry(upstream.url)
        else:
            entry = (
                '[[sources]]\nname = "file"\nkind = "json"\n'
                f"location = 'tickers.json'\n{API_MAPPING}\n"
            )
        settings = make_settings(write_sources(tmp_path, entry))

        async def run(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
            if kind == "api":
                upstream.records = records
            else:
                write_json_array(tmp_path / "tickers.json", records)
            result = await run_etl(pool, settings)
            assert result["status"] == "success", result
            counts: dict[str, Any] = result["sources"][kind]
            # Every record received is counted, and is either new or a duplicate.
            assert counts["fetched"] == len(records)
            assert counts["fetched"] == counts["raw_inserted"] + counts["duplicates"]
            return counts

        yield kind, run


async def test_a_coin_entering_the_list_with_a_lagging_stamp_is_stored_and_wins(
    pool: asyncpg.Pool[Any], deliver: tuple[str, Deliver]
) -> None:
    kind, run = deliver
    without = [t for t in TICKERS if t["id"] != LAGGING_ID]

    first = await run(without)
    second = await run(TICKERS)

    assert (first["raw_inserted"], first["duplicates"]) == (14, 0)
    assert (second["raw_inserted"], second["duplicates"]) == (1, 14)
    stored = await raw_payloads(pool, RAW_TABLE[kind])
    assert stored[-1] == by_id(LAGGING_ID)
    assert await count(pool, "unified_data") == 15
    row = await unified_row(pool, "shiba inu")
    assert row is not None
    assert row["value"] == by_id(LAGGING_ID)["quotes"]["USD"]["price"]
    assert row["observed_at"] == at(by_id(LAGGING_ID)["last_updated"])


async def test_a_lagging_new_observation_of_a_known_coin_is_stored_and_wins(
    pool: asyncpg.Pool[Any], deliver: tuple[str, Deliver]
) -> None:
    kind, run = deliver
    # The fetch before: the same response, Shiba Inu at its observation five
    # minutes earlier. Its new one (18:09:46) is later than its own last one
    # but earlier than that fetch's newest stamp (18:11:14).
    before = copy.deepcopy(TICKERS)
    earlier = next(t for t in before if t["id"] == LAGGING_ID)
    earlier["last_updated"] = "2021-10-22T18:04:46Z"
    earlier["quotes"]["USD"]["price"] = 0.000027500000000000
    assert earlier["last_updated"] < by_id(LAGGING_ID)["last_updated"] < NEWEST

    first = await run(before)
    second = await run(TICKERS)

    assert first["raw_inserted"] == 15
    assert (second["raw_inserted"], second["duplicates"]) == (1, 14)
    shiba = [p for p in await raw_payloads(pool, RAW_TABLE[kind]) if p["id"] == LAGGING_ID]
    assert shiba == [earlier, by_id(LAGGING_ID)]
    row = await unified_row(pool, "shiba inu")
    assert row is not None
    assert row["value"] == by_id(LAGGING_ID)["quotes"]["USD"]["price"]
    assert row["observed_at"] == at("2021-10-22T18:09:46Z")


async def test_a_corrected_record_with_the_same_stamp_is_stored_and_wins(
    pool: asyncpg.Pool[Any], deliver: tuple[str, Deliver]
) -> None:
    kind, run = deliver
    corrected = copy.deepcopy(TICKERS)
    bitcoin = next(t for t in corrected if t["id"] == "btc-bitcoin")
    bitcoin["quotes"]["USD"]["price"] = 60697.5
    assert bitcoin["last_updated"] == by_id("btc-bitcoin")["last_updated"]

    await run(TICKERS)
    again = await run(corrected)

    assert (again["raw_inserted"], again["duplicates"]) == (1, 14)
    prices = [
        p["quotes"]["USD"]["price"]
        for p in await raw_payloads(pool, RAW_TABLE[kind])
        if p["id"] == "btc-bitcoin"
    ]
    assert prices == [60697.885839641, 60697.5]
    # Same observed_at, same source: the record ingested later wins.
    row = await unified_row(pool, "bitcoin")
    assert row is not None
    assert row["value"] == 60697.5
    assert row["observed_at"] == at(bitcoin["last_updated"])


async def test_an_older_record_than_the_stored_one_is_kept_in_raw_and_loses(
    pool: asyncpg.Pool[Any], deliver: tuple[str, Deliver]
) -> None:
    kind, run = deliver
    stale = copy.deepcopy(TICKERS)
    bitcoin = next(t for t in stale if t["id"] == "btc-bitcoin")
    bitcoin["last_updated"] = "2021-10-22T17:00:00Z"
    bitcoin["quotes"]["USD"]["price"] = 1.0

    await run(TICKERS)
    late = await run(stale)

    assert (late["raw_inserted"], late["duplicates"]) == (1, 14)
    assert bitcoin in await raw_payloads(pool, RAW_TABLE[kind])
    row = await unified_row(pool, "bitcoin")
    assert row is not None
    assert row["value"] == 60697.885839641
