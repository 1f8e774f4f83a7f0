"""The API around a real ETL run: metrics, stats, rejections.

The service runs the pipeline's own runner on local CSV and JSON files. A gate
holds the startup run until the test has read the metrics as they were before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

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
    write_csv,
    write_json_array,
    write_sources,
)

KEY = "runs-key-0123"
AUTH = {"x-api-key": KEY}
STAGES = {
    "fetched": "fetched",
    "raw_inserted": "raw_inserted",
    "duplicate": "duplicates",
    "rejected": "rejected",
    "unified_upserted": "unified_upserted",
}
# Five rows each wrong in a known way; the file's other rows are valid.
BAD_ROWS = [
    ("", "1.0", "2026-01-01T00:00:00Z"),
    ("   ", "2.0", "2026-01-01T00:00:00Z"),
    ("bad value", "abc", "2026-01-01T00:00:00Z"),
    ("infinite", "1e999", "2026-01-01T00:00:00Z"),
    ("bad time", "3.0", "yesterday-ish"),
]


class GatedRunner:
    """The real runner, started only once the test opens the gate.

    It owns a pool of its own, opened in the app's event loop on the first run.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.waiting = threading.Event()
        self._gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._real: Runner | None = None

    @property
    def running(self) -> bool:
        return self._real is not None and self._real.running

    def request_stop(self) -> None:
        if self._real is not None:
            self._real.request_stop()

    def open(self) -> None:
        assert self._loop is not None
        assert self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    async def run(self, trigger: str, names: Sequence[str] | None = None) -> dict[str, Any]:
        self._loop = asyncio.get_running_loop()
        self._gate = asyncio.Event()
        self.waiting.set()
        await self._gate.wait()
        assert self.settings.database_url is not None
        pool = await create_pool(self.settings.database_url)
        try:
            self._real = Runner(pool, self.settings, load_sources(self.settings), self.metrics)
            return await self._real.run(trigger, names)
        finally:
            await pool.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _settings(tmp_path: Path, database_url: str) -> Settings:
    rows = csv_rows(40)
    write_csv(tmp_path / "sample.csv", rows[:20] + BAD_ROWS + rows[20:])
    write_json_array(
        tmp_path / "third.json",
        [coin(f"Coin {i}", 10.0 + i, "2026-02-01T00:00:00Z") for i in range(30, 45)],
    )
    sources = write_sources(
        tmp_path, csv_entry(tmp_path / "sample.csv"), json_entry(tmp_path / "third.json")
    )
    settings = make_settings(sources, DATABASE_URL=database_url, API_KEY=KEY)
    return dataclasses.replace(settings, etl_on_startup=True, etl_interval_seconds=0)


async def test_one_run_moves_the_metrics_by_exactly_its_record(
    tmp_path: Path, database_url: str
) -> None:
    settings = _settings(tmp_path, database_url)
    metrics = Metrics()
    runner = GatedRunner(settings, metrics)
    app = create_app(settings, metrics=metrics, runner=runner)
    async with AsyncTestClient(app=app) as client:
        assert runner.waiting.wait(timeout=10)
        before_text = (await client.get("/metrics")).text
        before = samples(before_text)
        wall_before = time.time()
        runner.open()

        deadline = time.monotonic() + 30
        while (await client.get("/health")).json()["etl_loop"] != "finished":
            assert time.monotonic() < deadline, "the startup run did not finish"
            await asyncio.sleep(0.05)

        response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        after = samples(response.text)
        runs = (await client.get("/runs", headers=AUTH)).json()["data"]
        assert len(runs) == 1
        run = runs[0]
        assert run["status"] == "partial"  # five rows rejected

        for status in ("success", "partial", "failed"):
            key = ("etl_runs_total", (("status", status),))
            rose = after.get(key, 0.0) - before.get(key, 0.0)
            assert rose == (1.0 if status == run["status"] else 0.0), status

        for source, counts in run["sources"].items():
            for stage, field in STAGES.items():
                key = ("etl_records_total", (("source", source), ("stage", stage)))
                assert after.get(key, 0.0) - before.get(key, 0.0) == counts[field], key
        assert run["sources"]["csv"]["rejected"] == len(BAD_ROWS)
        assert run["sources"]["csv"]["fetched"] == 45

        count = ("etl_duration_seconds_count", ())
        total = ("etl_duration_seconds_sum", ())
        assert after[count] - before[count] == 1
        observed = after[total] - before[total]
        # Seconds, not milliseconds: close to the run record's own duration.
        assert 0 < observed < 60
        assert abs(observed - run["duration_seconds"]) < 1.0
        stamp = after[("etl_last_success_timestamp_seconds", (("source", "csv"),))]
        assert wall_before - 1 <= stamp <= time.time() + 1

        # The same run, seen through /health, /stats and /rejections.
        health = (await client.get("/health")).json()
        assert health["last_etl"] == "partial"
        stats = (await client.get("/stats")).json()
        assert stats["runs_total"] == 1
        assert stats["last_status"] == "partial"
        assert stats["records_processed_total"] == sum(
            s["fetched"] for s in run["sources"].values()
        )
        assert stats["unified_records"] == 40 + 15 - 10  # names 30..39 are in both files
        assert stats["sources"]["csv"]["raw_records"] == 45
        assert stats["sources"]["json"]["raw_records"] == 15
        assert isinstance(stats["sources"]["csv"]["checkpoint"], dict)
        assert stats["sources"]["csv"]["checkpoint"]
        assert stats["sources"]["csv"]["last_error"] is None

        rejected = (await client.get(f"/rejections?run_id={run['id']}", headers=AUTH)).json()
        assert [r["payload"]["name"] for r in rejected["data"]] == [r[0] for r in BAD_ROWS]
        assert [r["field"] for r in rejected["data"]] == [
            "name",
            "name",
            "value",
            "value",
            "observed_at",
        ]
        assert all(r["reason"] and r["source"] == "csv" for r in rejected["data"])
        assert all(
            r["payload"] == dict(zip(("name", "value", "updated_at"), bad, strict=True))
            for r, bad in zip(rejected["data"], BAD_ROWS, strict=True)
        )
        everything = (await client.get("/rejections", headers=AUTH)).json()
        assert len(everything["data"]) == len(BAD_ROWS)

        data = (await client.get("/data?limit=1000", headers=AUTH)).json()
        assert data["pagination"]["total"] == stats["unified_records"]
        assert len(data["data"]) == stats["unified_records"]
