"""Invalid records are rejected with a reason and still kept in raw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from tests.helpers import (
    count,
    csv_entry,
    csv_payload,
    csv_rows,
    make_settings,
    run_etl,
    write_csv,
    write_sources,
)

T = "2026-01-01T00:00:00Z"
BAD_ROWS = {
    ("   ", "1", T): ("name", "empty"),
    ("Alpha", "abc", T): ("value", "not a number: 'abc'"),
    ("Beta", "NaN", T): ("value", "not a finite number: 'NaN'"),
    ("Gamma", "", T): ("value", "missing"),
    ("Delta", "1", "yesterday"): ("observed_at", "not a timestamp: 'yesterday'"),
}


async def test_five_bad_rows_give_five_rejections_pointing_at_their_raw_rows(
    pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    good = csv_rows(7)
    rows = [*good[:3], *BAD_ROWS, *good[3:]]
    write_csv(tmp_path / "prices.csv", rows)
    settings = make_settings(write_sources(tmp_path, csv_entry("prices.csv")))

    run = await run_etl(pool, settings)

    assert run["status"] == "partial"
    csv = run["sources"]["csv"]
    assert (csv["status"], csv["error"]) == ("success", None)
    assert (csv["fetched"], csv["raw_inserted"], csv["rejected"], csv["unified_upserted"]) == (
        12,
        12,
        5,
        7,
    )
    assert await count(pool, "raw_csv_data") == 12
    assert await count(pool, "unified_data") == 7
    found = await pool.fetch(
        """SELECT r.payload, j.field, j.reason, j.raw_table, j.source, j.run_id::text AS run_id
        FROM etl_rejections j JOIN raw_csv_data r ON r.id = j.raw_id"""
    )
    assert await count(pool, "etl_rejections") == 5
    assert {
        (json.dumps(json.loads(row["payload"]), sort_keys=True), row["field"], row["reason"])
        for row in found
    } == {
        (json.dumps(csv_payload(bad), sort_keys=True), field, reason)
        for bad, (field, reason) in BAD_ROWS.items()
    }
    assert {(row["raw_table"], row["source"], row["run_id"]) for row in found} == {
        ("raw_csv_data", "csv", run["id"])
    }

    # Re-reading the same file (checkpoint forgotten) rejects nothing twice.
    await pool.execute("DELETE FROM etl_checkpoint")
    again = await run_etl(pool, settings)
    assert (again["sources"]["csv"]["duplicates"], again["sources"]["csv"]["rejected"]) == (12, 0)
    assert again["status"] == "success"
    assert await count(pool, "etl_rejections") == 5
