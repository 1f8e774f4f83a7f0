"""``kasparro serve`` as a process.

Each test starts the real command on a fresh database with ``LOG_FORMAT=json``,
reads its stdout line by line in a thread, and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from persistence.database import run_migrations, with_database
from tests.helpers import (
    REPO_ROOT,
    cli_env,
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    kasparro_command,
    write_csv,
    write_json_array,
    write_sources,
)

KEY = "serve-key-0123456789"


class Served:
    """A running ``kasparro serve`` and everything it printed so far."""

    def __init__(self, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            kasparro_command("serve", "--host", "127.0.0.1", "--port", "0"),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_event(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {event!r} event; stdout so far: {self.lines}"
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"exited before {event!r}: {self.lines} {self._stderr()}"
            self.lines.append(line)
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict) and parsed.get("event") == event:
                return parsed

    def listening(self, timeout: float = 20.0) -> str:
        self.url = str(self.wait_for_event("server_listening", timeout)["url"])
        return self.url

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0, **kwargs)

    def poll(self, path: str, until: Callable[[httpx.Response], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = self.get(path)
                if until(response):
                    return response
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{path} never satisfied the condition"
            time.sleep(0.02)

    def stop(self, timeout: float) -> int:
        """SIGTERM, then the exit code; every remaining stdout line is collected."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code

    def _stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, str]], Served]]:
    started: list[Served] = []

    def start(env: dict[str, str]) -> Served:
        served = Served(env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def _files(tmp_path: Path, csv_count: int) -> Path:
    write_csv(tmp_path / "big.csv", csv_rows(csv_count))
    write_json_array(
        tmp_path / "third.json",
        [coin(f"Json {i}", float(i), "2026-02-01T00:00:00Z") for i in range(20)],
    )
    return write_sources(
        tmp_path, csv_entry(tmp_path / "big.csv"), json_entry(tmp_path / "third.json")
    )


def _env(database_url: str, sources: Path, **extra: str | int) -> dict[str, str]:
    return cli_env(database_url, sources, ETL_INTERVAL_SECONDS=0, **extra)


def _some_batches_committed(served: Served) -> None:
    served.poll("/stats", lambda r: r.json()["sources"]["csv"]["raw_records"] > 0, timeout=20)


async def _runs(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, status, error, finished_at FROM etl_runs")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


@pytest.mark.slow
async def test_health_answers_at_once_while_a_large_startup_run_ingests(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    sources = _files(tmp_path, 400_000)
    served = serve(_env(database_url, sources, API_KEY=KEY))
    served.listening()
    health = served.poll("/health", lambda r: r.status_code == 200, timeout=10)
    assert health.json()["db"] == "ok"
    # The API answered before the startup run of 400,000 rows could finish.
    assert health.json()["last_etl"] in {"never", "running"}
    # The run's child records the run a moment after the API answers.
    served.poll("/health", lambda r: r.json()["last_etl"] == "running", timeout=10)
    # The API serves reads while the run goes on.
    data = served.get("/data?limit=5", headers={"x-api-key": KEY})
    assert data.status_code == 200
    assert served.get("/health").json()["last_etl"] == "running"
    assert served.stop(timeout=15) == 0


@pytest.mark.slow
async def test_sigterm_during_a_run_exits_0_within_10_s_and_closes_the_run(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    sources = _files(tmp_path, 400_000)
    served = serve(_env(database_url, sources, API_KEY=KEY))
    served.listening()
    served.poll("/health", lambda r: r.json().get("last_etl") == "running", timeout=10)
    _some_batches_committed(served)  # before the stop arrives
    sent = time.monotonic()
    code = served.stop(timeout=10)
    took = time.monotonic() - sent
    assert code == 0
    assert took < 10
    runs = await _runs(database_url)
    assert len(runs) == 1
    assert runs[0]["status"] != "running"
    assert runs[0]["finished_at"] is not None
    events = [json.loads(line) for line in served.lines]
    assert any(e["event"] == "service_stopped" for e in events)


@pytest.mark.slow
async def test_a_killed_service_leaves_no_ingestion_running_behind(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    # The run goes on in a child process; with the service gone, it must stop
    # (after its batch in flight) instead of ingesting on as an orphan.
    sources = _files(tmp_path, 600_000)
    served = serve(_env(database_url, sources, API_KEY=KEY))
    served.listening()
    _some_batches_committed(served)
    served.process.kill()
    served.process.wait(timeout=5)
    deadline = time.monotonic() + 8
    while (await _runs(database_url))[0]["status"] == "running":
        assert time.monotonic() < deadline, "the run went on without the service"
        await asyncio.sleep(0.1)
    conn = await asyncpg.connect(database_url)
    try:
        error = await conn.fetchval("SELECT error FROM etl_run_sources WHERE source = 'csv'")
        stored = await conn.fetchval("SELECT count(*) FROM raw_csv_data")
    finally:
        await conn.close()
    assert error.startswith("stopped")
    assert 0 < stored < 600_000


async def test_log_lines_are_json_and_the_run_summary_carries_its_counts(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    sources = _files(tmp_path, 50)
    env = _env(database_url, sources)
    env.pop("API_KEY", None)  # a key is generated and logged once
    served = serve(env)
    generated = served.wait_for_event("api_key_generated", timeout=20)
    key = str(generated["api_key"])
    assert len(key) >= 32
    served.listening()
    served.poll("/health", lambda r: r.json().get("etl_loop") == "finished", timeout=20)
    assert served.get("/data", headers={"x-api-key": key}).status_code == 200
    assert served.get("/data", headers={"x-api-key": KEY}).status_code == 401
    served.get("/nope", headers={"x-request-id": "trace-42"})
    assert served.stop(timeout=10) == 0

    events = []
    for line in served.lines:
        event = json.loads(line)  # every line, not only ours, is one JSON object
        assert {"timestamp", "level", "event"} <= set(event), line
        assert event["timestamp"].endswith("Z")
        events.append(event)
    assert [e["event"] for e in events].count("api_key_generated") == 1
    finished = [e for e in events if e["event"] == "etl_run_finished"]
    assert len(finished) == 1
    summary = finished[0]
    runs = await _runs(database_url)
    assert summary["run_id"] == str(runs[0]["id"])
    assert summary["status"] == runs[0]["status"] == "success"
    assert isinstance(summary["duration_seconds"], float)
    assert summary["sources"]["csv"]["fetched"] == 50
    assert summary["sources"]["csv"]["raw_inserted"] == 50
    assert summary["sources"]["json"]["fetched"] == 20
    access = [e for e in events if e["event"] == "http_request" and e["path"] == "/nope"]
    assert len(access) == 1
    assert access[0]["request_id"] == "trace-42"
    assert access[0]["route"] == "<unmatched>"
    assert access[0]["status"] == 404


@contextlib.contextmanager
def served_on_new_database(
    server_url: str, sources: Path, *, key: str, prefix: str, **env: str | int
) -> Iterator[Served]:
    """A ``kasparro serve`` on a database of its own, after its startup run;
    ``env`` adds settings."""

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = with_database(server_url, name)
    run_migrations(url)
    served = Served(cli_env(url, sources, API_KEY=key, ETL_INTERVAL_SECONDS=0, **env))
    try:
        served.listening()
        served.wait_for_event("etl_run_finished", 60)
        yield served
    finally:
        served.kill()
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
