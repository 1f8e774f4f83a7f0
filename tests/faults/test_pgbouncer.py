"""Fault scenarios behind a real PgBouncer, in session and in transaction mode.

- SIGKILL ``etl run`` at random moments of a CSV ingestion, then resume: after
  each kill exactly what the checkpoint covers is stored; the exact audit at
  the end.
- Two ``serve`` replicas, CSV growing: never two running run sources for one
  source; the exact audit at the end.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.faults.audit import SourceInput, audit, note
from tests.faults.conftest import ServeProcess, csv_records, csv_text
from tests.helpers import (
    REPO_ROOT,
    cli_env,
    csv_entry,
    kasparro_command,
    row_end_offsets,
    run_cli,
    write_sources,
)
from tests.pgbouncer import PgBouncer

CSV_MAPPING = {"name": "name", "value": "value", "observed_at": "updated_at"}


async def _wait(conn: asyncpg.Connection, query: str, within: float, what: str) -> None:
    started = time.monotonic()
    while await conn.fetchval(query):
        assert time.monotonic() - started < within, f"{what} not within {within} s"
        await asyncio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigkill_then_resume_through_pgbouncer_loses_and_duplicates_nothing(
    database_url: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    began = time.monotonic()
    rng = random.Random(20261201)
    rows = csv_records(120_000)
    data = tmp_path / "large.csv"
    data.write_text(csv_text(rows, header=True), encoding="utf-8")
    ends = row_end_offsets(data)
    env = cli_env(
        pgbouncer.url(database_url),
        write_sources(tmp_path, csv_entry(data)),
        ETL_BATCH_SIZE=2000,
        ETL_LEASE_SECONDS=1,
        **pgbouncer.settings(),
    )
    conn = await asyncpg.connect(database_url)
    outcomes: list[str] = []
    try:
        for attempt in range(3):
            before: int = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
            goal = ends[min(before + rng.randint(2_000, 20_000), len(rows)) - 1]
            with (tmp_path / f"kill-{attempt}.err").open("wb") as err:
                victim = subprocess.Popen(  # noqa: ASYNC220 - killed while it runs
                    kasparro_command("etl", "run"),
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
                spawned = time.monotonic()
                while victim.poll() is None and (
                    await conn.fetchval(
                        "SELECT coalesce(max((cursor->>'offset')::bigint), 0) "
                        "FROM etl_checkpoint WHERE source = 'csv'"
                    )
                    < goal
                ):
                    assert time.monotonic() - spawned < 60, "no progress before the kill"
                    await asyncio.sleep(0.005)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                ended_by_itself = victim.poll() is not None
                victim.kill()
                victim.wait(timeout=30)
            assert not ended_by_itself, (tmp_path / f"kill-{attempt}.err").read_text()[-2000:]
            await _wait(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle'",
                30,
                "the killed run's statements to end",
            )
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                stored: int = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
                text = await conn.fetchval(
                    "SELECT cursor::text FROM etl_checkpoint WHERE source = 'csv'"
                )
            offset = json.loads(text)["offset"] if text else 0
            covered = bisect.bisect_right(ends, offset)
            assert stored == covered, (
                f"kill {attempt}: {stored} raw rows, checkpoint covers {covered}"
            )
            await _wait(
                conn,
                "SELECT count(*) FROM etl_leases WHERE expires_at > now()",
                30,
                "the killed run's lease to expire",
            )
            outcomes.append(f"kill {attempt + 1}: raw {before} -> {stored} (= checkpoint)")

        final = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=180)
        assert "Traceback" not in final.stderr
        run = json.loads(final.stdout)
        assert run["status"] in ("success", "partial"), final.stderr[-2000:]
        outcomes.append(f"final run: {run['status']}, fetched {run['sources']['csv']['fetched']}")
    finally:
        await conn.close()
    note(
        f"kill behind PgBouncer ({pgbouncer.mode} mode)",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"kill behind PgBouncer ({pgbouncer.mode} mode, 3 x SIGKILL during 120k-row CSV)",
        [SourceInput("csv", "raw_csv_data", rows, CSV_MAPPING, {"offset": data.stat().st_size})],
    )


def _append(path: Path, rows: list[dict[str, str]], seconds: float, stop: threading.Event) -> None:
    slices = int(seconds / 0.1)
    per = -(-len(rows) // slices)
    for start in range(0, len(rows), per):
        if stop.is_set():
            return
        with path.open("a", encoding="utf-8") as handle:
            handle.write(csv_text(rows[start : start + per], header=False))
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_replicas_through_pgbouncer_never_ingest_one_source_at_once(
    database_url: str,
    pgbouncer: PgBouncer,
    tmp_path: Path,
    serve: Callable[[dict[str, str]], ServeProcess],
) -> None:
    rows = csv_records(20_000)
    data = tmp_path / "growing.csv"
    data.write_text(csv_text(rows[:5_000], header=True), encoding="utf-8")
    env = cli_env(
        pgbouncer.url(database_url),
        write_sources(tmp_path, csv_entry(data)),
        API_KEY="k",
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS="0.5",
        ETL_BATCH_SIZE=500,
        **pgbouncer.settings(),
    )
    stop = threading.Event()
    appender = threading.Thread(target=_append, args=(data, rows[5_000:], 8.0, stop), daemon=True)
    conn = await asyncpg.connect(database_url)
    violations: list[int] = []
    polls = 0
    try:
        replicas = [serve(env) for _ in range(2)]
        for replica in replicas:
            replica.listening()
        appender.start()
        while appender.is_alive():
            running = await conn.fetchval(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM etl_run_sources "
                "WHERE status = 'running' GROUP BY source) AS c"
            )
            polls += 1
            if running > 1:
                violations.append(running)
            await asyncio.sleep(0.01)
        for replica in replicas:
            answer = await asyncio.to_thread(
                replica.get, "/data?limit=1", headers={"x-api-key": "k"}
            )
            assert answer.status_code == 200, answer.text
        for replica in replicas:
            code, _ = replica.terminate(timeout=20)
            assert code == 0, replica.output()[-3000:]
            assert "Traceback" not in replica.output()
        final = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=120)
        assert json.loads(final.stdout)["status"] in ("success", "partial"), final.stderr
        finished = await conn.fetchval("SELECT count(*) FROM etl_runs")
    finally:
        stop.set()
        if appender.ident is not None:
            appender.join(timeout=30)
        await conn.close()
    assert not violations, violations[:10]
    note(
        f"two replicas behind PgBouncer ({pgbouncer.mode} mode)",
        f"{polls} polls of running run sources: never two for one source; {finished} runs",
    )
    await audit(
        database_url,
        f"two replicas behind PgBouncer ({pgbouncer.mode} mode, CSV growing for 8 s)",
        [SourceInput("csv", "raw_csv_data", rows, CSV_MAPPING, {"offset": data.stat().st_size})],
    )
