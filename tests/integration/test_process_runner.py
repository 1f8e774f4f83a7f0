"""The service's runs in a child process (pipelines/process.py).

Each test drives :class:`ProcessRunner` as the service's loop does and checks
what a user sees: the run object, the database, the metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observability.metrics import Metrics
from persistence import runs
from pipelines.config import load_sources
from pipelines.errors import DatabaseUnavailableError
from pipelines.process import ProcessRunner
from tests.helpers import (
    count,
    csv_entry,
    csv_rows,
    make_settings,
    wait_for,
    write_csv,
    write_sources,
)


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def _stored_any(pool: asyncpg.Pool[Any]) -> bool:
    return await count(pool, "raw_csv_data") > 0


def _runner(tmp_path: Path, database_url: str, rows: list[tuple[str, str, str]]) -> ProcessRunner:
    write_csv(tmp_path / "data.csv", rows)
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "data.csv"))
    settings = make_settings(sources_file, DATABASE_URL=database_url)
    return ProcessRunner(settings, load_sources(settings), Metrics())


async def test_a_run_in_a_child_returns_its_run_object_and_counts_its_metrics(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    rows = [*csv_rows(40), ("", "1.0", "2026-01-01T00:00:00Z")]  # one rejected row
    runner = _runner(tmp_path, database_url, rows)

    run = await runner.run("schedule")

    assert run["trigger"] == "schedule"
    assert run["status"] == "partial"
    csv = run["sources"]["csv"]
    assert (csv["fetched"], csv["raw_inserted"], csv["rejected"], csv["unified_upserted"]) == (
        41,
        41,
        1,
        40,
    )
    stored = await runs.get_run(pool, uuid.UUID(run["id"]))
    assert stored is not None
    assert (stored["status"], stored["sources"]) == (run["status"], run["sources"])
    assert await count(pool, "raw_csv_data") == 41
    samples = _samples(runner.metrics)
    assert samples[("etl_runs_total", (("status", "partial"),))] == 1
    assert samples[("etl_records_total", (("source", "csv"), ("stage", "fetched")))] == 41
    assert samples[("etl_records_total", (("source", "csv"), ("stage", "rejected")))] == 1
    assert samples[("etl_records_total", (("source", "csv"), ("stage", "unified_upserted")))] == 40
    assert samples[("etl_duration_seconds_count", ())] == 1
    assert samples[("etl_unified_records", ())] == 40
    assert samples[("etl_run_in_progress", ())] == 0
    assert ("etl_last_success_timestamp_seconds", (("source", "csv"),)) in samples
    assert not runner.running


async def test_a_stop_mid_run_commits_the_batch_in_flight_and_closes_the_run(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, csv_rows(300_000))
    task = asyncio.create_task(runner.run("startup"))
    await wait_for(lambda: _stored_any(pool), within=30)
    runner.request_stop()
    run = await asyncio.wait_for(task, timeout=10)

    assert run["status"] == "failed"
    assert run["sources"]["csv"]["error"].startswith("stopped")
    stored = await count(pool, "raw_csv_data")
    assert 0 < stored < 300_000
    # What was committed is exactly what the run counted.
    assert run["sources"]["csv"]["raw_inserted"] == stored
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 0


async def test_a_stop_asked_while_the_child_starts_is_not_lost(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, csv_rows(300_000))
    task = asyncio.create_task(runner.run("startup"))
    await asyncio.sleep(0.05)  # the child exists, or is about to, and is still importing
    runner.request_stop()
    run = await asyncio.wait_for(task, timeout=30)

    assert run["status"] == "failed"
    assert run["sources"]["csv"]["error"].startswith("stopped")
    assert await count(pool, "raw_csv_data") < 300_000
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 0


async def test_cancelling_a_run_kills_its_child_and_frees_the_run(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, csv_rows(300_000))
    task = asyncio.create_task(runner.run("startup"))
    await wait_for(lambda: _stored_any(pool), within=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The child is gone, so its advisory lock is: the run can be closed at once.
    async with pool.acquire() as conn:
        closed = await runs.close_interrupted_runs(conn)
    assert len(closed) == 1
    assert _samples(runner.metrics)[("etl_run_in_progress", ())] == 0


async def test_a_database_that_cannot_be_reached_is_one_expected_error(
    tmp_path: Path, database_url: str
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = _runner(tmp_path, database_url, csv_rows(5))
    runner.settings = dataclasses.replace(
        runner.settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres"
    )
    with pytest.raises(DatabaseUnavailableError, match="database unavailable"):
        await runner.run("schedule")
    assert ("etl_runs_total", (("status", "failed"),)) not in _samples(runner.metrics)
