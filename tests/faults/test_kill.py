"""Kill: SIGKILL ``etl run`` at 10 random moments of a 300k-row CSV ingestion.

After each kill the database must be exactly consistent: the raw rows are the
rows before the committed checkpoint offset, no more, no less. The process is
restarted each time; a final run completes the input, then the audit.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest

from tests.faults.audit import SourceInput, audit, note
from tests.faults.conftest import csv_records, csv_text
from tests.helpers import (
    REPO_ROOT,
    cli_env,
    csv_entry,
    kasparro_command,
    row_end_offsets,
    run_cli,
    write_sources,
)

ROWS = 300_000
KILLS = 10
SEED = 20260611
CSV_MAPPING = {"name": "name", "value": "value", "observed_at": "updated_at"}


async def _other_sessions(conn: asyncpg.Connection) -> int:
    """Sessions on the test database besides ours (the killed process's, until the
    server notices it is gone)."""
    others: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return others


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("attempt_set", range(3))
async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    database_url: str, tmp_path: Path, attempt_set: int
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED + attempt_set)
    rows = csv_records(ROWS)
    data = tmp_path / "large.csv"
    data.write_text(csv_text(rows, header=True), encoding="utf-8")
    ends = row_end_offsets(data)
    env = cli_env(
        database_url,
        write_sources(tmp_path, csv_entry(data)),
        ETL_BATCH_SIZE=2000,
        ETL_LEASE_SECONDS=1,
    )

    conn = await asyncpg.connect(database_url)
    outcomes: list[str] = []
    try:
        for attempt in range(KILLS):
            # A random moment: one kill in five lands in start-up (imports,
            # migrations, opening the run); the others after a random number of
            # rows has committed in this process, plus a random few milliseconds,
            # so they hit every phase of a batch (read, transform, write, commit).
            before: int = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
            early = rng.random() < 0.2
            delay = rng.uniform(0.2, 1.2) if early else rng.uniform(0.0, 0.05)
            target = before + rng.randint(1, 25_000)
            with (tmp_path / f"kill-{attempt}.err").open("wb") as err:
                victim = subprocess.Popen(  # noqa: ASYNC220 - killed while it runs
                    kasparro_command("etl", "run"),
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
                spawned = time.monotonic()
                if not early:
                    # The committed offset is a cheap proxy for the committed rows.
                    goal = ends[min(target, ROWS) - 1]
                    while victim.poll() is None and (
                        await conn.fetchval(
                            "SELECT coalesce(max((cursor->>'offset')::bigint), 0) "
                            "FROM etl_checkpoint WHERE source = 'csv'"
                        )
                        < goal
                    ):
                        assert time.monotonic() - spawned < 60, "no progress before the kill"
                        await asyncio.sleep(0.005)
                await asyncio.sleep(delay)
                ended_by_itself = victim.poll() is not None
                victim.kill()
                victim.wait(timeout=30)
                moment = time.monotonic() - spawned
            assert not ended_by_itself, f"run {attempt} finished before its kill at {moment:.2f} s"

            # The server drops the dead client's sessions; until every one is gone
            # a COMMIT one of them had received may still land, so wait for all.
            waited = time.monotonic()
            while await _other_sessions(conn):
                assert time.monotonic() - waited < 30, "sessions of the killed run linger"
                await asyncio.sleep(0.01)
            released = time.monotonic() - waited
            # Exactly what the checkpoint covers is stored (one snapshot for both).
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                stored: int = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
                text = await conn.fetchval(
                    "SELECT cursor::text FROM etl_checkpoint WHERE source = 'csv'"
                )
                running: int = await conn.fetchval(
                    "SELECT count(*) FROM etl_runs WHERE status = 'running'"
                )
            offset = json.loads(text)["offset"] if text else 0
            covered = bisect.bisect_right(ends, offset)
            assert offset == 0 or ends[covered - 1] == offset, f"offset {offset} is mid-row"
            assert stored == covered, (
                f"kill {attempt}: {stored} raw rows, checkpoint covers {covered}"
            )
            assert running <= 1
            # The dead run's lease keeps the source busy until it expires.
            while await conn.fetchval("SELECT count(*) FROM etl_leases WHERE expires_at > now()"):
                assert time.monotonic() - waited < 30, "the killed run's lease never expired"
                await asyncio.sleep(0.05)
            outcomes.append(
                f"kill {attempt + 1} at {moment:.2f} s "
                f"({'in start-up' if early else f'past {target - before} new rows'}): "
                f"raw {before} -> {stored} "
                f"(= rows before checkpoint offset {offset}); runs left running {running}; "
                f"its sessions gone after {released:.2f} s"
            )

        final = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=180)
        assert "Traceback" not in final.stderr
        run = json.loads(final.stdout)
        csv = run["sources"]["csv"]
        expected_status = "partial" if csv["rejected"] else "success"
        assert run["status"] == expected_status
        assert final.returncode == {"success": 0, "partial": 3}[expected_status]
        outcomes.append(
            f"final run: {run['status']} (exit {final.returncode}), fetched {csv['fetched']}, "
            f"new {csv['raw_inserted']}, duplicates {csv['duplicates']}"
        )
        interrupted: int = await conn.fetchval(
            "SELECT count(*) FROM etl_runs WHERE status = 'failed' AND error = 'interrupted'"
        )
        opened: int = await conn.fetchval("SELECT count(*) FROM etl_runs")
        outcomes.append(f"runs: {opened} recorded, {interrupted} closed as 'interrupted'")
    finally:
        await conn.close()

    note(
        f"kill, pass {attempt_set + 1}",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"kill, pass {attempt_set + 1} (10 x SIGKILL during 300k-row CSV)",
        [SourceInput("csv", "raw_csv_data", rows, CSV_MAPPING, {"offset": data.stat().st_size})],
    )
