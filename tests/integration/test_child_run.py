"""The service's runs as ``kasparro etl run --json`` children (app/service/child_run.py).

Each test drives :class:`SubprocessRunner` as the service's loop does and checks
what a user sees: the run object, the database, the metrics, the processes left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from app.service.child_run import RunProcessError, SubprocessRunner
from observability.metrics import Metrics
from persistence import runs
from tests.helpers import (
    count,
    csv_entry,
    csv_rows,
    db_metric_samples,
    make_settings,
    wait_for,
    write_csv,
    write_sources,
)


async def _stored_any(pool: asyncpg.Pool[Any]) -> bool:
    return await count(pool, "raw_csv_data") > 0


def _runner(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any], rows: list[tuple[str, str, str]]
) -> SubprocessRunner:
    write_csv(tmp_path / "data.csv", rows)
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "data.csv"))
    settings = make_settings(sources_file, DATABASE_URL=database_url, ETL_BATCH_SIZE=2000)
    return SubprocessRunner(settings, pool, Metrics())


async def _committing(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> tuple[SubprocessRunner, asyncio.Task[dict[str, Any]]]:
    """A run of 300,000 CSV rows in a child, once its first batch has committed."""
    runner = _runner(tmp_path, database_url, pool, csv_rows(300_000))
    task = asyncio.create_task(runner.run("schedule"))
    await wait_for(lambda: _stored_any(pool), within=30)
    return runner, task


def _zombies_of_this_process() -> list[int]:
    found = []
    for folder in Path("/proc").glob("[0-9]*"):
        try:
            fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(folder.name))
    return found


async def _closed_as_interrupted(pool: asyncpg.Pool[Any]) -> None:
    run = await pool.fetchrow("SELECT status, error, finished_at FROM etl_runs")
    assert (run["status"], run["error"]) == ("failed", "interrupted")
    assert run["finished_at"] is not None
    source = await pool.fetchrow("SELECT status, error, raw_inserted FROM etl_run_sources")
    assert (source["status"], source["error"]) == ("failed", "interrupted")
    assert source["raw_inserted"] == await count(pool, "raw_csv_data") > 0
    assert await count(pool, "etl_leases") == 0


async def test_a_run_in_a_child_returns_its_run_object_and_counts_its_metrics(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    rows = [*csv_rows(40), ("", "1.0", "2026-01-01T00:00:00Z")]  # one rejected row
    runner = _runner(tmp_path, database_url, pool, rows)

    run = msgspec.to_builtins(await runner.run("schedule"))

    assert run["trigger"] == "schedule"
    assert run["status"] == "partial"
    csv = run["sources"]["csv"]
    assert (csv["fetched"], csv["raw_inserted"], csv["rejected"], csv["unified_upserted"]) == (
        41,
        41,
        1,
        40,
    )
    stored = msgspec.to_builtins(await runs.get_run(pool, uuid.UUID(run["id"])))
    assert stored is not None
    assert (stored["status"], stored["sources"]) == (run["status"], run["sources"])
    samples = await db_metric_samples(pool, ["csv"])
    assert samples[("etl_runs_total", (("status", "partial"),))] == 1
    assert samples[("etl_records_total", (("source", "csv"), ("stage", "fetched")))] == 41
    assert samples[("etl_unified_records", ())] == 40
    assert samples[("etl_run_in_progress", ())] == 0
    assert not runner.running
    assert _zombies_of_this_process() == []


async def test_a_child_that_finds_every_source_busy_records_and_counts_nothing(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, pool, csv_rows(10))
    holder = uuid.uuid4()
    async with pool.acquire() as conn:
        await runs.open_run(conn, holder, "other", ["csv"], owner="x:1", lease_seconds=600)

    result = msgspec.to_builtins(await runner.run("schedule"))

    assert result == {
        "status": "skipped",
        "sources": {"csv": {"status": "busy", "held_by": str(holder)}},
    }
    assert await count(pool, "etl_runs") == 1
    samples = await db_metric_samples(pool, ["csv"])
    assert samples[("etl_runs_total", (("status", "success"),))] == 0


async def test_a_stop_mid_run_commits_the_batch_in_flight_and_closes_the_run(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner, task = await _committing(tmp_path, database_url, pool)
    runner.request_stop()
    run = msgspec.to_builtins(await asyncio.wait_for(task, timeout=20))

    assert run["status"] == "failed"
    assert run["sources"]["csv"]["error"].startswith("stopped")
    stored = await count(pool, "raw_csv_data")
    assert 0 < stored < 300_000
    assert run["sources"]["csv"]["raw_inserted"] == stored
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 0
    assert await count(pool, "etl_leases") == 0


async def test_a_stop_asked_while_the_child_starts_leaves_nothing_open(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, pool, csv_rows(300_000))
    task = asyncio.create_task(runner.run("startup"))
    await wait_for(lambda: asyncio.sleep(0, runner.pid is not None), within=10)
    runner.request_stop()
    result = msgspec.to_builtins(await asyncio.wait_for(task, timeout=30))

    # Stopped before the run began (nothing recorded), or a run closed as stopped.
    assert result["status"] in ("skipped", "failed")
    assert await count(pool, "raw_csv_data") < 300_000
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 0
    assert await count(pool, "etl_leases") == 0
    assert _zombies_of_this_process() == []


async def test_cancelling_a_run_kills_its_child_reaps_it_and_closes_the_run_at_once(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner, task = await _committing(tmp_path, database_url, pool)
    pid = runner.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # Killed and reaped: no zombie either.
    assert not await asyncio.to_thread(Path(f"/proc/{pid}").exists)
    assert _zombies_of_this_process() == []
    await _closed_as_interrupted(pool)
    assert (await db_metric_samples(pool, ["csv"]))[("etl_run_in_progress", ())] == 0


async def test_a_child_killed_from_outside_has_its_run_closed_at_once(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    # The out-of-memory killer, say: the service learns it from the exit status.
    runner, task = await _committing(tmp_path, database_url, pool)
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)
    with pytest.raises(RunProcessError, match="killed by signal 9"):
        await asyncio.wait_for(task, timeout=30)

    assert _zombies_of_this_process() == []
    await _closed_as_interrupted(pool)


async def test_nothing_a_killed_child_sent_commits_after_its_run_is_closed(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    # A backend learns that its client is gone only when it next reads from it:
    # one waiting for a lock when the child is killed goes on with its batch as
    # soon as the lock is free. The closed run source refuses it.
    _, task = await _committing(tmp_path, database_url, pool)
    blocker = await asyncpg.connect(database_url)
    try:
        locked = blocker.transaction()
        await locked.start()
        # Writes to the raw table wait behind this; reads do not.
        await blocker.execute("LOCK TABLE raw_csv_data IN SHARE MODE")

        async def batch_waits() -> bool:
            waiting: int = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%raw_csv_data%'"
            )
            return waiting > 0

        await wait_for(batch_waits, within=30)
        stored = await count(pool, "raw_csv_data")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = await pool.fetchval("SELECT status FROM etl_run_sources")
        assert status == "failed"
        await locked.rollback()
    finally:
        await blocker.close()

    async def dead_sessions_gone() -> bool:
        left: int = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state <> 'idle' AND pid <> pg_backend_pid()"
        )
        return left == 0

    await wait_for(dead_sessions_gone, within=30)
    assert await count(pool, "raw_csv_data") == stored
    await _closed_as_interrupted(pool)


async def test_a_database_that_cannot_be_reached_is_one_expected_error(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = _runner(tmp_path, database_url, pool, csv_rows(5))
    runner.settings = dataclasses.replace(
        runner.settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres"
    )
    with pytest.raises(RunProcessError, match=r"Connect call failed|refused"):
        await runner.run("schedule")
    samples = await db_metric_samples(pool, ["csv"])
    assert samples[("etl_runs_total", (("status", "failed"),))] == 0
