"""Drift policies on the CoinGecko-shaped JSON source.

The shipped ``data/third_source.json`` with ``current_price`` renamed
``currentPrice``: under ``evolve`` the run records a ``renamed`` event with
confidence >= 0.8 and the values still load; under ``freeze`` the source fails,
raw keeps the records and the run (with a healthy CSV source beside it) is
``partial``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from config.settings import Settings
from config.sources import load_sources
from observability.metrics import Metrics
from pipelines.runner import Runner
from pipelines.transform import canonical_name
from tests.helpers import (
    REPO_ROOT,
    count,
    csv_entry,
    csv_rows,
    db_metric_samples,
    json_entry,
    make_settings,
    raw_payloads,
    write_csv,
    write_json_array,
    write_sources,
)

SAMPLE = REPO_ROOT / "data" / "third_source.json"
OLD, NEW = "current_price", "currentPrice"
CSV_ROWS = 5


def sample() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert len(items) >= 100
    assert all(OLD in item for item in items)
    return items


def renamed(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same records with the price under its new name, in the same key position."""
    return [{(NEW if key == OLD else key): value for key, value in item.items()} for item in items]


def a_day_later(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newer observations with new prices (above the high-water mark of the first read)."""
    out = []
    for item in items:
        stamp = datetime.fromisoformat(item["last_updated"].replace("Z", "+00:00"))
        later = (stamp + timedelta(days=1)).astimezone(UTC).isoformat().replace("+00:00", "Z")
        out.append({**item, OLD: round(item[OLD] * 2 + 1, 6), "last_updated": later})
    return out


def prices(items: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {canonical_name(item["name"]): float(item[key]) for item in items}


def sources_file(tmp_path: Path, policy: str) -> Path:
    write_csv(tmp_path / "prices.csv", csv_rows(CSV_ROWS, prefix="csv coin"))
    return write_sources(
        tmp_path,
        json_entry("coins.json") + f'drift_policy = "{policy}"\n',
        csv_entry("prices.csv"),
    )


async def run(
    pool: asyncpg.Pool[Any], settings: Settings
) -> tuple[dict[str, Any], Metrics, list[Any]]:
    metrics = Metrics()
    with capture_logs() as logs:
        result = msgspec.to_builtins(
            await Runner(pool, settings, load_sources(settings), metrics).run("test")
        )
    return result, metrics, logs


async def json_prices(pool: asyncpg.Pool[Any]) -> dict[str, float]:
    rows = await pool.fetch("SELECT name, value FROM unified_data WHERE source = 'json'")
    return {row["name"]: row["value"] for row in rows}


async def drift_count(pool: asyncpg.Pool[Any], kind: str) -> float:
    samples = await db_metric_samples(pool, ["json", "csv"])
    return samples[("etl_schema_drift_total", (("kind", kind), ("source", "json")))]


def the_rename(drift: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in drift if e["kind"] == "renamed"]
    assert len(found) == 1, drift
    event = found[0]
    assert (event["field"], event["new_field"]) == (OLD, NEW)
    assert event["confidence"] >= 0.8
    return event


async def stored_drift(pool: asyncpg.Pool[Any], run_id: str) -> list[tuple[str, str, str | None]]:
    rows = await pool.fetch(
        "SELECT kind, field, new_field, confidence FROM etl_drift_events"
        " WHERE run_id = $1::uuid AND source = 'json' ORDER BY id",
        run_id,
    )
    return [(r["kind"], r["field"], r["new_field"]) for r in rows]


async def test_evolve_follows_the_rename_and_loads_every_value(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    items = sample()
    write_json_array(tmp_path / "coins.json", renamed(items))
    # Several batches: the same drift is still reported once in the run.
    settings = make_settings(sources_file(tmp_path, "evolve"), ETL_BATCH_SIZE=64)

    result, _, logs = await run(pool, settings)

    assert result["status"] == "success"
    source = result["sources"]["json"]
    assert (source["status"], source["error"]) == ("success", None)
    n = len(items)
    assert (source["fetched"], source["raw_inserted"], source["rejected"]) == (n, n, 0)
    assert source["unified_upserted"] == n
    event = the_rename(source["drift"])
    assert [e["kind"] for e in source["drift"]] == ["renamed"]  # followed: no `missing`
    assert await stored_drift(pool, result["id"]) == [("renamed", OLD, NEW)]
    assert await drift_count(pool, "renamed") == 1
    warnings = [e for e in logs if e["event"] == "schema_drift"]
    assert [(w["log_level"], w["kind"], w["confidence"]) for w in warnings] == [
        ("warning", "renamed", event["confidence"])
    ]
    assert await json_prices(pool) == prices(items, OLD)


async def test_freeze_fails_the_source_keeps_raw_and_the_run_is_partial(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    items = renamed(sample())
    write_json_array(tmp_path / "coins.json", items)
    settings = make_settings(sources_file(tmp_path, "freeze"))

    result, _, _ = await run(pool, settings)

    assert result["status"] == "partial"
    assert result["sources"]["csv"]["status"] == "success"
    source = result["sources"]["json"]
    assert source["status"] == "failed"
    error = source["error"]
    assert error.startswith("schema drift under freeze policy: ")
    assert f"{OLD} -> {NEW}" in error
    assert "\n" not in error
    the_rename(source["drift"])
    assert ("missing", OLD, None) in await stored_drift(pool, result["id"])
    assert await drift_count(pool, "renamed") == 1

    # Raw keeps every record as received; nothing of the source reaches unified.
    assert (source["fetched"], source["raw_inserted"], source["rejected"]) == (
        len(items),
        len(items),
        0,
    )
    assert await raw_payloads(pool, "raw_third_source_data") == items
    assert await json_prices(pool) == {}
    assert await count(pool, "unified_data") == CSV_ROWS
    assert await count(pool, "etl_rejections") == 0

    # Frozen means frozen: the next run fails the same way and stores nothing twice.
    again, _, _ = await run(pool, settings)
    assert again["status"] == "partial"
    assert again["sources"]["json"]["status"] == "failed"
    assert (again["sources"]["json"]["raw_inserted"], again["sources"]["json"]["duplicates"]) == (
        0,
        len(items),
    )
    assert await count(pool, "raw_third_source_data") == len(items)


@pytest.mark.parametrize("policy", ["evolve", "freeze"])
async def test_a_rename_between_runs(pool: asyncpg.Pool[Any], tmp_path: Path, policy: str) -> None:
    """The usual story: the source loaded fine yesterday, today the field is renamed."""
    first = sample()
    path = tmp_path / "coins.json"
    write_json_array(path, first)
    settings = make_settings(sources_file(tmp_path, policy))
    before, _, _ = await run(pool, settings)
    assert before["status"] == "success"
    assert before["sources"]["json"]["drift"] == []
    assert await json_prices(pool) == prices(first, OLD)

    later = a_day_later(first)
    write_json_array(path, renamed(later))
    result, _, _ = await run(pool, settings)

    source = result["sources"]["json"]
    the_rename(source["drift"])
    assert await drift_count(pool, "renamed") == 1
    assert source["raw_inserted"] == len(later)
    assert await count(pool, "raw_third_source_data") == len(first) + len(later)
    if policy == "evolve":
        assert result["status"] == "success"
        assert (source["status"], source["rejected"]) == ("success", 0)
        assert await json_prices(pool) == prices(later, OLD)
    else:
        assert result["status"] == "partial"
        assert source["status"] == "failed"
        assert "schema drift under freeze policy" in source["error"]
        # Yesterday's values stand; today's records wait in raw.
        assert await json_prices(pool) == prices(first, OLD)
        stored = await raw_payloads(pool, "raw_third_source_data")
        assert stored[len(first) :] == renamed(later)
