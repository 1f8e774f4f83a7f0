"""The etl_* metrics describe the database, not the process.

Every replica serves the same figures whoever ran the run (``kasparro etl run``
here, a command of its own), after a restart too; every known label value is
there at 0 from the first scrape; any code path that writes runs moves them
(the totals are kept by triggers, migration 0005); a scrape with the database
gone still answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.server import create_app
from config.settings import Settings
from persistence import runs
from persistence.database import alembic_upgrade, run_migrations, with_database
from persistence.metric_totals import read_totals
from tests.conftest import _admin
from tests.helpers import (
    cli_env,
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    make_settings,
    run_cli,
    wait_for,
    write_csv,
    write_json_array,
    write_sources,
)
from tests.pg_proxy import PgProxy

KEY = "metrics-key-0123"
SOURCES = ("csv", "json")
STAGES = ("fetched", "raw_inserted", "duplicate", "rejected", "unified_upserted")
FIELDS = ("fetched", "raw_inserted", "duplicates", "rejected", "unified_upserted")
KINDS = ("added", "missing", "renamed", "type_changed")
BOUNDS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 12.5, 15, 20, 25, 30, 45, 60, 90, 120, 180, 300)
T0 = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def at(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def _sources(tmp_path: Path) -> Path:
    write_csv(tmp_path / "prices.csv", csv_rows(12))
    write_json_array(
        tmp_path / "coins.json",
        [coin(f"Coin {i}", 10.0 + i, "2026-02-01T00:00:00Z") for i in range(30, 35)],
    )
    return write_sources(tmp_path, csv_entry("prices.csv"), json_entry("coins.json"))


def _settings(sources_file: Path, database_url: str) -> Settings:
    settings = make_settings(sources_file, DATABASE_URL=database_url, API_KEY=KEY)
    return dataclasses.replace(settings, etl_on_startup=False, etl_interval_seconds=0)


async def scrape(settings: Settings) -> tuple[Samples, str]:
    """One replica's /metrics: a service started for it, then stopped."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        return parse(response.text), response.text


async def test_every_known_series_is_at_zero_from_the_first_scrape(
    tmp_path: Path, database_url: str
) -> None:
    samples, text = await scrape(_settings(_sources(tmp_path), database_url))

    assert samples[at("etl_metrics_db_up")] == 1
    for status in ("success", "partial", "failed"):
        assert samples[at("etl_runs_total", status=status)] == 0
    for source in SOURCES:
        assert samples[at("etl_failures_total", source=source)] == 0
        assert samples[at("etl_last_success_timestamp_seconds", source=source)] == 0
        for stage in STAGES:
            assert samples[at("etl_records_total", source=source, stage=stage)] == 0
        for kind in KINDS:
            assert samples[at("etl_schema_drift_total", source=source, kind=kind)] == 0
    for bound in (*BOUNDS, "+Inf"):
        le = "+Inf" if bound == "+Inf" else repr(float(bound))
        assert samples[at("etl_duration_seconds_bucket", le=le)] == 0
    assert samples[at("etl_duration_seconds_count")] == 0
    assert samples[at("etl_duration_seconds_sum")] == 0
    assert samples[at("etl_unified_records")] == 0
    assert samples[at("etl_run_in_progress")] == 0
    assert samples[at("kasparro_loop_crashes_total")] == 0
    # Declared sources only: nothing else is labelled.
    labelled = {dict(labels).get("source") for (_, labels) in samples}
    assert labelled - {None} == set(SOURCES)
    assert "# TYPE etl_duration_seconds histogram" in text


async def test_a_run_of_etl_run_is_what_every_replica_reports_after_a_restart(
    tmp_path: Path, database_url: str
) -> None:
    sources_file = _sources(tmp_path)
    settings = _settings(sources_file, database_url)
    before, _ = await scrape(settings)

    done = await asyncio.to_thread(
        run_cli, "etl", "run", "--json", env=cli_env(database_url, sources_file)
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["status"] == "success"
    finished = datetime.fromisoformat(run["finished_at"].replace("Z", "+00:00")).timestamp()

    # Two replicas started after the run (neither took part in it), one after the other.
    replicas = [(await scrape(settings))[0] for _ in range(2)]
    etl = [{k: v for k, v in r.items() if k[0].startswith("etl_")} for r in replicas]
    assert etl[0] == etl[1]
    for samples in replicas:
        assert samples[at("etl_runs_total", status="success")] == 1
        assert samples[at("etl_duration_seconds_count")] == 1
        assert abs(samples[at("etl_duration_seconds_sum")] - run["duration_seconds"]) < 0.01
        for source in SOURCES:
            stamp = samples[at("etl_last_success_timestamp_seconds", source=source)]
            assert stamp == pytest.approx(finished, abs=1e-6)
            assert before[at("etl_last_success_timestamp_seconds", source=source)] == 0
            for stage, field in zip(STAGES, FIELDS, strict=True):
                key = at("etl_records_total", source=source, stage=stage)
                assert samples[key] == run["sources"][source][field]
        assert samples[at("etl_unified_records")] == 17
        assert samples[at("etl_run_in_progress")] == 0


async def test_an_interrupted_run_counts_as_failed(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    settings = _settings(_sources(tmp_path), database_url)
    run_id = uuid.uuid4()
    async with pool.acquire() as conn:
        opened = await runs.open_run(
            conn, run_id, "cli", list(SOURCES), owner="gone", lease_seconds=0.05
        )
    assert opened.taken == list(SOURCES)
    while_open, _ = await scrape(settings)
    assert while_open[at("etl_run_in_progress")] == 1
    assert while_open[at("etl_runs_total", status="failed")] == 0

    # Its process is gone: the lease expires and the next caller closes the run.
    async def closed() -> bool:
        async with pool.acquire() as conn:
            return run_id in await runs.close_interrupted_runs(conn)

    await wait_for(closed, within=10)

    after, _ = await scrape(settings)
    assert after[at("etl_run_in_progress")] == 0
    assert after[at("etl_runs_total", status="failed")] == 1
    assert after[at("etl_duration_seconds_count")] == 1
    for source in SOURCES:
        assert after[at("etl_failures_total", source=source)] == 1
        assert after[at("etl_last_success_timestamp_seconds", source=source)] == 0


# -- any writer moves the totals -------------------------------------------------------


async def _insert_run(
    pool: asyncpg.Pool[Any],
    status: str,
    seconds: float | None,
    sources: dict[str, dict[str, Any]],
    *,
    started: datetime = T0,
) -> uuid.UUID:
    run_id = uuid.uuid4()
    finished = None if seconds is None else started + timedelta(seconds=seconds)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO etl_runs (id, trigger, status, started_at, finished_at) "
            "VALUES ($1, 'test', 'running', $2, NULL)",
            run_id,
            started,
        )
        for position, (name, counts) in enumerate(sources.items()):
            await conn.execute(
                "INSERT INTO etl_run_sources (run_id, source, position, status, started_at) "
                "VALUES ($1, $2, $3, 'running', $4)",
                run_id,
                name,
                position,
                started,
            )
            # Two batches, as the runner commits them.
            for half in (counts, counts):
                await conn.execute(
                    "UPDATE etl_run_sources SET fetched = fetched + $3, "
                    "raw_inserted = raw_inserted + $4, duplicates = duplicates + $5, "
                    "rejected = rejected + $6, unified_upserted = unified_upserted + $7 "
                    "WHERE run_id = $1 AND source = $2",
                    run_id,
                    name,
                    *(half.get(f, 0) for f in FIELDS),
                )
        if status != "running":
            for name, counts in sources.items():
                await conn.execute(
                    "UPDATE etl_run_sources SET status = $3, finished_at = now() "
                    "WHERE run_id = $1 AND source = $2",
                    run_id,
                    name,
                    counts.get("status", "success"),
                )
            await conn.execute(
                "UPDATE etl_runs SET status = $2, finished_at = $3 WHERE id = $1",
                run_id,
                status,
                finished,
            )
    return run_id


async def test_totals_follow_rows_written_by_any_statement(pool: asyncpg.Pool[Any]) -> None:
    await _insert_run(
        pool,
        "partial",
        13.5,
        {
            "csv": {"fetched": 10, "raw_inserted": 8, "duplicates": 2, "rejected": 1},
            "json": {"fetched": 4, "raw_inserted": 4, "unified_upserted": 3, "status": "failed"},
        },
    )
    success = await _insert_run(pool, "success", 0.3, {"csv": {"fetched": 1, "duplicates": 1}})
    await _insert_run(pool, "running", None, {"json": {"fetched": 5}})
    # Touching a finished run again counts nothing twice.
    await pool.execute("UPDATE etl_runs SET error = 'noted' WHERE status <> 'running'")
    # Old runs deleted: what they counted stays counted.
    await pool.execute("DELETE FROM etl_runs WHERE id = $1", success)

    totals = await read_totals(pool)

    assert totals.runs == {"partial": 1, "success": 1}
    assert totals.duration_seconds == pytest.approx(13.8)
    assert totals.runs_in_progress == 1
    assert totals.sources["csv"].failures == 0
    assert totals.sources["json"].failures == 1
    assert totals.sources["csv"].records == (22, 16, 6, 2, 0)
    assert totals.sources["json"].records == (18, 8, 0, 0, 6)
    assert totals.sources["csv"].last_success_at == T0 + timedelta(seconds=13.5)
    assert totals.sources["json"].last_success_at is None
    # 13.5 s lands between 12.5 and 15, 0.3 s between 0.25 and 0.5.
    filled = {bound: count for bound, count in totals.buckets if count}
    assert filled == {15.0: 1, 0.5: 1}


async def test_runs_closed_together_are_each_counted_once(pool: asyncpg.Pool[Any]) -> None:
    for _ in range(3):
        await _insert_run(pool, "running", None, {"csv": {"fetched": 1}})
    await pool.execute(
        "UPDATE etl_run_sources SET status = 'failed', error = 'interrupted' "
        "WHERE status = 'running'"
    )
    await pool.execute(
        "UPDATE etl_runs SET status = 'failed', finished_at = started_at + interval '2 s' "
        "WHERE status = 'running'"
    )

    totals = await read_totals(pool)

    assert totals.runs == {"failed": 3}
    assert totals.sources["csv"].failures == 3
    assert totals.sources["csv"].records[0] == 6
    assert dict(totals.buckets)[2.0] == 3


async def test_a_success_recorded_after_its_run_closed_still_counts(
    pool: asyncpg.Pool[Any],
) -> None:
    run_id = await _insert_run(pool, "running", None, {"csv": {"fetched": 1}})
    finished = T0 + timedelta(seconds=4)
    await pool.execute(
        "UPDATE etl_runs SET status = 'success', finished_at = $2 WHERE id = $1", run_id, finished
    )
    await pool.execute("UPDATE etl_run_sources SET status = 'success' WHERE run_id = $1", run_id)

    totals = await read_totals(pool)

    assert totals.sources["csv"].last_success_at == finished


async def test_drift_events_are_counted_per_source_and_kind(pool: asyncpg.Pool[Any]) -> None:
    run_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO etl_drift_events (run_id, source, kind, field, detail) "
        "SELECT $1, s, k, 'f', 'd' FROM unnest($2::text[], $3::text[]) AS t(s, k)",
        run_id,
        ["json", "json", "csv"],
        ["renamed", "renamed", "added"],
    )

    totals = await read_totals(pool)

    assert totals.drift == {("json", "renamed"): 2, ("csv", "added"): 1}


# -- a database of an older version ---------------------------------------------------


@pytest.fixture
def older_database(server_url: str) -> Iterator[str]:
    name = f"kasparro_m_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    yield with_database(server_url, name)
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def test_the_runs_of_before_the_migration_are_counted(older_database: str) -> None:
    await asyncio.to_thread(alembic_upgrade, older_database, "0004")
    conn = await asyncpg.connect(older_database)
    try:
        for status, seconds in (("success", 1.5), ("failed", 40)):
            run_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO etl_runs (id, trigger, status, started_at, finished_at) "
                "VALUES ($1, 'cli', $2, $3, $4)",
                run_id,
                status,
                T0,
                T0 + timedelta(seconds=seconds),
            )
            await conn.execute(
                "INSERT INTO etl_run_sources (run_id, source, position, status, fetched, "
                "raw_inserted, duplicates) VALUES ($1, 'csv', 0, $2, 5, 3, 2)",
                run_id,
                status,
            )
        await conn.execute(
            "INSERT INTO etl_drift_events (run_id, source, kind, field, detail) "
            "VALUES ($1, 'csv', 'added', 'x', 'new string field')",
            uuid.uuid4(),
        )
    finally:
        await conn.close()

    await asyncio.to_thread(run_migrations, older_database)

    conn = await asyncpg.connect(older_database)
    try:
        totals = await read_totals(conn)
    finally:
        await conn.close()
    assert totals.runs == {"success": 1, "failed": 1}
    assert totals.duration_seconds == pytest.approx(41.5)
    assert totals.sources["csv"].failures == 1
    assert totals.sources["csv"].records == (10, 6, 4, 0, 0)
    assert totals.sources["csv"].last_success_at == T0 + timedelta(seconds=1.5)
    assert totals.drift == {("csv", "added"): 1}
    assert {b: n for b, n in totals.buckets if n} == {2.0: 1, 45.0: 1}


# -- the database away ------------------------------------------------------------------


@pytest.fixture
def proxy(database_url: str) -> Iterator[PgProxy]:
    p = PgProxy(database_url).start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def proxied(tmp_path: Path, proxy: PgProxy) -> AsyncIterator[AsyncTestClient[Litestar]]:
    settings = _settings(_sources(tmp_path), proxy.url)
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("outage", ["refuse", "hang"])
async def test_a_scrape_with_the_database_away_serves_the_rest_and_says_so(
    proxied: AsyncTestClient[Litestar], proxy: PgProxy, outage: str
) -> None:
    assert parse((await proxied.get("/metrics")).text)[at("etl_metrics_db_up")] == 1
    proxy.cut(outage)
    try:
        started = time.monotonic()
        response = await proxied.get("/metrics")
        elapsed = time.monotonic() - started
    finally:
        proxy.restore()

    assert response.status_code == 200
    samples = parse(response.text)
    assert samples[at("etl_metrics_db_up")] == 0
    assert not any(name.startswith("etl_runs") for name, _ in samples)
    assert any(name == "http_requests_total" for name, _ in samples)
    assert elapsed < 10

    # Back: the figures are served again.
    async def served() -> bool:
        again = parse((await proxied.get("/metrics")).text)
        return (
            again[at("etl_metrics_db_up")] == 1 and at("etl_runs_total", status="success") in again
        )

    await wait_for(served, within=10, interval=0.1)
