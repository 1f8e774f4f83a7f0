"""``GET /changes`` through the real app on a real PostgreSQL: a consumer that stores
``next_after`` sees every change once, in commit order, removals included."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from config.settings import Settings
from config.sources import load_sources
from persistence import changes
from pipelines.reprocess import reprocess
from tests.helpers import (
    append_csv,
    csv_entry,
    csv_rows,
    make_settings,
    run_etl,
    wait_for,
    write_csv,
    write_sources,
)

KEY = "feed-key-0123456789"
AUTH = {"x-api-key": KEY}
PAGE = 100

Client = AsyncTestClient[Litestar]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    write_csv(tmp_path / "prices.csv", csv_rows(250))
    sources = write_sources(tmp_path, csv_entry(tmp_path / "prices.csv"))
    return make_settings(
        sources,
        DATABASE_URL=database_url,
        API_KEY=KEY,
        ETL_ON_STARTUP="false",
        ETL_INTERVAL_SECONDS=0,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


class Consumer:
    """What a client of the feed keeps: its cursor and a copy of the table."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.after = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.seen: list[dict[str, Any]] = []

    async def poll(self) -> list[dict[str, Any]]:
        """Every change after the cursor, page by page; the cursor moves past them."""
        got: list[dict[str, Any]] = []
        while True:
            response = await self.client.get(
                "/changes", params={"after": self.after, "limit": PAGE}, headers=AUTH
            )
            assert response.status_code == 200, response.text
            body = response.json()
            seqs = [item["seq"] for item in body["data"]]
            assert seqs == sorted(seqs)
            assert all(seq > self.after for seq in seqs)
            got.extend(body["data"])
            assert body["next_after"] == (seqs[-1] if seqs else self.after)
            self.after = body["next_after"]
            if len(body["data"]) < PAGE:
                break
        for item in got:
            if item["deleted"]:
                self.rows.pop(item["name"], None)
            else:
                self.rows[item["name"]] = {
                    "value": item["value"],
                    "source": item["source"],
                    "observed_at": datetime.fromisoformat(item["observed_at"]),
                }
        self.seen.extend(got)
        return got


async def table(pool: asyncpg.Pool[Any]) -> dict[str, dict[str, Any]]:
    """The unified table as a consumer's copy should hold it."""
    rows = await pool.fetch("SELECT name, value, source, observed_at FROM unified_data")
    return {
        r["name"]: {"value": r["value"], "source": r["source"], "observed_at": r["observed_at"]}
        for r in rows
    }


async def test_a_consumer_sees_every_row_once_then_exactly_the_rows_a_run_changed(
    client: Client, pool: asyncpg.Pool[Any], settings: Settings, tmp_path: Path
) -> None:
    await run_etl(pool, settings)
    consumer = Consumer(client)
    first = await consumer.poll()
    names = [item["name"] for item in first]
    assert len(names) == 250 == len(set(names))
    assert not any(item["deleted"] for item in first)
    assert consumer.rows == await table(pool)

    # Three names observed later with new values, and one new name.
    append_csv(
        tmp_path / "prices.csv",
        [
            ("coin 7", "70.25", "2026-06-01T00:00:00Z"),
            ("coin 100", "100.25", "2026-06-01T00:00:00Z"),
            ("coin 249", "249.25", "2026-06-01T00:00:00Z"),
            ("brand new", "1.25", "2026-06-01T00:00:00Z"),
        ],
    )
    run = await run_etl(pool, settings)
    assert run["sources"]["csv"]["unified_upserted"] == 4
    second = await consumer.poll()
    assert sorted((i["name"], i["value"]) for i in second) == [
        ("brand new", 1.25),
        ("coin 100", 100.25),
        ("coin 249", 249.25),
        ("coin 7", 70.25),
    ]
    assert all(i["observed_at"] == "2026-06-01T00:00:00Z" for i in second)
    assert consumer.rows == await table(pool)
    cursor = consumer.after
    assert await consumer.poll() == []
    assert consumer.after == cursor


async def test_a_row_changed_twice_between_two_polls_shows_once_with_its_latest_state(
    client: Client, pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    await run_etl(pool, settings)
    consumer = Consumer(client)
    await consumer.poll()
    for value in (1.5, 2.5, 1 / 3):
        await pool.execute("UPDATE unified_data SET value = $1 WHERE name = 'coin 3'", value)
    changed = await consumer.poll()
    assert [(i["name"], i["value"]) for i in changed] == [("coin 3", 1 / 3)]


async def test_a_renamed_row_shows_as_its_new_name_and_a_tombstone_of_the_old(
    client: Client, pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    await run_etl(pool, settings)
    consumer = Consumer(client)
    await consumer.poll()
    await pool.execute("UPDATE unified_data SET name = 'coin three' WHERE name = 'coin 3'")
    changed = await consumer.poll()
    assert sorted((i["name"], i["deleted"]) for i in changed) == [
        ("coin 3", True),
        ("coin three", False),
    ]
    assert consumer.rows == await table(pool)


async def _blocked_or_done(pool: asyncpg.Pool[Any], pid: int, task: asyncio.Task[Any]) -> bool:
    if task.done():
        return True
    waiting = await pool.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
    )
    return bool(waiting)


async def test_two_writers_committing_out_of_order_are_both_seen_by_a_consumer_polling_between(
    client: Client, pool: asyncpg.Pool[Any], database_url: str
) -> None:
    await pool.execute(
        "INSERT INTO unified_data (name, value, source, observed_at, ingested_at, priority,"
        " raw_id, run_id) SELECT n, 1, 'csv', now(), now(), 0, 1, gen_random_uuid()"
        " FROM unnest(ARRAY['alpha', 'beta']) AS n"
    )
    consumer = Consumer(client)
    assert {i["name"] for i in await consumer.poll()} == {"alpha", "beta"}

    gate, first, second = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await gate.execute("SELECT pg_advisory_lock(4242)")
        # The first writer changes its row, then waits at the gate before its
        # statement (and transaction) can end.
        first_pid = await first.fetchval("SELECT pg_backend_pid()")
        slow = asyncio.create_task(
            first.execute(
                "WITH u AS (UPDATE unified_data SET value = 2 WHERE name = 'alpha' RETURNING 1)"
                " SELECT pg_advisory_lock(4242) FROM u"
            )
        )
        await wait_for(lambda: _blocked_or_done(pool, first_pid, slow), within=10)
        assert not slow.done()
        # The second writer's statement starts later and commits as soon as it can.
        second_pid = await second.fetchval("SELECT pg_backend_pid()")
        quick = asyncio.create_task(
            second.execute("UPDATE unified_data SET value = 3 WHERE name = 'beta'")
        )
        await wait_for(lambda: _blocked_or_done(pool, second_pid, quick), within=10)
        between = await consumer.poll()

        await gate.execute("SELECT pg_advisory_unlock(4242)")
        await asyncio.wait_for(asyncio.gather(slow, quick), timeout=10)
        after = await consumer.poll()
    finally:
        for conn in (gate, first, second):
            await conn.close()

    changed = between + after
    assert sorted((i["name"], i["value"]) for i in changed) == [("alpha", 2.0), ("beta", 3.0)]
    assert consumer.rows == await table(pool)


async def test_removed_rows_show_as_tombstones_and_reprocess_brings_them_back(
    client: Client, pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    await run_etl(pool, settings)
    consumer = Consumer(client)
    await consumer.poll()

    await pool.execute("DELETE FROM unified_data WHERE name IN ('coin 1', 'coin 2')")
    removed = await consumer.poll()
    assert sorted(i["name"] for i in removed) == ["coin 1", "coin 2"]
    assert all(
        i["deleted"] and i["value"] is None and i["source"] is None and i["observed_at"] is None
        for i in removed
    )
    assert consumer.rows == await table(pool)

    # reprocess rebuilds the table from raw: every row is written again, the two
    # removed ones included, and no tombstone is left for a name that is back.
    await reprocess(pool, load_sources(settings))
    rebuilt = await consumer.poll()
    names = [i["name"] for i in rebuilt]
    assert len(names) == 250 == len(set(names))
    assert not any(i["deleted"] for i in rebuilt)
    assert await pool.fetchval("SELECT count(*) FROM unified_removals") == 0
    assert consumer.rows == await table(pool)

    # A truncation alone leaves a tombstone for every row.
    await pool.execute("TRUNCATE unified_data")
    gone = await consumer.poll()
    assert len(gone) == 250
    assert all(i["deleted"] for i in gone)
    assert consumer.rows == {}


async def test_changes_needs_the_key_and_refuses_bad_parameters(client: Client) -> None:
    assert (await client.get("/changes")).status_code == 401
    assert (await client.get("/changes", headers={"x-api-key": "wrong"})).status_code == 401
    for params in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}, {"limit": "1001"}):
        response = await client.get("/changes", params=params, headers=AUTH)
        assert response.status_code == 400, params
        assert response.json()["detail"].startswith("Invalid parameter")
    empty = await client.get("/changes", params={"after": 5}, headers=AUTH)
    assert empty.json() == {"data": [], "next_after": 5}


async def test_a_page_of_changes_reads_its_rows_by_index_not_the_whole_table(
    pool: asyncpg.Pool[Any],
) -> None:
    await _add_rows(pool, 20_000)
    await pool.execute("UPDATE unified_data SET value = value + 1 WHERE value <= 10000")
    await pool.execute("ANALYZE unified_data")
    await pool.execute("ANALYZE unified_feed")
    after = await pool.fetchval("SELECT min(seq) + 5000 FROM unified_data")
    async with pool.acquire() as conn, conn.transaction():
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {changes.changes_page_sql(100)}", after)
    scanned = [
        node["Relation Name"]
        for node in _plan_nodes(json.loads(plan)[0]["Plan"])
        if node["Node Type"] == "Seq Scan"
    ]
    assert "unified_data" not in scanned
    assert "unified_feed" not in scanned
    page = await changes.changes_page(pool, after=after, limit=100)
    assert page.count == 100


async def test_a_page_of_changes_is_planned_once_not_at_every_request(
    pool: asyncpg.Pool[Any],
) -> None:
    # A consumer asks every second: the server must reuse the statement's plan
    # instead of planning each page again (with a bound LIMIT it planned every
    # page once the table held about 100k rows).
    await _add_rows(pool, 100_000)
    await pool.execute("ANALYZE unified_data")
    first = await pool.fetchval("SELECT min(seq) FROM unified_data")
    async with pool.acquire() as conn:
        await conn.execute(f"PREPARE feed_page(bigint) AS {changes.changes_page_sql(100)}")
        try:
            for n in range(12):
                async with conn.transaction():
                    await conn.fetch(f"EXECUTE feed_page({first + 100 * n})")
            plans = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE name = 'feed_page'"
            )
        finally:
            await conn.execute("DEALLOCATE feed_page")
    assert plans is not None
    assert plans["generic_plans"] >= 6, dict(plans)


async def test_an_update_of_a_row_touches_no_index_so_it_can_stay_on_its_page(
    pool: asyncpg.Pool[Any],
) -> None:
    # The feed's numbers are indexed in a log of their own, so a row whose
    # indexed columns (name, source) stay can be updated in place (HOT); with
    # an index on unified_data.seq no update could be.
    await _add_rows(pool, 2_000)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE unified_data SET value = value + 1")
        hot = await conn.fetchval(
            "SELECT pg_stat_get_xact_tuples_hot_updated('unified_data'::regclass)"
        )
    assert hot >= 100, hot


async def test_stale_entries_of_the_log_go_and_consumers_before_and_after_miss_nothing(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    await _add_rows(pool, 6_000)
    early = Consumer(client)
    assert len(await early.poll()) == 6_000
    await pool.execute("UPDATE unified_data SET value = value + 1 WHERE raw_id <= 3000")
    half = Consumer(client)
    await half.poll()
    for _ in range(3):
        await pool.execute("UPDATE unified_data SET value = value + 1")
    # 6,000 + 3,000 + 18,000 entries, of which one per row is current: more than
    # twice the table's rows changed since the last pass, so this pass prunes.
    assert await changes.prune_feed(pool) == 27_000 - 6_000
    assert await pool.fetchval("SELECT count(*) FROM unified_feed") == 6_000
    assert await changes.prune_feed(pool) == 0
    current = await table(pool)
    for consumer in (early, half, Consumer(client)):
        got = await consumer.poll()
        assert len(got) == 6_000 == len({i["name"] for i in got})
        assert consumer.rows == current
    await pool.execute("UPDATE unified_data SET value = value + 1 WHERE raw_id <= 10")
    assert await changes.prune_feed(pool) == 0  # too few changes since: kept for later
    assert len(await early.poll()) == 10


async def test_a_run_prunes_the_log_once_enough_changes_gathered(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    await _add_rows(pool, 5_000)
    for _ in range(2):
        await pool.execute("UPDATE unified_data SET value = value + 1")
    assert await pool.fetchval("SELECT count(*) FROM unified_feed") == 15_000
    run = await run_etl(pool, settings)
    assert run["sources"]["csv"]["unified_upserted"] > 0
    rows = await pool.fetchval("SELECT count(*) FROM unified_data")
    assert await pool.fetchval("SELECT count(*) FROM unified_feed") == rows


async def _add_rows(pool: asyncpg.Pool[Any], count: int) -> None:
    await pool.execute(
        "INSERT INTO unified_data (name, value, source, observed_at, ingested_at, priority,"
        " raw_id, run_id) SELECT 'coin ' || n, n, 'csv', now(), now(), 0, n, gen_random_uuid()"
        " FROM generate_series(1, $1) AS n",
        count,
    )


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)
