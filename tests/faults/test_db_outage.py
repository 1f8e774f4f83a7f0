"""Database outage: the connection between ``serve`` and PostgreSQL is cut mid-run.

A TCP proxy the test controls sits in front of PostgreSQL. While the startup
run ingests, the proxy drops every connection and refuses new ones for a few
seconds, then forwards again. The cut run must end ``failed`` with a clear
error (or be closed as ``interrupted`` by the next run), ``/health`` must say
503 during the outage and 200 after it without a restart, and a later run of
the loop must complete the input. Then the audit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.faults.audit import SourceInput, audit, note
from tests.faults.conftest import ServeProcess, csv_records, csv_text
from tests.helpers import cli_env, csv_entry, write_sources
from tests.pg_proxy import PgProxy

ROWS = 150_000
OUTAGE_SECONDS = 3.0
KEY = "fault-outage-key"
CSV_MAPPING = {"name": "name", "value": "value", "observed_at": "updated_at"}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attempt", range(3))
async def test_cut_connection_fails_the_run_health_recovers_and_the_next_run_completes(
    database_url: str,
    tmp_path: Path,
    pg_proxy: PgProxy,
    serve: Callable[[dict[str, str]], ServeProcess],
    attempt: int,
) -> None:
    began = time.monotonic()
    rows = csv_records(ROWS)
    data = tmp_path / "large.csv"
    data.write_text(csv_text(rows, header=True), encoding="utf-8")
    env = cli_env(
        pg_proxy.url,
        write_sources(tmp_path, csv_entry(data)),
        API_KEY=KEY,
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS=2,
        ETL_BATCH_SIZE=2000,
    )
    outcomes: list[str] = []
    conn = await asyncpg.connect(database_url)  # the test's own line, not through the proxy
    try:
        served = serve(env)
        served.listening()
        assert served.get("/health").status_code == 200

        deadline = time.monotonic() + 30
        while await conn.fetchval("SELECT count(*) FROM raw_csv_data") == 0:
            assert time.monotonic() < deadline, served.output()[-2000:]
            await asyncio.sleep(0.02)
        cut_run = await conn.fetchval("SELECT id FROM etl_runs WHERE status = 'running'")
        assert cut_run is not None
        dropped = pg_proxy.cut()
        cut_at = time.monotonic()
        at_cut = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
        outcomes.append(f"cut with {at_cut} raw rows committed; {dropped} connections dropped")

        down = served.poll("/health", lambda r: r.status_code == 503, timeout=10)
        assert down.json()["status"] == "degraded"
        assert down.json()["db"] == "down"
        outcomes.append(
            f"/health 503 {down.json()} {time.monotonic() - cut_at:.2f} s after the cut"
        )
        while time.monotonic() - cut_at < OUTAGE_SECONDS:
            assert served.get("/health").status_code == 503
            assert served.get("/").status_code == 200
            data_page = served.get("/data", headers={"x-api-key": KEY})
            assert data_page.status_code == 503, data_page.text
            await asyncio.sleep(0.2)
        outcomes.append(f"/ 200 and /data 503 {data_page.json()} throughout the outage")

        pg_proxy.restore()
        restored_at = time.monotonic()
        up = served.poll("/health", lambda r: r.status_code == 200, timeout=15)
        outcomes.append(
            f"/health 200 {time.monotonic() - restored_at:.2f} s after the restore "
            f"(last_etl {up.json()['last_etl']})"
        )

        # The cut run is closed (by itself, or as interrupted by the next run), and a
        # later run of the loop completes the input.
        size = data.stat().st_size

        async def completed() -> bool:
            offset = await conn.fetchval(
                "SELECT (cursor->>'offset')::bigint FROM etl_checkpoint WHERE source = 'csv'"
            )
            cut_status = await conn.fetchval("SELECT status FROM etl_runs WHERE id = $1", cut_run)
            later = await conn.fetchval(
                "SELECT count(*) FROM etl_runs WHERE status IN ('success', 'partial') "
                "AND started_at > (SELECT started_at FROM etl_runs WHERE id = $1)",
                cut_run,
            )
            return offset == size and cut_status != "running" and later > 0

        deadline = time.monotonic() + 60
        while not await completed():
            assert served.process.poll() is None, served.output()[-3000:]
            assert time.monotonic() < deadline, served.output()[-3000:]
            await asyncio.sleep(0.1)
        outcomes.append(f"input completed {time.monotonic() - restored_at:.2f} s after the restore")

        cut = await conn.fetchrow(
            "SELECT r.status, r.error, s.status AS source_status, s.error AS source_error "
            "FROM etl_runs r JOIN etl_run_sources s ON s.run_id = r.id WHERE r.id = $1",
            cut_run,
        )
        assert cut["status"] == "failed"
        clear = (cut["error"] == "interrupted") or (cut["source_error"] or "").startswith(
            "database error"
        )
        assert clear, dict(cut)
        outcomes.append(
            f"cut run: {cut['status']}, run error {cut['error']!r}, "
            f"source error {cut['source_error']!r}"
        )
        later_runs = await conn.fetch(
            "SELECT status, trigger FROM etl_runs WHERE started_at > "
            "(SELECT started_at FROM etl_runs WHERE id = $1) ORDER BY started_at",
            cut_run,
        )
        outcomes.append(
            "later runs: " + ", ".join(f"{r['trigger']} {r['status']}" for r in later_runs)
        )
        healthy = served.poll(
            "/health", lambda r: r.status_code == 200 and r.json()["last_etl"] != "running", 15
        )
        outcomes.append(f"/health at the end: {healthy.json()}")

        code, took = served.terminate(timeout=15)
        assert code == 0
        output = served.output()
        loop_events = sorted(
            {str(e.get("event")) for e in served.events if e.get("level") in ("error", "warning")}
        )
        outcomes.append(f"serve exit {code} in {took:.2f} s; warning/error events: {loop_events}")
        outcomes.append(
            "tracebacks in the log: "
            + str(output.count("Traceback"))
            + " (the cut surfaces as logged errors with exc_info)"
        )
    finally:
        await conn.close()

    note(
        f"database outage, pass {attempt + 1}",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"database outage, pass {attempt + 1} (connection cut mid-run, restored after 3 s)",
        [SourceInput("csv", "raw_csv_data", rows, CSV_MAPPING, {"offset": data.stat().st_size})],
    )
