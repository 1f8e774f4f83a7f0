"""Identity on real captures of both upstreams (tests/captures, PROVENANCE.md).

2,500 CoinPaprika tickers and a CoinGecko page, loaded through the pipeline,
then compared with the hand-checked pairs: at least 90% of the assets present
in both end in one row, and no row holds two different assets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.identity import GECKO, PAPRIKA, SOURCES, figures, truth
from tests.helpers import make_settings, run_etl


@pytest.mark.parametrize(
    ("capture", "order"),
    [
        pytest.param("2022", ("api", "json"), id="2022"),
        pytest.param("2023", ("json", "api"), id="2023"),
    ],
)
async def test_real_captures_end_in_one_row_per_asset(
    pool: asyncpg.Pool[Any], tmp_path: Path, capture: str, order: tuple[str, str]
) -> None:
    sources = tmp_path / "sources.toml"
    sources.write_text(SOURCES.format(paprika=PAPRIKA, gecko=GECKO[capture]), encoding="utf-8")
    settings = make_settings(sources)
    for source in order:
        run = await run_etl(pool, settings, [source])
        assert run["status"] == "success", run

    links = await pool.fetch("SELECT source, source_key, name, rule FROM unified_links")
    found = figures(capture, " then ".join(order), links, truth(capture))

    assert found.one_row_share >= 0.9, found.split
    assert found.merged_across == []
    assert found.merged_within == 0
    # Every valid record's key is linked, and every row has its links.
    assert len(links) == 2500 + found.gecko_records
    assert found.rows == await pool.fetchval("SELECT count(*) FROM unified_data")
    # Both Aave tickers of one CoinPaprika response are two rows; CoinGecko's
    # Aave joins the one with its ticker.
    rows = {(r["source"], r["source_key"]): r["name"] for r in links}
    assert rows[("api", "aave-new")] != rows[("api", "lend-ethlend")]
    assert rows[("json", "aave")] == rows[("api", "aave-new")]
