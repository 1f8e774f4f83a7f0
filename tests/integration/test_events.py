"""``GET /events`` on real ``kasparro serve`` processes sharing one database.

A subscriber reads the stream in a thread and keeps every event; the tests wait
for the events they expect with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.helpers import (
    cli_env,
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    run_cli,
    write_csv,
    write_json_array,
    write_sources,
)
from tests.integration.test_serve import Served
from tests.pg_proxy import PgProxy
from tests.pgbouncer import PgBouncer

KEY = "events-key-0123456789"
AUTH = {"x-api-key": KEY}


class Subscriber:
    """One ``/events`` stream, read in a thread: every event and comment, in order."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.items: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.seen: list[tuple[str, Any]] = []
        self.status: int | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with httpx.stream(
                "GET", self.url + "/events", headers=AUTH, timeout=httpx.Timeout(5, read=60)
            ) as response:
                self.status = response.status_code
                event = None
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.items.put(("comment", line[1:].strip()))
                    elif line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event is not None:
                        self.items.put((event, json.loads(line.removeprefix("data: "))))
                        event = None
        except httpx.HTTPError as exc:
            self.items.put(("error", str(exc)))
        finally:
            self.items.put(None)

    def wait_for(self, kind: str, matches: Callable[[Any], bool], timeout: float = 30) -> Any:
        """The first item of ``kind`` from now on that ``matches``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind} within {timeout} s; seen {self.seen}"
            try:
                item = self.items.get(timeout=left)
            except queue.Empty:
                continue
            assert item is not None, f"the stream ended before a {kind}; seen {self.seen}"
            self.seen.append(item)
            if item[0] == kind and matches(item[1]):
                return item[1]

    def ended(self, timeout: float = 10) -> list[tuple[str, Any]]:
        """Everything read until the stream ends."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.items.get(timeout=max(0.01, deadline - time.monotonic()))
            if item is None:
                return self.seen
            self.seen.append(item)


def _sources(folder: Path) -> Path:
    write_csv(folder / "prices.csv", csv_rows(200))
    coins = [coin(f"Coin {i}", i + 0.5, "2026-02-01T00:00:00Z") for i in range(5)]
    write_json_array(folder / "coins.json", coins)
    return write_sources(
        folder, csv_entry(folder / "prices.csv"), json_entry(folder / "coins.json")
    )


def _env(database_url: str, sources: Path, **extra: str | int) -> dict[str, str]:
    return cli_env(
        database_url, sources, API_KEY=KEY, ETL_ON_STARTUP="false", ETL_INTERVAL_SECONDS=0, **extra
    )


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, str]], Served]]:
    """Starts ``kasparro serve`` processes; each is stopped (its output read to the end)."""
    started: list[Served] = []

    def start(env: dict[str, str]) -> Served:
        served = Served(env)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.stop(timeout=15)
        served.kill()


@pytest.fixture
def replicas(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> tuple[Served, Served, Path]:
    sources = _sources(tmp_path)
    a = serve(_env(database_url, sources))
    b = serve(_env(database_url, sources, EVENTS_KEEPALIVE_SECONDS="0.2"))
    a.listening()
    b.listening()
    return a, b, sources


def test_a_subscriber_on_one_replica_hears_of_runs_started_on_another_and_by_the_cli(
    replicas: tuple[Served, Served, Path], database_url: str
) -> None:
    a, b, sources = replicas
    subscriber = Subscriber(b.url)
    subscriber.wait_for("comment", lambda text: text == "connected")
    assert subscriber.status == 200
    # Nothing happens for a while: comments keep the stream alive.
    subscriber.wait_for("comment", lambda text: text == "keep-alive")

    started = httpx.post(a.url + "/runs", headers=AUTH, timeout=5)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    assert subscriber.wait_for("run_started", lambda run: run["id"] == run_id)["trigger"] == "api"
    changed = subscriber.wait_for("unified_changed", lambda _: True)
    assert 0 <= changed["after"] < changed["seq"]
    finished = subscriber.wait_for("run_finished", lambda run: run["id"] == run_id)
    assert finished["trigger"] == "api"
    assert finished["status"] == "success"
    assert finished["sources"]["csv"]["raw_inserted"] == 200
    assert finished == httpx.get(f"{b.url}/runs/{run_id}", headers=AUTH).json()
    # The range names changes that /changes serves.
    page = httpx.get(
        b.url + "/changes", params={"after": changed["after"], "limit": 1000}, headers=AUTH
    ).json()
    assert page["data"]
    assert all(changed["after"] < i["seq"] for i in page["data"])

    # A run of another process that is no replica at all: `kasparro etl run`.
    write_csv(sources.parent / "prices.csv", csv_rows(210))
    done = run_cli("etl", "run", "--json", env=_env(database_url, sources))
    assert done.returncode == 0, done.stderr
    cli_run = json.loads(done.stdout)
    heard = subscriber.wait_for("run_finished", lambda run: run["id"] == cli_run["id"])
    assert heard["trigger"] == "cli"


def test_a_stop_ends_the_streams_at_once_and_the_server_exits_0(
    replicas: tuple[Served, Served, Path],
) -> None:
    _, b, _ = replicas
    subscribers = [Subscriber(b.url) for _ in range(3)]
    for subscriber in subscribers:
        subscriber.wait_for("comment", lambda text: text == "connected")
    assert b.stop(timeout=10) == 0
    for subscriber in subscribers:
        # Ended by the server with a last word, not cut when the stop ran out of time.
        assert subscriber.ended()[-1] == ("comment", "the server is stopping")
    events = [json.loads(line)["event"] for line in b.lines if line.startswith("{")]
    assert "service_stopped" in events


def test_the_listener_comes_back_after_a_database_outage_and_tells_what_it_missed(
    tmp_path: Path, database_url: str, serve: Callable[[dict[str, str]], Served]
) -> None:
    sources = _sources(tmp_path)
    proxy = PgProxy(database_url).start()
    try:
        served = serve(_env(database_url, sources, DATABASE_LISTEN_URL=proxy.url))
        served.listening()
        subscriber = Subscriber(served.url)
        subscriber.wait_for("comment", lambda text: text == "connected")

        assert proxy.cut("refuse") >= 1
        served.wait_for_event("events_listener_lost", timeout=15)
        # A run while nobody listens: its events are sent once the listener is back.
        missed = run_cli("etl", "run", "--json", env=_env(database_url, sources))
        assert missed.returncode == 0, missed.stderr
        missed_id = json.loads(missed.stdout)["id"]
        proxy.restore()
        back = served.wait_for_event("events_listening", timeout=20)
        assert back["reconnected"] is True
        assert subscriber.wait_for("run_finished", lambda run: run["id"] == missed_id)
        # The missed changes come first: they committed before the run's end.
        changed = [data for kind, data in subscriber.seen if kind == "unified_changed"]
        assert len(changed) == 1
        assert changed[0]["seq"] > changed[0]["after"] >= 0

        # And it hears new events as before.
        started = httpx.post(served.url + "/runs", headers=AUTH, timeout=5)
        assert started.status_code == 202
        new_id = started.json()["id"]
        assert subscriber.wait_for("run_finished", lambda run: run["id"] == new_id)
    finally:
        proxy.close()


def test_events_needs_the_key(replicas: tuple[Served, Served, Path]) -> None:
    a, _, _ = replicas
    assert httpx.get(a.url + "/events", timeout=5).status_code == 401
    assert httpx.get(a.url + "/events", headers={"x-api-key": "no"}, timeout=5).status_code == 401


def test_behind_pgbouncer_the_listener_keeps_a_direct_session_of_its_own(
    tmp_path: Path,
    database_url: str,
    pgbouncer: PgBouncer,
    serve: Callable[[dict[str, str]], Served],
) -> None:
    # Everything through PgBouncer (either mode) but the one listening connection.
    env = _env(
        pgbouncer.url(database_url),
        _sources(tmp_path),
        DATABASE_LISTEN_URL=database_url,
        **pgbouncer.settings(),
    )
    served = serve(env)
    served.listening()
    assert served.wait_for_event("events_listening", timeout=15)["hears"] is True
    subscribers = [Subscriber(served.url) for _ in range(2)]
    for subscriber in subscribers:
        subscriber.wait_for("comment", lambda text: text == "connected")
    # One listening session for the replica, whatever the number of subscribers.
    assert asyncio.run(_listeners(database_url)) == 1
    started = httpx.post(served.url + "/runs", headers=AUTH, timeout=5)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    for subscriber in subscribers:
        finished = subscriber.wait_for("run_finished", lambda run: run["id"] == run_id)
        assert finished["status"] == "success"


async def _listeners(database_url: str) -> int:
    """Sessions of the events listener on the database."""
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'kasparro-events' AND datname = current_database()"
        )
    finally:
        await conn.close()
    return count


def test_a_listener_behind_a_transaction_pooler_says_it_hears_nothing_and_reads_the_tables(
    tmp_path: Path,
    database_url: str,
    pgbouncer: PgBouncer,
    serve: Callable[[dict[str, str]], Served],
) -> None:
    if pgbouncer.mode != "transaction":
        pytest.skip("a session pooler keeps the listening session")
    env = _env(pgbouncer.url(database_url), _sources(tmp_path), **pgbouncer.settings())
    served = serve(env)
    served.listening()
    warning = served.wait_for_event("events_listener_deaf", timeout=15)
    assert "DATABASE_LISTEN_URL" in warning["hint"]
    assert served.wait_for_event("events_listening", timeout=15)["hears"] is False
    subscriber = Subscriber(served.url)
    subscriber.wait_for("comment", lambda text: text == "connected")
    started = httpx.post(served.url + "/runs", headers=AUTH, timeout=5)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    assert subscriber.wait_for("run_started", lambda run: run["id"] == run_id)
    finished = subscriber.wait_for("run_finished", lambda run: run["id"] == run_id)
    assert finished["status"] == "success"
    # Read while the run went on or after it: before its end either way.
    changed = [data for kind, data in subscriber.seen if kind == "unified_changed"]
    assert changed
    assert all(c["seq"] > c["after"] >= 0 for c in changed)
