"""The service's runs in a child process (pipelines/process.py).

Each test drives :class:`ProcessRunner` as the service's loop does and checks
what a user sees: the run object, the database, the metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
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
from pipelines.priority import _autogroups_on, autogroup_nice
from pipelines.process import ChildCrashError, ProcessRunner
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


async def _committing(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any], trigger: str
) -> tuple[ProcessRunner, asyncio.Task[dict[str, Any]]]:
    """A run of 300,000 CSV rows in a child, once its first batch has committed."""
    runner = _runner(tmp_path, database_url, csv_rows(300_000))
    task = asyncio.create_task(runner.run(trigger))
    await wait_for(lambda: _stored_any(pool), within=30)
    return runner, task


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
    runner, task = await _committing(tmp_path, database_url, pool, "startup")
    runner.request_stop()
    run = await asyncio.wait_for(task, timeout=10)

    assert run["status"] == "failed"
    assert run["sources"]["csv"]["error"].startswith("stopped")
    stored = await count(pool, "raw_csv_data")
    assert 0 < stored < 300_000
    # What was committed is exactly what the run counted.
    assert run["sources"]["csv"]["raw_inserted"] == stored
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 0


async def test_the_child_runs_at_the_nice_value_of_etl_nice_and_so_does_its_session(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    runner = _runner(tmp_path, database_url, csv_rows(300_000))
    runner.settings = dataclasses.replace(runner.settings, etl_nice=13)
    task = asyncio.create_task(runner.run("startup"))
    await wait_for(lambda: _stored_any(pool), within=30)
    pid = runner.pid
    assert pid is not None
    # Field 19 of /proc/PID/stat is the nice value (after the parenthesised name).
    stat = await asyncio.to_thread(Path(f"/proc/{pid}/stat").read_text)
    fields = stat.rsplit(")", 1)[1].split()
    niceness = int(fields[16])
    group = autogroup_nice(pid)
    runner.request_stop()
    await asyncio.wait_for(task, timeout=10)
    assert niceness == max(13, os.getpriority(os.PRIO_PROCESS, 0))
    # The service itself keeps its priority.
    assert os.getpriority(os.PRIO_PROCESS, 0) < 13
    if not _autogroups_on():
        pytest.skip("no autogroups on this kernel")
    # The child leads a session of its own: with autogroups, only the group's
    # nice value moves it against the service (whose group may be the default
    # one, ``None``, which is left alone as well).
    assert group == 13
    assert autogroup_nice(os.getpid()) != 13


_SESSIONS_SCRIPT = """
import asyncio, os, sys
from persistence.database import create_pool
from pipelines.priority import autogroup_nice, lower_priority

async def main(url):
    lower_priority(12)
    run_pool = await create_pool(url, max_size=1, backend_nice=12)
    plain_pool = await create_pool(url, max_size=1)
    try:
        async with run_pool.acquire() as conn, plain_pool.acquire() as plain:
            run_backend, plain_backend = conn.get_server_pid(), plain.get_server_pid()
            print(
                os.getpriority(os.PRIO_PROCESS, run_backend),
                autogroup_nice(run_backend),
                os.getpriority(os.PRIO_PROCESS, plain_backend),
                autogroup_nice(plain_backend),
                autogroup_nice(os.getpid()),
            )
    finally:
        await run_pool.close()
        await plain_pool.close()

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("own_session", [True, False])
async def test_a_runs_sessions_on_this_host_get_its_nice_value_and_its_groups(
    database_url: str, own_session: bool
) -> None:
    from persistence.database import _server_is_local

    if not _server_is_local(database_url):
        pytest.skip("the test database is on another host")
    probe = await asyncpg.connect(database_url)
    try:
        backend = probe.get_server_pid()
        owner = (await asyncio.to_thread(Path(f"/proc/{backend}").stat)).st_uid
    finally:
        await probe.close()
    if os.geteuid() not in (0, owner):
        pytest.skip("the test database's server runs as another user")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _SESSIONS_SCRIPT, database_url],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=own_session,
    )
    assert done.returncode == 0, done.stderr
    run_nice, run_group, plain_nice, plain_group, caller_group = done.stdout.split()
    assert (run_nice, plain_nice) == ("12", "0")
    if not _autogroups_on():
        pytest.skip("no autogroups on this kernel: the nice values alone order processes")
    # A backend's autogroup goes exactly as far as its caller's own group: the
    # caller leading its session went to 12; one in its parent's session keeps
    # that session's group (``None`` for the default autogroup, the root group,
    # where a backend's group stays at 0).
    ours = autogroup_nice(os.getpid())
    assert caller_group == ("12" if own_session else str(ours))
    assert run_group == ("12" if own_session else str(ours or 0))
    assert plain_group == "0"


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
    runner, task = await _committing(tmp_path, database_url, pool, "startup")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The child is gone, and its sessions with it: the run was closed at once.
    assert await _interrupted_runs(pool) == 1
    async with pool.acquire() as conn:
        assert await runs.close_interrupted_runs(conn) == []
    assert _samples(runner.metrics)[("etl_run_in_progress", ())] == 0


async def _interrupted_runs(pool: asyncpg.Pool[Any]) -> int:
    """Runs closed as interrupted; a run still ``running`` fails the count."""
    rows = await pool.fetch("SELECT status, error FROM etl_runs")
    assert all(row["status"] != "running" for row in rows)
    return sum((row["status"], row["error"]) == ("failed", "interrupted") for row in rows)


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


_RUN_SESSIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'kasparro-run-%'
"""


async def test_a_killed_childs_sessions_end_with_it_so_nothing_it_sent_commits_later(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    # A backend learns that its client is gone only when it next reads from it:
    # one waiting for a lock when the child is killed would otherwise write its
    # batch as soon as the lock is free, and hold the run's lock until then.
    _, task = await _committing(tmp_path, database_url, pool, "startup")
    blocker = await asyncpg.connect(database_url)
    try:
        locked = blocker.transaction()
        await locked.start()
        # Writes to the raw table wait behind this; reads do not.
        await blocker.execute("LOCK TABLE raw_csv_data IN SHARE MODE")

        async def child_waits() -> bool:
            waiting = await pool.fetchval(_RUN_SESSIONS + " AND wait_event_type = 'Lock'")
            return bool(waiting)

        await wait_for(child_waits, within=30)
        stored = await count(pool, "raw_csv_data")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await pool.fetchval(_RUN_SESSIONS) == 0
        await locked.rollback()
    finally:
        await blocker.close()
    await asyncio.sleep(0.5)
    assert await count(pool, "raw_csv_data") == stored
    assert await _interrupted_runs(pool) == 1


async def test_a_child_killed_from_outside_has_its_run_closed_at_once(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    # The out-of-memory killer, say: the service learns it from the exit status
    # and closes the run then, not at the next run or start.
    runner, task = await _committing(tmp_path, database_url, pool, "schedule")
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)
    with pytest.raises(ChildCrashError, match="exited with -9"):
        await asyncio.wait_for(task, timeout=30)

    assert await pool.fetchval(_RUN_SESSIONS) == 0
    run = await pool.fetchrow("SELECT status, error, finished_at FROM etl_runs")
    assert (run["status"], run["error"]) == ("failed", "interrupted")
    assert run["finished_at"] is not None
    source = await pool.fetchrow("SELECT status, error, raw_inserted FROM etl_run_sources")
    assert (source["status"], source["error"]) == ("failed", "interrupted")
    assert source["raw_inserted"] == await count(pool, "raw_csv_data") > 0
