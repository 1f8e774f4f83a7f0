"""``reprocess`` rebuilds exactly what ingestion built, across runs and a followed rename."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from config.settings import Settings
from config.sources import load_sources
from pipelines.reprocess import reprocess
from tests.helpers import (
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    make_settings,
    run_etl,
    unified_rows,
    write_csv,
    write_json_array,
    write_sources,
)


def without_updated_at(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # updated_at and seq record when the row was last written, and reprocess writes every row.
    return [{k: v for k, v in row.items() if k not in ("updated_at", "seq")} for row in rows]


def _settings(tmp_path: Path, path: Path, policy: str) -> Settings:
    """The ``json`` source at ``path`` under ``policy``, and four CSV coins."""
    entry = json_entry(path) + f'drift_policy = "{policy}"\n'
    return make_settings(write_sources(tmp_path, entry, csv_entry("prices.csv")))


async def _first_load(
    pool: asyncpg.Pool[Any], tmp_path: Path, policy: str
) -> tuple[Path, list[dict[str, Any]], Settings]:
    """Three JSON coins and four CSV coins, loaded once."""
    path = tmp_path / "coins.json"
    old = [coin(f"Coin {i}", 1.0 + i, f"2026-01-01T00:00:0{i}Z") for i in range(3)]
    write_json_array(path, old)
    write_csv(tmp_path / "prices.csv", csv_rows(4, prefix="csv coin"))
    settings = _settings(tmp_path, path, policy)
    await run_etl(pool, settings)
    return path, old, settings


async def test_reprocess_follows_a_rename_that_ingestion_followed(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path, old, settings = await _first_load(pool, tmp_path, "evolve")

    # The upstream renames its price field; evolve follows the rename.
    renamed = []
    for i in range(3, 6):
        item = coin(f"Coin {i}", 1.0 + i, f"2026-01-02T00:00:0{i}Z")
        item["current_price_usd"] = item.pop("current_price")
        renamed.append(item)
    write_json_array(path, [*old, *renamed])
    run = await run_etl(pool, settings)
    json_counts = run["sources"]["json"]
    assert (json_counts["raw_inserted"], json_counts["rejected"]) == (3, 0)
    assert [e["kind"] for e in json_counts["drift"]] == ["renamed"]
    before = await unified_rows(pool)
    assert len(before) == 10

    await pool.execute("DELETE FROM unified_data")
    written = await reprocess(pool, load_sources(settings))

    assert written == {"json": 6, "csv": 4}
    assert without_updated_at(await unified_rows(pool)) == without_updated_at(before)


async def test_reprocess_leaves_out_what_a_frozen_schema_kept_out(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    path, old, settings = await _first_load(pool, tmp_path, "freeze")

    # Newer prices arrive with a field the frozen schema does not know: the
    # source fails, raw keeps the records and the unified table keeps the old prices.
    newer = [
        {**coin(f"Coin {i}", 100.0 + i, f"2026-01-02T00:00:0{i}Z"), "market_cap_rank": i}
        for i in range(3)
    ]
    write_json_array(path, [*old, *newer])
    run = await run_etl(pool, settings)
    assert run["sources"]["json"]["status"] == "failed"
    assert run["sources"]["json"]["error"].startswith("schema drift under freeze policy")
    assert run["sources"]["json"]["raw_inserted"] == 3
    before = await unified_rows(pool)
    assert sorted(row["value"] for row in before if row["source"] == "json") == [1.0, 2.0, 3.0]

    await pool.execute("DELETE FROM unified_data")
    written = await reprocess(pool, load_sources(settings))

    assert written == {"json": 3, "csv": 4}
    assert without_updated_at(await unified_rows(pool)) == without_updated_at(before)

    # Once the source follows drift, a reprocess brings the waiting records in.
    settings = _settings(tmp_path, path, "evolve")
    assert await reprocess(pool, load_sources(settings)) == {"json": 6, "csv": 4}
    rows = await unified_rows(pool)
    assert sorted(row["value"] for row in rows if row["source"] == "json") == [100.0, 101.0, 102.0]
