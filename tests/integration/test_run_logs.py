"""Every line written while a run is in progress carries its ``run_id``, in every
process that takes part, and the terminal's progress line never swallows one.

``jq 'select(.run_id == "...")'`` (docs/operations.md) must return the whole
story of a run: its start, the retries of its HTTP source, its end, and the end
written for it by another process when it was interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

from app.service.child_run import SubprocessRunner
from observability.metrics import Metrics
from tests.fakes.upstream import FakeUpstream, Fault
from tests.helpers import (
    REPO_ROOT,
    api_entry,
    cli_env,
    count,
    csv_entry,
    csv_rows,
    kasparro_command,
    make_settings,
    ticker,
    wait_for,
    write_csv,
    write_sources,
)

TICKERS = [ticker(f"Log Coin {i}", 1.0 + i, f"2026-01-02T00:00:{i:02d}Z") for i in range(5)]


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_every_line_of_an_etl_run_carries_its_id(tmp_path: Path, database_url: str) -> None:
    write_csv(tmp_path / "prices.csv", csv_rows(30))
    fake = FakeUpstream(TICKERS).start()
    try:
        fake.enqueue(Fault.http(503), Fault.http(503))
        sources = write_sources(
            tmp_path, api_entry(fake.url, max_retries=3), csv_entry("prices.csv")
        )
        env = cli_env(database_url, sources, ETL_BATCH_SIZE=10, LOG_LEVEL="debug")
        done = await asyncio.to_thread(
            subprocess.run,
            kasparro_command("etl", "run", "--json"),
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        fake.stop()
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout.strip().splitlines()[-1])
    lines = _json_lines(done.stderr)
    events = [line["event"] for line in lines]
    start, end = events.index("etl_run_started"), events.index("etl_run_finished")
    during = lines[start : end + 1]

    assert lines[start]["sources"] == ["api", "csv"]
    assert {line.get("run_id") for line in during} == {run["id"]}
    retries = [line for line in during if line["event"] == "http_retry"]
    assert len(retries) == 2
    assert sum(line["event"] == "batch_committed" for line in during) >= 4


async def test_the_service_side_of_an_interrupted_run_writes_its_end_with_its_id(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool[Any]
) -> None:
    write_csv(tmp_path / "data.csv", csv_rows(100_000))
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "data.csv"))
    settings = make_settings(sources_file, DATABASE_URL=database_url, ETL_BATCH_SIZE=2000)
    runner = SubprocessRunner(settings, pool, Metrics())

    async def started() -> bool:
        return await count(pool, "raw_csv_data") > 0

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        task = asyncio.create_task(runner.run("schedule"))
        await wait_for(started, within=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_id = str(await pool.fetchval("SELECT id FROM etl_runs"))
    closed = [line for line in logs if line["event"] == "run_interrupted_closed"]
    assert [line["run_id"] for line in closed] == [run_id]
    assert await pool.fetchval("SELECT error FROM etl_runs") == "interrupted"


async def test_a_run_closing_another_writes_that_run_s_end_with_its_id(
    tmp_path: Path, pool: asyncpg.Pool[Any], database_url: str
) -> None:
    from config.sources import load_sources
    from persistence import runs
    from pipelines.runner import Runner

    write_csv(tmp_path / "prices.csv", csv_rows(3))
    settings = make_settings(write_sources(tmp_path, csv_entry("prices.csv")))
    gone = uuid.uuid4()
    async with pool.acquire() as conn:
        await runs.open_run(conn, gone, "cli", ["other"], owner="gone", lease_seconds=0.01)

    async def expired() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT expires_at <= now() FROM etl_leases WHERE run_id = $1", gone
            )
        )

    await wait_for(expired, within=10)

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        run = msgspec.to_builtins(
            await Runner(pool, settings, load_sources(settings), None).run("test")
        )

    closed = [line for line in logs if line["event"] == "run_interrupted_closed"]
    assert [(line["run_id"], line["closed_by_run_id"]) for line in closed] == [
        (str(gone), run["id"])
    ]
    started = [line for line in logs if line["event"] == "etl_run_started"]
    assert [line["run_id"] for line in started] == [run["id"]]


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the terminal is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_progress_line_is_ended_before_a_log_line_on_a_terminal(
    tmp_path: Path, database_url: str
) -> None:
    # CSV batches show progress while the api source, which cannot be reached,
    # logs its retries and its failure on the same terminal.
    write_csv(tmp_path / "prices.csv", csv_rows(400))
    sources = write_sources(
        tmp_path, csv_entry("prices.csv"), api_entry("http://127.0.0.1:9/v1/tickers", max_retries=3)
    )
    env = cli_env(database_url, sources, ETL_BATCH_SIZE=5, TERM="dumb")
    leader, follower = os.openpty()
    try:
        process = subprocess.Popen(
            kasparro_command("etl", "run"),
            cwd=REPO_ROOT,
            env=env,
            stdin=follower,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        output = _read_all(leader, time.monotonic() + 60).decode(errors="replace")
        process.wait(timeout=30)
    finally:
        os.close(leader)

    assert process.returncode == 3, output  # partial: the api failed
    progress = re.findall(r"\r[^\r\n]*csv: \d+ read, \d+ new\x1b\[K", output)
    assert len(progress) >= 10, output
    # A log line starts a line of its own, never at the end of the progress.
    assert re.search(r"new\x1b\[K\{", output) is None, output
    assert re.search(r"new\x1b\[K\r?\n\{", output) is not None, output
    for line in re.split(r"\r?\n", output):
        if '"event"' in line:
            assert line.lstrip("\r").startswith("{"), line
    # The summary starts on a line of its own too.
    assert re.search(r"(?m)^run [0-9a-f-]{36}: partial in ", output), output
