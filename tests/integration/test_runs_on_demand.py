"""``POST /runs``: a run started over HTTP, through the app's own ingestion loop.

The pipeline's real runner does the run; a gate holds it until the test has
asked for a second one, so the 409 does not depend on how long a run takes.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from config.settings import Settings
from config.sources import load_sources
from observability.metrics import Metrics
from persistence.database import create_pool
from pipelines.runner import Runner
from tests.helpers import (
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    make_settings,
    wait_for,
    write_csv,
    write_json_array,
    write_sources,
)

KEY = "on-demand-key-0123"
AUTH = {"x-api-key": KEY}


class GatedRunner:
    """The real runner; each run waits for the test to open the gate."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.waiting = threading.Event()
        self.calls: list[tuple[str, tuple[str, ...] | None, uuid.UUID | None]] = []
        self._gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._real: Runner | None = None

    @property
    def running(self) -> bool:
        return self._busy

    def request_stop(self) -> None:
        if self._real is not None:
            self._real.request_stop()

    def open(self) -> None:
        assert self._loop is not None
        assert self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    async def run(
        self,
        trigger: str,
        names: Sequence[str] | None = None,
        *,
        run_id: uuid.UUID | None = None,
    ) -> dict[str, Any]:
        self._busy = True
        try:
            self.calls.append((trigger, tuple(names) if names else None, run_id))
            self._loop = asyncio.get_running_loop()
            self._gate = asyncio.Event()
            self.waiting.set()
            await self._gate.wait()
            self.waiting.clear()
            assert self.settings.database_url is not None
            pool = await create_pool(self.settings.database_url)
            try:
                self._real = Runner(pool, self.settings, load_sources(self.settings), None)
                return await self._real.run(trigger, names, run_id=run_id)
            finally:
                await pool.close()
        finally:
            self._busy = False


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    write_csv(tmp_path / "prices.csv", csv_rows(30))
    write_json_array(
        tmp_path / "coins.json",
        [coin(f"Coin {i}", i + 0.5, "2026-02-01T00:00:00Z") for i in range(5)],
    )
    sources = write_sources(
        tmp_path, csv_entry(tmp_path / "prices.csv"), json_entry(tmp_path / "coins.json")
    )
    return make_settings(
        sources,
        DATABASE_URL=database_url,
        API_KEY=KEY,
        ETL_ON_STARTUP="false",
        ETL_INTERVAL_SECONDS=0,
    )


async def _finished(pool: asyncpg.Pool[Any], run_id: str) -> bool:
    status = await pool.fetchval("SELECT status FROM etl_runs WHERE id = $1", uuid.UUID(run_id))
    return status is not None and status != "running"


async def test_post_runs_needs_the_key_answers_202_then_409_and_records_an_api_run(
    settings: Settings, pool: asyncpg.Pool[Any]
) -> None:
    runner = GatedRunner(settings)
    async with AsyncTestClient(
        app=create_app(settings, metrics=Metrics(), runner=runner)
    ) as client:
        assert (await client.post("/runs")).status_code == 401
        assert (await client.post("/runs", headers={"x-api-key": "nope"})).status_code == 401
        assert runner.calls == []

        started = await client.post("/runs", json={"sources": ["csv"]}, headers=AUTH)
        assert started.status_code == 202, started.text
        body = started.json()
        assert body["status"] == "running"
        run_id = body["id"]
        assert started.headers["location"] == f"/runs/{run_id}"
        assert await asyncio.to_thread(runner.waiting.wait, 10)

        busy = await client.post("/runs", headers=AUTH)
        assert busy.status_code == 409
        assert busy.json()["status_code"] == 409

        runner.open()
        await wait_for(lambda: _finished(pool, run_id), within=30)
        record = (await client.get(f"/runs/{run_id}", headers=AUTH)).json()
        assert record["id"] == run_id
        assert record["trigger"] == "api"
        assert record["status"] == "success"
        assert list(record["sources"]) == ["csv"]
        assert record["sources"]["csv"]["raw_inserted"] == 30
        assert runner.calls == [("api", ("csv",), uuid.UUID(run_id))]

        # Once it is over, another run may start: no body means every source.
        await wait_for(lambda: _not_running(runner), within=10)
        again = await client.post("/runs", headers=AUTH)
        assert again.status_code == 202, again.text
        assert await asyncio.to_thread(runner.waiting.wait, 10)
        runner.open()
        await wait_for(lambda: _finished(pool, again.json()["id"]), within=30)
        second = (await client.get(f"/runs/{again.json()['id']}", headers=AUTH)).json()
        assert second["trigger"] == "api"
        assert list(second["sources"]) == ["csv", "json"]


async def _not_running(runner: GatedRunner) -> bool:
    return not runner.running


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"sources": ["csv", "nope"]}', "unknown source: nope"),
        (b'{"sources": []}', "at least one"),
        (b'{"sources": "csv"}', ""),
        (b'{"source": ["csv"]}', ""),
        (b"{not json", ""),
    ],
)
async def test_post_runs_refuses_a_bad_body_with_400_and_starts_nothing(
    settings: Settings, body: bytes, message: str
) -> None:
    runner = GatedRunner(settings)
    async with AsyncTestClient(
        app=create_app(settings, metrics=Metrics(), runner=runner)
    ) as client:
        response = await client.post(
            "/runs", content=body, headers={**AUTH, "content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert message in response.text
        assert runner.calls == []
