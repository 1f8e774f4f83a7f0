"""Replicas: three ``serve`` processes on one database, each running every second.

While rows are appended to the CSV for ~20 s, the test polls the database every
few milliseconds: at no moment may two run sources be ``running`` for the same
source (the per-source lease). All three must serve ``/data``. After a
graceful stop of all three and a final run, the audit: nothing duplicated,
nothing lost.

Then three replicas whose one source always fails: the attempts that find it
busy are no runs, so ``success`` never shows anywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.faults.audit import SourceInput, audit, note
from tests.faults.conftest import ServeProcess, csv_records, csv_text
from tests.helpers import (
    api_entry,
    cli_env,
    coin,
    csv_entry,
    json_entry,
    run_cli,
    write_json_array,
    write_sources,
)

REPLICAS = 3
TOTAL_ROWS = 40_000
INITIAL_ROWS = 10_000
APPEND_SECONDS = 20.0
APPEND_EVERY = 0.1
KEY = "fault-replica-key"
CSV_FIELDS = {"name": "name", "value": "value", "observed_at": "updated_at"}
JSON_FIELDS = {"name": "name", "value": "current_price", "observed_at": "last_updated"}


def _append(path: Path, rows: list[dict[str, str]], stop: threading.Event) -> None:
    """Append ``rows`` in equal slices over APPEND_SECONDS, one write per slice."""
    slices = int(APPEND_SECONDS / APPEND_EVERY)
    per = -(-len(rows) // slices)
    for start in range(0, len(rows), per):
        if stop.is_set():
            return
        with path.open("a", encoding="utf-8") as handle:
            handle.write(csv_text(rows[start : start + per], header=False))
        time.sleep(APPEND_EVERY)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attempt", range(3))
async def test_three_replicas_never_ingest_one_source_twice(
    database_url: str,
    tmp_path: Path,
    serve: Callable[[dict[str, str]], ServeProcess],
    attempt: int,
) -> None:
    began = time.monotonic()
    rows = csv_records(TOTAL_ROWS)
    data = tmp_path / "growing.csv"
    data.write_text(csv_text(rows[:INITIAL_ROWS], header=True), encoding="utf-8")
    coins = [coin(f"Coin {i}", 1000.0 + i, "2026-06-01T00:00:00Z") for i in range(0, 400, 4)]
    write_json_array(tmp_path / "third.json", coins)
    sources = write_sources(tmp_path, csv_entry(data), json_entry(tmp_path / "third.json"))
    env = cli_env(
        database_url,
        sources,
        API_KEY=KEY,
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS=1,
        ETL_BATCH_SIZE=500,
    )
    outcomes: list[str] = []
    conn = await asyncpg.connect(database_url)
    stop_appending = threading.Event()
    appender = threading.Thread(
        target=_append, args=(data, rows[INITIAL_ROWS:], stop_appending), daemon=True
    )
    try:
        replicas = [serve(env) for _ in range(REPLICAS)]
        for replica in replicas:
            replica.listening()
        appender.start()

        polls = 0
        peak: Counter[str] = Counter()
        violations: list[str] = []
        data_ok = Counter[int]()
        next_read = time.monotonic()
        while appender.is_alive():
            for row in await conn.fetch(
                "SELECT source, count(*) AS n FROM etl_run_sources "
                "WHERE status = 'running' GROUP BY source"
            ):
                peak[row["source"]] = max(peak[row["source"]], row["n"])
                if row["n"] > 1:
                    violations.append(f"{row['n']} running for {row['source']}")
            polls += 1
            if time.monotonic() >= next_read:
                for index, replica in enumerate(replicas):
                    response = await asyncio.to_thread(
                        replica.get, "/data?limit=5", headers={"x-api-key": KEY}
                    )
                    assert response.status_code == 200, response.text
                    data_ok[index] += 1
                next_read = time.monotonic() + 2.0
            await asyncio.sleep(0.01)
        assert not violations, violations[:10]
        outcomes.append(
            f"{polls} polls of running run sources over {APPEND_SECONDS:g} s of appends: "
            f"most running at once per source {dict(peak)} (never 2)"
        )
        outcomes.append(f"/data answered 200 on every replica: {dict(data_ok)} reads each")

        size = data.stat().st_size
        deadline = time.monotonic() + 60
        while (
            await conn.fetchval(
                "SELECT (cursor->>'offset')::bigint FROM etl_checkpoint WHERE source = 'csv'"
            )
            != size
        ):
            assert time.monotonic() < deadline, "the replicas did not catch up with the file"
            await asyncio.sleep(0.1)
        for index, replica in enumerate(replicas):
            totals = await asyncio.to_thread(
                replica.get, "/data?limit=1", headers={"x-api-key": KEY}
            )
            assert totals.status_code == 200
            outcomes.append(
                f"replica {index + 1}: /data total {totals.json()['pagination']['total']}"
            )

        for index, replica in enumerate(replicas):
            code, took = replica.terminate(timeout=15)
            assert code == 0
            finished = [e for e in replica.events if e.get("event") == "etl_run_finished"]
            ingested = Counter(
                name
                for e in finished
                for name, s in (e.get("sources") or {}).items()
                if s.get("fetched")
            )
            skipped = sum(1 for e in replica.events if e.get("event") == "source_skipped_busy")
            output = replica.output()
            assert "Traceback" not in output, output[-3000:]
            outcomes.append(
                f"replica {index + 1}: {len(finished)} runs, runs that read new rows per source "
                f"{dict(ingested)}, {skipped} sources skipped as locked by another; "
                f"SIGTERM exit {code} in {took:.2f} s"
            )

        final = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=60)
        run = json.loads(final.stdout)
        outcomes.append(
            f"final run: {run['status']}; fetched "
            + ", ".join(f"{k} {v['fetched']}" for k, v in run["sources"].items())
        )
        statuses = Counter(r["status"] for r in await conn.fetch("SELECT status FROM etl_runs"))
        outcomes.append(f"runs recorded: {dict(statuses)}")
    finally:
        stop_appending.set()
        appender.join(timeout=30)
        await conn.close()

    note(
        f"replicas, pass {attempt + 1}",
        *outcomes,
        f"scenario took {time.monotonic() - began:.1f} s",
    )
    await audit(
        database_url,
        f"replicas, pass {attempt + 1} (3 x serve, 1 s interval, CSV growing for 20 s)",
        [
            SourceInput("csv", "raw_csv_data", rows, CSV_FIELDS, {"offset": data.stat().st_size}),
            SourceInput("json", "raw_third_source_data", coins, JSON_FIELDS),
        ],
    )


_RUNS_BY_STATUS = re.compile(r'^etl_runs_total\{status="(\w+)"\} (\S+)$', re.MULTILINE)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_replicas_with_an_always_failing_source_never_show_success(
    database_url: str,
    tmp_path: Path,
    serve: Callable[[dict[str, str]], ServeProcess],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the source always fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sources = write_sources(tmp_path, api_entry(f"http://127.0.0.1:{port}/v1/tickers"))
    env = cli_env(
        database_url,
        sources,
        API_KEY=KEY,
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS="0.2",
    )
    replicas = [serve(env) for _ in range(REPLICAS)]
    for replica in replicas:
        replica.listening()
    seen: Counter[str] = Counter()
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            for replica in replicas:
                health, stats, listed, metrics = await asyncio.gather(
                    asyncio.to_thread(replica.get, "/health"),
                    asyncio.to_thread(replica.get, "/stats"),
                    asyncio.to_thread(replica.get, "/runs?limit=100", headers={"x-api-key": KEY}),
                    asyncio.to_thread(replica.get, "/metrics"),
                )
                seen[f"health {health.json()['last_etl']}"] += 1
                seen[f"stats {stats.json()['last_status']}"] += 1
                for run in listed.json()["data"]:
                    seen[f"runs {run['status']}"] += 1
                for status, value in _RUNS_BY_STATUS.findall(metrics.text):
                    if float(value) > 0:
                        seen[f"metrics {status}"] += 1
        recorded = Counter(r["status"] for r in await conn.fetch("SELECT status FROM etl_runs"))
        empty = await conn.fetchval(
            "SELECT count(*) FROM etl_runs r WHERE NOT EXISTS "
            "(SELECT FROM etl_run_sources s WHERE s.run_id = r.id)"
        )
    finally:
        await conn.close()
    attempts = Counter(
        e.get("event")
        for replica in replicas
        for e in replica.events
        if e.get("event") in ("etl_run_finished", "etl_attempt_skipped")
    )
    note(
        "replicas with an always-failing source",
        f"attempts: {dict(attempts)}; runs recorded: {dict(recorded)}",
        f"what the replicas showed: {dict(sorted(seen.items()))}",
    )
    assert attempts["etl_attempt_skipped"] > 0, "no attempt found the source busy"
    assert recorded["failed"] > 0
    assert set(recorded) <= {"failed", "running"}
    assert empty == 0
    assert not [key for key in seen if key.endswith(" success")], seen
