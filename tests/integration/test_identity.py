"""Identity: one row per real asset, whatever the upstreams call it.

Each test runs the real pipeline on a real PostgreSQL: a fake CoinPaprika on
127.0.0.1 for the ``api`` source and CoinGecko-shaped files for ``json``, both
mapping ``symbol``; the CSV has no ids.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from config.sources import load_sources
from pipelines.identity import load_identity
from pipelines.reprocess import reprocess
from tests.fakes.upstream import FakeUpstream
from tests.helpers import (
    append_csv,
    cli_env,
    make_settings,
    run_cli,
    run_etl,
    write_csv,
    write_json_array,
    write_sources,
)

T = "2026-03-01T00:00:00Z"
KEY = "identity-test-key-0123456789"

API = (
    'mapping = { name = "name", value = "quotes.USD.price", observed_at = "last_updated", '
    'id = "id", symbol = "symbol" }'
)
JSON = (
    'mapping = { name = "name", value = "current_price", observed_at = "last_updated", '
    'id = "id", symbol = "symbol" }'
)
CSV = 'mapping = { name = "name", value = "value", observed_at = "updated_at" }'


def ticker(key: str, name: str, symbol: str, price: float, when: str = T) -> dict[str, Any]:
    """A CoinPaprika ``/v1/tickers`` item."""
    return {
        "id": key,
        "name": name,
        "symbol": symbol,
        "last_updated": when,
        "quotes": {"USD": {"price": price}},
    }


def coin(key: str, name: str, symbol: str, price: float, when: str = T) -> dict[str, Any]:
    """A CoinGecko ``/coins/markets`` item."""
    return {"id": key, "name": name, "symbol": symbol, "current_price": price, "last_updated": when}


def sources(tmp_path: Path, url: str, *, csv: bool = False) -> Path:
    entries = [
        f'[[sources]]\nname = "api"\nkind = "http"\nlocation = "{url}"\n'
        f"rate_limit_per_second = 0.0\nmax_retries = 0\ntimeout_seconds = 10\n{API}\n",
        f'[[sources]]\nname = "json"\nkind = "json"\nlocation = \'coins.json\'\n{JSON}\n',
    ]
    if csv:
        entries.append(
            f'[[sources]]\nname = "csv"\nkind = "csv"\nlocation = \'prices.csv\'\n{CSV}\n'
        )
    return write_sources(tmp_path, *entries)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream([]) as upstream:
        yield upstream


async def rows(pool: asyncpg.Pool[Any]) -> dict[str, float]:
    found = await pool.fetch("SELECT name, value FROM unified_data ORDER BY name")
    return {r["name"]: r["value"] for r in found}


async def members(pool: asyncpg.Pool[Any]) -> dict[str, set[str]]:
    """Each row's keys, as ``source:key``."""
    found = await pool.fetch("SELECT source, source_key, name FROM unified_links")
    result: dict[str, set[str]] = {}
    for r in found:
        result.setdefault(r["name"], set()).add(f"{r['source']}:{r['source_key']}")
    return result


async def test_two_ids_with_one_name_stay_two_rows(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    # One CoinPaprika response holds the new Aave (AAVE) and its predecessor, also
    # named "Aave" (LEND): two assets, two prices.
    fake.records = [
        ticker("aave-new", "Aave", "AAVE", 66.0),
        ticker("lend-ethlend", "Aave", "LEND", 0.70, "2026-03-01T00:00:01Z"),
    ]
    write_json_array(tmp_path / "coins.json", [])
    run = await run_etl(pool, make_settings(sources(tmp_path, fake.url)))

    assert run["status"] == "success"
    assert await rows(pool) == {"aave": 66.0, "aave (lend-ethlend)": 0.70}
    assert await members(pool) == {
        "aave": {"api:aave-new"},
        "aave (lend-ethlend)": {"api:lend-ethlend"},
    }


async def test_bnb_and_binance_coin_with_one_ticker_in_two_sources_are_one_row(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.records = [ticker("bnb-binance-coin", "Binance Coin", "BNB", 655.0)]
    write_json_array(
        tmp_path / "coins.json",
        [coin("binancecoin", "BNB", "bnb", 656.0, "2026-03-01T00:00:30Z")],
    )
    settings = make_settings(sources(tmp_path, fake.url))
    await run_etl(pool, settings, ["api"])  # the first key of a row names it
    await run_etl(pool, settings, ["json"])

    assert await rows(pool) == {"binance coin": 656.0}  # one row, the newer price
    links = await pool.fetch("SELECT source, source_key, rule FROM unified_links ORDER BY source")
    assert [(r["source"], r["source_key"], r["rule"]) for r in links] == [
        ("api", "bnb-binance-coin", "new"),
        ("json", "binancecoin", "id"),
    ]


async def test_assets_sharing_a_ticker_or_a_name_but_not_a_price_stay_apart(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.records = [
        # Two different assets called TON.
        ticker("ton-tokamak-network", "Tokamak Network", "TON", 1.55),
        # The 2019 privacy coin Beam; CoinGecko's "beam-2" is the 2023 gaming token.
        ticker("beam-beam", "Beam", "BEAM", 0.045),
    ]
    write_json_array(
        tmp_path / "coins.json",
        [
            coin("the-open-network", "Toncoin", "ton", 2.35),
            coin("beam-2", "Beam", "beam", 0.0061),
        ],
    )
    settings = make_settings(sources(tmp_path, fake.url))
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["json"])

    assert await rows(pool) == {
        "beam": 0.045,
        "beam (beam-2)": 0.0061,
        "tokamak network": 1.55,
        "toncoin": 2.35,
    }
    assert all(len(keys) == 1 for keys in (await members(pool)).values())


async def test_a_csv_without_ids_joins_the_row_of_its_canonical_name(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    # CoinGecko calls it BNB and founds the row; CoinPaprika's "Binance Coin"
    # joins it by id slug and ticker; the CSV's "Binance Coin" then finds the row
    # by that name, and its "  BITCOIN " the row of Bitcoin.
    write_json_array(
        tmp_path / "coins.json",
        [coin("binancecoin", "BNB", "bnb", 656.0), coin("bitcoin", "Bitcoin", "btc", 97000.0)],
    )
    fake.records = [ticker("bnb-binance-coin", "Binance Coin", "BNB", 655.0)]
    write_csv(
        tmp_path / "prices.csv",
        [("Binance Coin", "650", "2026-03-02T00:00:00Z"), ("  BITCOIN ", "96000", T)],
    )
    settings = make_settings(sources(tmp_path, fake.url, csv=True))
    await run_etl(pool, settings, ["json"])
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["csv"])

    assert await members(pool) == {
        "bnb": {"json:binancecoin", "api:bnb-binance-coin", "csv:binance coin"},
        "bitcoin": {"json:bitcoin", "csv:bitcoin"},
    }
    assert await rows(pool) == {"bnb": 650.0, "bitcoin": 97000.0}


async def test_a_csv_key_linked_to_a_row_named_otherwise_keeps_writing_that_row(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    # The CSV's "Binance Coin" is linked to the row "bnb"; its later records,
    # in the next batch of the same run and in the next run, update that row
    # and never found one named "binance coin".
    write_json_array(tmp_path / "coins.json", [coin("binancecoin", "BNB", "bnb", 656.0)])
    fake.records = [ticker("bnb-binance-coin", "Binance Coin", "BNB", 655.0)]
    csv = tmp_path / "prices.csv"
    write_csv(
        csv,
        [
            ("Binance Coin", "650", "2026-03-02T00:00:00Z"),
            ("Binance Coin", "651", "2026-03-03T00:00:00Z"),
        ],
    )
    settings = make_settings(sources(tmp_path, fake.url, csv=True), ETL_BATCH_SIZE=1)
    await run_etl(pool, settings, ["json"])
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["csv"])
    assert await rows(pool) == {"bnb": 651.0}

    append_csv(csv, [("Binance Coin", "652", "2026-03-04T00:00:00Z")])
    run = await run_etl(pool, settings, ["csv"])

    assert run["status"] == "success"
    assert await rows(pool) == {"bnb": 652.0}
    assert await members(pool) == {
        "bnb": {"json:binancecoin", "api:bnb-binance-coin", "csv:binance coin"}
    }


async def test_a_second_identical_run_moves_no_link(
    pool: asyncpg.Pool[Any], tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.records = [
        ticker("aave-new", "Aave", "AAVE", 66.0),
        ticker("lend-ethlend", "Aave", "LEND", 0.70),
        ticker("bnb-binance-coin", "Binance Coin", "BNB", 655.0),
        ticker("beam-beam", "Beam", "BEAM", 0.045),
    ]
    write_json_array(
        tmp_path / "coins.json",
        [
            coin("aave", "Aave", "aave", 66.5),
            coin("binancecoin", "BNB", "bnb", 656.0),
            coin("beam-2", "Beam", "beam", 0.0061),
        ],
    )
    settings = make_settings(sources(tmp_path, fake.url))
    query = "SELECT * FROM unified_links ORDER BY source, source_key"
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["json"])
    first = [dict(r) for r in await pool.fetch(query)]
    data = await rows(pool)

    again = await run_etl(pool, settings)
    assert again["status"] == "success"
    assert [dict(r) for r in await pool.fetch(query)] == first
    # Newer prices move the rows' values, never their links.
    fake.records = [{**t, "last_updated": "2026-03-02T00:00:00Z"} for t in fake.records]
    await run_etl(pool, settings)
    assert [dict(r) for r in await pool.fetch(query)] == first
    assert set(await rows(pool)) == set(data)
    assert {r["name"]: r["source_key"] for r in first if r["source"] == "json"} == {
        "aave": "aave",
        "binance coin": "binancecoin",
        "beam (beam-2)": "beam-2",
    }


async def test_identity_file_links_and_splits_take_effect_at_reprocess(
    pool: asyncpg.Pool[Any], database_url: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    # Terra Classic (LUNC) and the 2022 listing of Terra (LUNA) are one chain the
    # evidence cannot join; two "Beam" records one may know to be two assets.
    fake.records = [
        ticker("luna-terra", "Terra Classic", "LUNC", 0.000194),
        ticker("beam-beam", "Beam", "BEAM", 0.045),
    ]
    write_json_array(
        tmp_path / "coins.json",
        [coin("terra-luna", "Terra", "luna", 0.000191), coin("beam", "Beam", "beam", 0.046)],
    )
    sources_file = sources(tmp_path, fake.url)
    settings = make_settings(sources_file)
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["json"])
    assert await members(pool) == {
        "terra classic": {"api:luna-terra"},
        "terra": {"json:terra-luna"},
        "beam": {"api:beam-beam", "json:beam"},
    }

    (tmp_path / "identity.toml").write_text(
        '[[link]]\nmembers = ["api:luna-terra", "json:terra-luna"]\n\n'
        '[[split]]\nmembers = ["api:beam-beam", "json:beam"]\n',
        encoding="utf-8",
    )
    # A run reads the file for new keys only: the stored links stay.
    await run_etl(pool, settings)
    assert len(await members(pool)) == 3

    done = run_cli("etl", "reprocess", env=cli_env(database_url, sources_file))
    assert done.returncode == 0, done.stderr
    assert await members(pool) == {
        "terra classic": {"api:luna-terra", "json:terra-luna"},
        "beam": {"api:beam-beam"},
        "beam (json beam)": {"json:beam"},
    }
    found = await pool.fetch("SELECT source_key, rule, confidence FROM unified_links")
    assert {(r["source_key"], r["rule"], r["confidence"]) for r in found} >= {
        ("terra-luna", "manual", 1.0)
    }
    assert await rows(pool) == {"terra classic": 0.000194, "beam": 0.045, "beam (json beam)": 0.046}

    # Without the file, the next reprocess lets the evidence decide again.
    (tmp_path / "identity.toml").unlink()
    rules = load_identity(None, sources_file, {"api": True, "json": True})
    await reprocess(pool, load_sources(settings), rules=rules)
    assert (await members(pool))["terra classic"] == {"api:luna-terra"}


async def test_a_bad_identity_file_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    sources_file = sources(tmp_path, fake.url)
    (tmp_path / "identity.toml").write_text(
        '[[link]]\nmembers = ["api:a", "api:b"]\n', encoding="utf-8"
    )
    done = run_cli("etl", "run", env=cli_env(None, sources_file))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "IDENTITY_FILE" in done.stderr
    assert "two keys of source 'api'" in done.stderr

    missing = run_cli(
        "etl", "run", env=cli_env(None, sources_file, IDENTITY_FILE=str(tmp_path / "nope.toml"))
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith(
        f"IDENTITY_FILE: file not found: {tmp_path / 'nope.toml'}"
    )


async def test_entities_lists_the_members_and_data_finds_a_row_by_any_of_their_names(
    pool: asyncpg.Pool[Any], database_url: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.records = [ticker("bnb-binance-coin", "Binance Coin", "BNB", 655.0)]
    write_json_array(tmp_path / "coins.json", [coin("binancecoin", "BNB", "bnb", 656.0)])
    settings = make_settings(sources(tmp_path, fake.url))
    await run_etl(pool, settings, ["api"])
    await run_etl(pool, settings, ["json"])

    app_settings = make_settings(
        sources(tmp_path, fake.url),
        DATABASE_URL=database_url,
        API_KEY=KEY,
        ETL_ON_STARTUP="false",
        ETL_INTERVAL_SECONDS=0,
    )
    auth = {"x-api-key": KEY}
    async with AsyncTestClient(app=create_app(app_settings)) as client:
        found = await client.get("/entities/Binance%20Coin", headers=auth)
        assert found.status_code == 200
        body = found.json()
        assert body["name"] == "binance coin"
        assert body["value"] == 655.0
        assert [
            (m["source"], m["source_key"], m["names_seen"], m["rule"]) for m in body["members"]
        ] == [
            ("api", "bnb-binance-coin", ["binance coin"], "new"),
            ("json", "binancecoin", ["bnb"], "id"),
        ]
        assert 0 < body["members"][1]["confidence"] <= 1

        page = await client.get("/data", params={"name": " BNB "}, headers=auth)
        assert [item["name"] for item in page.json()["data"]] == ["binance coin"]
        assert page.json()["pagination"]["total"] == 1

        assert (await client.get("/entities/nothing", headers=auth)).status_code == 404
        assert (await client.get("/entities/binance%20coin")).status_code == 401
