"""Identity on real captures: how many assets present in both upstreams end in one row.

    python -m bench.identity            # embedded PostgreSQL (or BENCH_DATABASE_URL)
    python -m bench.identity --json     # the figures as one JSON object

Each CoinGecko capture of ``tests/captures`` is loaded with the CoinPaprika
capture through the real pipeline (``kasparro etl run``, one source after the
other, in both orders), then the links are compared with the hand-checked
pairs of ``tests/captures/identity_truth.csv``:

- ``one row``: pairs of the same asset in one row;
- ``split``: pairs of the same asset in two rows (listed);
- ``merged``: keys of *different* assets in one row, across sources (listed;
  must be none), and within a source (impossible by the schema; counted anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.db import DatabaseServer
from bench.proc import REPO_ROOT, kasparro, service_env

CAPTURES = REPO_ROOT / "tests" / "captures"
PAPRIKA = CAPTURES / "coinpaprika_tickers_2023-02-03.json"
GECKO = {
    "2022": CAPTURES / "coingecko_markets_2022-02-23.json",
    "2023": CAPTURES / "coingecko_markets_2023-10-08.json",
}
TRUTH = CAPTURES / "identity_truth.csv"

SOURCES = """
[[sources]]
name = "api"
kind = "json"
location = '{paprika}'
mapping.name = "name"
mapping.value = "quotes.USD.price"
mapping.observed_at = "last_updated"
mapping.id = "id"
mapping.symbol = "symbol"

[[sources]]
name = "json"
kind = "json"
location = '{gecko}'
mapping.name = "name"
mapping.value = "current_price"
mapping.observed_at = "last_updated"
mapping.id = "id"
mapping.symbol = "symbol"
"""


@dataclass(slots=True)
class Figures:
    capture: str
    order: str
    gecko_records: int
    present_in_both: int
    one_row: int = 0
    split: list[tuple[str, str]] = field(default_factory=list)
    merged_across: list[tuple[str, str]] = field(default_factory=list)
    merged_within: int = 0
    rows: int = 0
    rules: dict[str, int] = field(default_factory=dict)

    @property
    def one_row_share(self) -> float:
        return self.one_row / self.present_in_both if self.present_in_both else 1.0


def truth(capture: str) -> dict[str, str]:
    """CoinGecko id -> CoinPaprika id of the same asset, or ``-``."""
    with TRUTH.open(encoding="utf-8") as handle:
        return {
            r["coingecko_id"]: r["coinpaprika_id"]
            for r in csv.DictReader(handle)
            if r["capture"] == capture
        }


async def _links(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT source, source_key, name, rule FROM unified_links")
    finally:
        await conn.close()


def figures(capture: str, order: str, links: Sequence[Any], expected: dict[str, str]) -> Figures:
    """Compare stored links (``source``, ``source_key``, ``name``, ``rule``) with the truth."""
    row_of: dict[tuple[str, str], str] = {}
    keys_of: dict[str, list[tuple[str, str]]] = {}
    rules: dict[str, int] = {}
    for link in links:
        member = (link["source"], link["source_key"])
        row_of[member] = link["name"]
        keys_of.setdefault(link["name"], []).append(member)
        if link["source"] == "json":
            rules[link["rule"]] = rules.get(link["rule"], 0) + 1
    pairs = {g: p for g, p in expected.items() if p != "-"}
    found = Figures(capture, order, len(expected), len(pairs), rows=len(keys_of), rules=rules)
    for gecko, paprika in sorted(pairs.items()):
        if row_of.get(("json", gecko)) == row_of.get(("api", paprika)) is not None:
            found.one_row += 1
        else:
            found.split.append((gecko, paprika))
    for members in keys_of.values():
        sources = [s for s, _ in members]
        found.merged_within += len(sources) - len(set(sources))
        geckos = [k for s, k in members if s == "json"]
        paprikas = [k for s, k in members if s == "api"]
        for gecko in geckos:
            for paprika in paprikas:
                if expected.get(gecko) != paprika:
                    found.merged_across.append((gecko, paprika))
    return found


def measure(server: DatabaseServer, workdir: Path) -> list[Figures]:
    results: list[Figures] = []
    for capture, path in GECKO.items():
        expected = truth(capture)
        sources = workdir / f"sources-{capture}.toml"
        sources.write_text(SOURCES.format(paprika=PAPRIKA, gecko=path), encoding="utf-8")
        for order in (("api", "json"), ("json", "api")):
            url = server.create(f"identity_{capture}_{order[0]}")
            env = service_env(workdir, {"DATABASE_URL": url, "SOURCES_FILE": str(sources)})
            for source in order:
                done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
                    kasparro("etl", "run", "--source", source, "--json"),
                    env=env,
                    cwd=workdir,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"etl run --source {source}: {done.stderr[-800:]}")
            links = asyncio.run(_links(url))
            results.append(figures(capture, " then ".join(order), links, expected))
    return results


def report(results: Sequence[Figures]) -> str:
    lines = [
        "| CoinGecko capture | order | present in both | one row | split "
        "| merged (across / within) |",
        "|---|---|---|---|---|---|",
    ]
    for f in results:
        lines.append(
            f"| {f.capture} ({f.gecko_records} coins) | {f.order} | {f.present_in_both} | "
            f"{f.one_row} ({f.one_row_share:.1%}) | {len(f.split)} | "
            f"{len(f.merged_across)} / {f.merged_within} |"
        )
    for f in results:
        if f.split:
            pairs = ", ".join(f"{g} / {p}" for g, p in f.split)
            lines.append(f"\nsplit ({f.capture}, {f.order}): {pairs}")
        if f.merged_across:
            pairs = ", ".join(f"{g} / {p}" for g, p in f.merged_across)
            lines.append(f"\nMERGED ({f.capture}, {f.order}): {pairs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.identity", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kasparro-identity-") as tmp:
        workdir = Path(tmp)
        server = DatabaseServer.start(workdir)
        try:
            results = measure(server, workdir)
        finally:
            if server.kind == "external":
                server.drop_all()
            else:
                from persistence.database import stop_embedded

                stop_embedded(workdir)
    if args.json:
        print(json.dumps([{**asdict(f), "one_row_share": f.one_row_share} for f in results]))
    else:
        print(report(results))
    ok = all(
        f.one_row_share >= 0.9 and not f.merged_across and not f.merged_within for f in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
