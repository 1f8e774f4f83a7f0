"""Runs coordinate through source leases (``etl_leases``, migration 0008).

A run takes the lease of every free source and skips the others; a run that can
take none is recorded nowhere. A lease nobody renews expires, and the next run
closes the run that held it as interrupted. A run source that was closed
refuses every later batch of its run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from config.sources import load_sources
from persistence import runs
from pipelines.runner import Runner
from tests.helpers import (
    cli_env,
    count,
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


def _two_sources(tmp_path: Path, rows: int = 20) -> Path:
    write_csv(tmp_path / "a.csv", csv_rows(rows))
    write_json_array(tmp_path / "b.json", [{"name": "x", "current_price": 1.0}])
    return write_sources(tmp_path, csv_entry(tmp_path / "a.csv"), json_entry(tmp_path / "b.json"))


async def _hold(pool: asyncpg.Pool[Any], *sources: str, seconds: float = 600) -> uuid.UUID:
    """Another process's live run holding ``sources``."""
    holder = uuid.uuid4()
    async with pool.acquire() as conn:
        opened = await runs.open_run(
            conn, holder, "other", list(sources), owner="elsewhere:1", lease_seconds=seconds
        )
    assert opened.taken == list(sources)
    return holder


def _runner(pool: asyncpg.Pool[Any], sources_file: Path, **env: str | int) -> Runner:
    settings = make_settings(sources_file, **env)
    return Runner(pool, settings, load_sources(settings), None)


async def _recorded(pool: asyncpg.Pool[Any]) -> tuple[int, int]:
    return await count(pool, "etl_runs"), await count(pool, "etl_run_sources")


async def test_a_run_that_can_take_no_source_is_recorded_nowhere(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    sources_file = _two_sources(tmp_path)
    holder = await _hold(pool, "csv", "json")
    before = await _recorded(pool)

    result = msgspec.to_builtins(await _runner(pool, sources_file).run("test"))

    assert result == {
        "status": "skipped",
        "sources": {
            "csv": {"status": "busy", "held_by": str(holder)},
            "json": {"status": "busy", "held_by": str(holder)},
        },
    }
    assert await _recorded(pool) == before
    assert await count(pool, "raw_csv_data") == 0
    listed = msgspec.to_builtins(await runs.list_runs(pool, 20))
    assert [r["id"] for r in listed] == [str(holder)]


async def test_a_source_held_by_another_run_is_not_part_of_the_run(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    sources_file = _two_sources(tmp_path)
    await _hold(pool, "json")

    run = msgspec.to_builtins(await _runner(pool, sources_file).run("test"))

    assert list(run["sources"]) == ["csv"]
    assert run["status"] == "success"
    assert run["sources"]["csv"]["raw_inserted"] == 20
    assert await count(pool, "raw_third_source_data") == 0
    # Its lease went with its end; the other run's stays.
    assert await pool.fetchval("SELECT array_agg(source) FROM etl_leases") == ["json"]


async def test_etl_run_prints_the_busy_sources_and_exits_0(
    database_url: str, pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    sources_file = _two_sources(tmp_path)
    holder = await _hold(pool, "csv", "json")
    env = cli_env(database_url, sources_file)

    as_json = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env)
    text = await asyncio.to_thread(run_cli, "etl", "run", env=env)

    assert as_json.returncode == 0, as_json.stderr
    lines = as_json.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "status": "skipped",
        "sources": {
            "csv": {"status": "busy", "held_by": str(holder)},
            "json": {"status": "busy", "held_by": str(holder)},
        },
    }
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("skipped: every source is being ingested by another run")
    assert f"csv (held by run {holder})" in text.stdout
    assert await count(pool, "etl_runs") == 1


async def test_an_expired_lease_is_a_dead_run_closed_by_the_next_one(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    sources_file = _two_sources(tmp_path)
    dead = await _hold(pool, "csv", seconds=0.2)

    async def expired() -> bool:
        return bool(await pool.fetchval("SELECT bool_and(expires_at < now()) FROM etl_leases"))

    await wait_for(expired, within=5)
    run = msgspec.to_builtins(await _runner(pool, sources_file).run("test"))

    assert list(run["sources"]) == ["csv", "json"]
    closed = msgspec.to_builtins(await runs.get_run(pool, dead))
    assert closed is not None
    assert (closed["status"], closed["error"]) == ("failed", "interrupted")
    assert closed["sources"]["csv"]["error"] == "interrupted"
    assert await count(pool, "etl_leases") == 0


async def test_a_live_run_keeps_its_sources_by_renewing_its_leases(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    # A lease of one second and a run of several: only the heartbeat keeps it.
    write_csv(tmp_path / "a.csv", csv_rows(300_000))
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "a.csv"))
    first = _runner(pool, sources_file, ETL_LEASE_SECONDS=1, ETL_BATCH_SIZE=2000)
    second = _runner(pool, sources_file, ETL_LEASE_SECONDS=1)
    task = asyncio.create_task(first.run("first"))
    attempts: list[tuple[str, int]] = []
    try:
        await wait_for(lambda: _stored_any(pool), within=30)
        while not task.done():
            attempt = await second.run("second")
            fetched = sum(getattr(s, "fetched", 0) for s in attempt.sources.values())
            attempts.append((attempt.status, fetched))
            await asyncio.sleep(0.2)
        run = await task
    finally:
        first.request_stop()
        if not task.done():
            await task
    assert run.status == "success"
    assert (run.duration_seconds or 0) > 2
    # Every attempt while the first ran found the source leased. The last may
    # have begun as the first finished: it takes the source with nothing left.
    assert len(attempts) > 1
    assert set(attempts[:-1]) == {("skipped", 0)}
    assert attempts[-1] in {("skipped", 0), ("success", 0)}
    last_took_it = attempts[-1][0] == "success"
    assert await count(pool, "etl_runs") == 1 + last_took_it


async def _stored_any(pool: asyncpg.Pool[Any]) -> bool:
    return await count(pool, "raw_csv_data") > 0


async def test_a_closed_run_source_refuses_every_later_batch_of_its_run(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    # The run looked dead (its lease was freed): whatever it still writes is refused.
    write_csv(tmp_path / "a.csv", csv_rows(200_000))
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "a.csv"))
    runner = _runner(pool, sources_file, ETL_BATCH_SIZE=2000)
    task = asyncio.create_task(runner.run("test"))
    await wait_for(lambda: _stored_any(pool), within=30)
    run_id = await pool.fetchval("SELECT id FROM etl_runs")
    async with pool.acquire() as conn:
        assert await runs.close_interrupted_runs(conn, release=run_id) == [run_id]
    stored = await count(pool, "raw_csv_data")

    run = msgspec.to_builtins(await asyncio.wait_for(task, timeout=60))

    assert await count(pool, "raw_csv_data") == stored < 200_000
    assert (run["status"], run["error"]) == ("failed", "interrupted")
    csv = run["sources"]["csv"]
    assert (csv["status"], csv["error"]) == ("failed", "interrupted")
    assert csv["raw_inserted"] == stored
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
        await pool.execute("UPDATE etl_run_sources SET fetched = fetched + 1")
