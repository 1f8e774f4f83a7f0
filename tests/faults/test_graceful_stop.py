"""Graceful stop: SIGTERM ``serve`` during its startup run, five times in a row.

Each stop must exit 0 within 10 s and close its run (never left ``running``);
what was committed is exactly what the checkpoint covers. A final ``etl run``
completes the input, then the audit.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.faults.audit import SourceInput, audit, note
from tests.faults.conftest import ServeProcess, csv_records, csv_text
from tests.helpers import cli_env, csv_entry, row_end_offsets, run_cli, write_sources

ROWS = 300_000
STOPS = 5
SEED = 7
KEY = "fault-graceful-key"
CSV_MAPPING = {"name": "name", "value": "value", "observed_at": "updated_at"}


async def _wait(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within, f"{what} not within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("attempt", range(3))
async def test_sigterm_during_a_run_exits_0_and_loses_nothing(
    database_url: str,
    tmp_path: Path,
    serve: Callable[[dict[str, str]], ServeProcess],
    attempt: int,
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED + attempt)
    rows = csv_records(ROWS)
    data = tmp_path / "large.csv"
    data.write_text(csv_text(rows, header=True), encoding="utf-8")
    ends = row_end_offsets(data)
    env = cli_env(
        database_url,
        write_sources(tmp_path, csv_entry(data)),
        API_KEY=KEY,
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS=0,
        ETL_BATCH_SIZE=2000,
    )
    conn = await asyncpg.connect(database_url)
    outcomes: list[str] = []
    try:

        async def raw_count() -> int:
            n: int = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
            return n

        for stop in range(STOPS):
            before = await raw_count()
            served = serve(env)
            served.listening()

            async def progressed(floor: int = before, served: ServeProcess = served) -> bool:
                assert served.process.poll() is None, served.output()[-2000:]
                return await raw_count() > floor

            await _wait(progressed, 30, "a committed batch")
            await asyncio.sleep(rng.uniform(0.0, 0.8))
            code, took = served.terminate(timeout=15)
            output = served.output()
            assert code == 0, output[-3000:]
            assert took < 10, f"stop {stop} took {took:.2f} s"
            assert "Traceback" not in output, output
            assert any(e.get("event") == "service_stopped" for e in served.events)

            async def sessions_gone() -> bool:
                n: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                return n == 0

            await _wait(sessions_gone, 10, "the stopped service's sessions to end")
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                stored = await raw_count()
                text = await conn.fetchval(
                    "SELECT cursor::text FROM etl_checkpoint WHERE source = 'csv'"
                )
                run = await conn.fetchrow(
                    "SELECT r.status, r.error, s.status AS source_status, s.error AS source_error "
                    "FROM etl_runs r JOIN etl_run_sources s ON s.run_id = r.id "
                    "ORDER BY r.started_at DESC LIMIT 1"
                )
            offset = json.loads(text)["offset"] if text else 0
            covered = bisect.bisect_right(ends, offset)
            assert offset == 0 or ends[covered - 1] == offset, f"offset {offset} is mid-row"
            assert stored == covered, f"stop {stop}: {stored} raw rows, checkpoint covers {covered}"
            assert stored < ROWS, "the input was finished before the stop: use a larger file"
            assert run is not None
            assert run["status"] != "running", f"stop {stop} left its run running"
            outcomes.append(
                f"SIGTERM {stop + 1}: exit {code} in {took:.2f} s; raw {before} -> {stored} "
                f"(= rows before checkpoint offset {offset}); run {run['status']} "
                f"({run['error'] or run['source_error']})"
            )

        final = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=180)
        assert "Traceback" not in final.stderr
        result = json.loads(final.stdout)
        csv = result["sources"]["csv"]
        expected_status = "partial" if csv["rejected"] else "success"
        assert result["status"] == expected_status
        assert final.returncode == {"success": 0, "partial": 3}[expected_status]
        outcomes.append(
            f"final run: {result['status']} (exit {final.returncode}), fetched {csv['fetched']}, "
            f"new {csv['raw_inserted']}, duplicates {csv['duplicates']}"
        )
    finally:
        await conn.close()

    note(
        f"graceful stop, pass {attempt + 1}",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"graceful stop, pass {attempt + 1} (5 x SIGTERM during serve's startup run)",
        [SourceInput("csv", "raw_csv_data", rows, CSV_MAPPING, {"offset": data.stat().st_size})],
    )
