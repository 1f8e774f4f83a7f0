"""``unified_counts`` (the source of ``/data`` totals) stays equal to a real count.

Rows move between sources when a newer record wins, vanish on DELETE, and are
rebuilt by reprocess; the statement triggers must follow every one of those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from config.sources import load_sources
from pipelines.reprocess import reprocess
from tests.helpers import (
    coin,
    csv_entry,
    json_entry,
    make_settings,
    run_etl,
    write_csv,
    write_json_array,
    write_sources,
)

OLD = "2026-01-01T00:00:00Z"
NEW = "2026-02-01T00:00:00Z"


async def _counts(pool: asyncpg.Pool[Any]) -> tuple[dict[str, int], dict[str, int]]:
    kept = {
        r["source"]: r["rows"]
        for r in await pool.fetch("SELECT source, rows FROM unified_counts")
        if r["rows"]
    }
    real = {
        r["source"]: r["n"]
        for r in await pool.fetch("SELECT source, count(*) AS n FROM unified_data GROUP BY 1")
    }
    return kept, real


async def test_counts_follow_wins_deletes_and_reprocess(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    # csv holds 30 names; json later wins 10 of them and adds 5 of its own.
    write_csv(tmp_path / "a.csv", [(f"Coin {i}", str(i), OLD) for i in range(30)])
    write_json_array(tmp_path / "b.json", [])
    settings = make_settings(
        write_sources(tmp_path, csv_entry(tmp_path / "a.csv"), json_entry(tmp_path / "b.json"))
    )
    await run_etl(pool, settings)
    assert await _counts(pool) == ({"csv": 30}, {"csv": 30})

    write_json_array(
        tmp_path / "b.json",
        [coin(f"coin {i}", 100.0 + i, NEW) for i in range(10)]
        + [coin(f"Extra {i}", 1.0, NEW) for i in range(5)],
    )
    await run_etl(pool, settings)
    assert await _counts(pool) == ({"csv": 20, "json": 15}, {"csv": 20, "json": 15})

    await pool.execute("DELETE FROM unified_data WHERE name LIKE 'extra%'")
    assert await _counts(pool) == ({"csv": 20, "json": 10}, {"csv": 20, "json": 10})

    await reprocess(pool, load_sources(settings))
    assert await _counts(pool) == ({"csv": 20, "json": 15}, {"csv": 20, "json": 15})
