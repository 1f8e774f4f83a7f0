"""``/data`` pages as the database renders them, and the pages the API keeps.

The database writes a page's items as JSON text (``persistence.reads.ITEM_JSON``);
it must be the text msgspec wrote for the same rows before, value for value and
type for type. A kept page is served again only while ``unified_version`` is
unchanged; every kind of change to ``unified_data``, committed by any
connection, must reach the next request.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.api.schemas import DataItem
from app.api.server import create_app
from app.service.page_cache import PageCache
from config.settings import Settings
from persistence.reads import DataPage

KEY = "key-pages-0123456789"
AUTH = {"x-api-key": KEY}

Client = AsyncTestClient[Litestar]


def _settings(database_url: str, cache_bytes: int) -> Settings:
    return Settings(
        database_url=database_url,
        api_keys=(KEY,),
        etl_on_startup=False,
        etl_interval_seconds=0,
        data_cache_bytes=cache_bytes,
    )


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(_settings(database_url, 1 << 20))) as c:
        yield c


def _cache(client: Client) -> PageCache:
    cache: PageCache = client.app.state.service.data_pages
    return cache


Row = tuple[str, float, str, datetime, datetime]


async def _insert(pool: asyncpg.Pool[Any], rows: Iterable[Row]) -> None:
    rows = list(rows)
    await pool.execute(
        """
        INSERT INTO unified_data
            (name, value, source, observed_at, ingested_at, priority, raw_id, run_id)
        SELECT t.name, t.value, t.source, t.observed_at, t.ingested_at, 0, t.n, $6
        FROM unnest($1::text[], $2::float8[], $3::text[], $4::timestamptz[], $5::timestamptz[])
            WITH ORDINALITY AS t(name, value, source, observed_at, ingested_at, n)
        """,
        *([r[i] for r in rows] for i in range(5)),
        uuid.uuid4(),
    )


def _at(year: int, microsecond: int) -> datetime:
    return datetime(year, 11, 27, 10, 47, 48, microsecond, tzinfo=UTC)


VALUES = [
    5.0,
    -0.0,
    0.0,
    123.0,
    0.1,
    107077.69,
    1e-05,
    1.5e-07,
    999999999999999.0,
    1e15,
    1e16,
    1.2345678901234568e17,
    1e20,
    2.5e300,
    -1e-300,
    5e-324,
    1.7976931348623157e308,
    -42.125,
]
NAMES = [
    'quote "q"',
    "back\\slash",
    "ünïcødé",
    "😀 emoji",
    "tab\there",
    "control\x01char",
    "slash/ok",
    "line\u2028separator",
    "<script>&amp;",
    "plain",
]
MICROSECONDS = [0, 500000, 120, 999999, 1, 100000]


async def test_items_are_the_text_msgspec_writes_for_the_same_rows(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    rows: list[Row] = []
    for i, value in enumerate(VALUES):
        name = f"{NAMES[i % len(NAMES)]} {i}"
        observed = _at(2026 if i % 3 else 5, MICROSECONDS[i % len(MICROSECONDS)])
        ingested = _at(9999 if i % 4 == 1 else 2026, MICROSECONDS[(i + 1) % len(MICROSECONDS)])
        rows.append((name, value, "csv" if i % 2 else "api", observed, ingested))
    await _insert(pool, rows)

    stored = await pool.fetch(
        "SELECT name, value, source, observed_at, ingested_at FROM unified_data ORDER BY name"
    )
    expected = [
        json.loads(msgspec.json.encode(DataItem(*r)))  # what the API wrote before
        for r in stored
    ]
    response = await client.get("/data?limit=1000", headers=AUTH)
    assert response.status_code == 200, response.text
    got = response.json()["data"]
    assert got == expected
    for mine, theirs in zip(got, expected, strict=True):
        for field in ("name", "value", "source", "observed_at", "ingested_at"):
            assert type(mine[field]) is type(theirs[field]), (field, mine, theirs)
        # -0.0 == 0.0: the sign must survive as well.
        assert math.copysign(1.0, mine["value"]) == math.copysign(1.0, theirs["value"])
    # The timestamps are byte for byte msgspec's: microseconds only when non-zero.
    assert {item["observed_at"] for item in got} >= {
        "0005-11-27T10:47:48Z",
        "2026-11-27T10:47:48.500000Z",
        "2026-11-27T10:47:48.000120Z",
    }


async def test_a_kept_page_is_served_until_a_change_commits(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    t = _at(2026, 0)
    await _insert(pool, [(f"coin {i}", float(i), "csv", t, t) for i in range(3)])
    cache = _cache(client)

    async def values() -> dict[str, float]:
        response = await client.get("/data?limit=10", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["pagination"]["total"] == len(body["data"])
        return {item["name"]: item["value"] for item in body["data"]}

    assert await values() == {"coin 0": 0.0, "coin 1": 1.0, "coin 2": 2.0}
    hits = cache.hits
    assert await values() == {"coin 0": 0.0, "coin 1": 1.0, "coin 2": 2.0}
    assert cache.hits == hits + 1

    # The version, not the table, decides: a change that does not move it is not
    # seen, which shows the page really is kept.
    await pool.execute("ALTER TABLE unified_data DISABLE TRIGGER unified_a_version_update")
    await pool.execute("UPDATE unified_data SET value = 10 WHERE name = 'coin 1'")
    assert (await values())["coin 1"] == 1.0
    await pool.execute("ALTER TABLE unified_data ENABLE TRIGGER unified_a_version_update")

    # Every kind of change, each from another connection, reaches the next request.
    await pool.execute("UPDATE unified_data SET value = 11 WHERE name = 'coin 1'")
    assert await values() == {"coin 0": 0.0, "coin 1": 11.0, "coin 2": 2.0}
    await pool.execute("DELETE FROM unified_data WHERE name = 'coin 0'")
    assert await values() == {"coin 1": 11.0, "coin 2": 2.0}
    await _insert(pool, [("coin 3", 3.0, "api", t, t)])
    assert await values() == {"coin 1": 11.0, "coin 2": 2.0, "coin 3": 3.0}
    async with pool.acquire() as conn, conn.transaction():
        # Two statements in one transaction: both seen together, once committed.
        await conn.execute("UPDATE unified_data SET value = 22 WHERE name = 'coin 2'")
        await conn.execute("UPDATE unified_data SET value = 33 WHERE name = 'coin 3'")
    assert await values() == {"coin 1": 11.0, "coin 2": 22.0, "coin 3": 33.0}
    await pool.execute("TRUNCATE unified_data")
    assert await values() == {}


async def test_requests_that_miss_together_share_one_read(pool: asyncpg.Pool[Any]) -> None:
    t = _at(2026, 0)
    await _insert(pool, [("coin", 1.0, "csv", t, t)])
    cache = PageCache(1 << 20)
    query: dict[str, Any] = {"source": None, "name": None, "after": None, "limit": 10}

    def value(page: DataPage) -> float:
        items = json.loads(page.items)
        assert len(items) == 1
        return float(items[0]["value"])

    assert value(await cache.page(pool, **query, offset=0)) == 1.0
    await pool.execute("UPDATE unified_data SET value = 2")
    requests = 20
    async with pool.acquire() as conn, conn.transaction():
        # Holds every page read (not the version check) until all requests missed.
        await conn.execute("LOCK TABLE unified_data IN ACCESS EXCLUSIVE MODE")
        pending = [
            asyncio.ensure_future(cache.page(pool, **query, offset=0)) for _ in range(requests)
        ]
        for _ in range(500):
            if cache.misses == 1 + requests:
                break
            await asyncio.sleep(0.01)
        assert cache.misses == 1 + requests
        # Another page is never shared with these.
        other = asyncio.ensure_future(cache.page(pool, **query, offset=1))
        await asyncio.sleep(0.05)
    pages = await asyncio.gather(*pending)
    assert [value(page) for page in pages] == [2.0] * requests
    assert json.loads((await other).items) == []
    assert cache.page_reads == 1 + 1 + 1


async def test_a_rolled_back_change_keeps_the_page(client: Client, pool: asyncpg.Pool[Any]) -> None:
    t = _at(2026, 0)
    await _insert(pool, [("coin", 1.0, "csv", t, t)])
    first = (await client.get("/data", headers=AUTH)).json()["data"]
    cache = _cache(client)
    hits = cache.hits
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("UPDATE unified_data SET value = 2")
        # Uncommitted: invisible to the API, and the kept page stays valid.
        assert (await client.get("/data", headers=AUTH)).json()["data"] == first
        await transaction.rollback()
    assert (await client.get("/data", headers=AUTH)).json()["data"] == first
    assert cache.hits == hits + 2


async def test_pages_are_kept_within_the_byte_budget(
    database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    t = _at(2026, 0)
    await _insert(pool, [(f"coin {i:02}", float(i), "csv", t, t) for i in range(40)])
    # Room for two pages of ten rows, not three (an item is about 120 bytes, an
    # entry costs 400 more).
    budget = 2 * (10 * 140 + 400) + 100
    async with AsyncTestClient(app=create_app(_settings(database_url, budget))) as client:
        cache = _cache(client)
        pages: dict[int, list[Any]] = {}
        for offset in (0, 10, 20, 30):
            response = await client.get(f"/data?limit=10&offset={offset}", headers=AUTH)
            assert response.status_code == 200, response.text
            pages[offset] = response.json()["data"]
            assert cache.used_bytes <= budget
        assert len(cache) == 2
        # The least recently used pages went first: offset 0 is read again ...
        misses = cache.misses
        assert (await client.get("/data?limit=10", headers=AUTH)).json()["data"] == pages[0]
        assert cache.misses == misses + 1
        # ... and the newest one is still kept.
        hits = cache.hits
        response = await client.get("/data?limit=10&offset=30", headers=AUTH)
        assert response.json()["data"] == pages[30]
        assert cache.hits == hits + 1
        # A page larger than the whole budget is served, never kept.
        response = await client.get("/data?limit=40", headers=AUTH)
        assert len(response.json()["data"]) == 40
        assert cache.used_bytes <= budget


async def test_the_budget_counts_the_memory_pages_take_not_their_characters(
    pool: asyncpg.Pool[Any],
) -> None:
    # One character beyond U+FFFF makes CPython store the whole page's text in
    # four bytes per character.
    t = _at(2026, 0)
    await _insert(pool, [(f"\U0001fa99 coin {i:02}", float(i), "csv", t, t) for i in range(40)])
    budget = 16 * 1024
    cache = PageCache(budget)
    query: dict[str, Any] = {"source": None, "name": None, "after": None}
    keys = [(limit, offset) for limit in (5, 10) for offset in range(0, 40, limit)]
    for limit, offset in keys:
        await cache.page(pool, **query, limit=limit, offset=offset)
    assert cache.used_bytes <= budget
    # The pages still kept are those served from memory now (newest first, so
    # that no read of a page that was not kept evicts one that was): their
    # strings alone must fit the budget.
    kept_bytes = 0
    for limit, offset in reversed(keys):
        hits = cache.hits
        page = await cache.page(pool, **query, limit=limit, offset=offset)
        if cache.hits > hits:
            kept_bytes += sys.getsizeof(page.items)
    assert 0 < kept_bytes <= budget


async def test_no_page_is_kept_when_the_cache_is_off(
    database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    t = _at(2026, 0)
    await _insert(pool, [("coin", 1.0, "csv", t, t)])
    async with AsyncTestClient(app=create_app(_settings(database_url, 0))) as client:
        cache = _cache(client)
        for expected in (1.0, 2.0):
            await pool.execute("UPDATE unified_data SET value = $1", expected)
            body = (await client.get("/data", headers=AUTH)).json()
            assert [item["value"] for item in body["data"]] == [expected]
        assert len(cache) == 0
        assert cache.hits == 0
        assert cache.page_reads == 2


async def test_floats_keep_every_digit_whatever_the_servers_default(
    database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    # A server set to print 15 significant digits must not round what /data shows.
    database = await pool.fetchval("SELECT current_database()")
    await pool.execute(f'ALTER DATABASE "{database}" SET extra_float_digits = 0')
    t = _at(2026, 0)
    values = [0.1 + 0.2, 1 / 3, 107077.69000000001]
    await _insert(pool, [(f"coin {i}", v, "csv", t, t) for i, v in enumerate(values)])
    async with AsyncTestClient(app=create_app(_settings(database_url, 1 << 20))) as client:
        body = (await client.get("/data", headers=AUTH)).json()
    assert [item["value"] for item in body["data"]] == values
