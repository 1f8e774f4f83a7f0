"""The bench's inputs: sizes, deterministic data files, and the sources files that point at them.

Every generator is seeded, so two runs with the same sizes read identical bytes.
The CSV carries the quirks real exports have (mixed case, stray whitespace, an
occasional empty value that the pipeline must reject).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
# Observations spread over 30 days, so rows of one name arrive out of time order.
SPREAD_SECONDS = 30 * 24 * 3600
# One row in this many has an empty value cell (rejected by the pipeline and the reference).
EMPTY_VALUE_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each scenario's input is."""

    label: str
    csv_rows: int
    csv_names: int
    jsonl_records: int
    jsonl_names: int
    memory_rows: int
    memory_names: int
    http_records: int
    http_pages: int
    noop_http_records: int
    """Records of the one-response API scenarios (``noop_http``, ``refresh_http``)."""
    scrape_runs: int
    read_seconds: float
    warmup_seconds: float
    rounds: int = 1
    """Loads of each ingestion scenario, Kasparro and reference taking turns."""

    @property
    def http_page_size(self) -> int:
        return self.http_records // self.http_pages

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Sizes(
    label="full",
    csv_rows=1_000_000,
    csv_names=100_000,
    jsonl_records=200_000,
    jsonl_names=50_000,
    memory_rows=3_000_000,
    memory_names=300_000,
    http_records=100_000,
    http_pages=100,
    noop_http_records=10_000,
    scrape_runs=1_000_000,
    read_seconds=5.0,
    warmup_seconds=1.0,
    rounds=3,
)

# A smoke check: every scenario, small inputs. Reads still see 100k unified rows.
QUICK = Sizes(
    label="quick",
    csv_rows=100_000,
    csv_names=100_000,
    jsonl_records=20_000,
    jsonl_names=5_000,
    memory_rows=300_000,
    memory_names=300_000,
    http_records=10_000,
    http_pages=10,
    noop_http_records=10_000,
    scrape_runs=100_000,
    read_seconds=3.0,
    warmup_seconds=0.5,
)


def _iso(ts: datetime, *, millis: bool = False) -> str:
    if millis:
        return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _quirky(name: str, rng: random.Random) -> str:
    """The same coin spelled the ways exports spell it."""
    roll = rng.random()
    if roll < 0.10:
        return name.upper()
    if roll < 0.20:
        return f"  {name} "
    if roll < 0.25:
        return name.replace(" ", "  ")
    return name


def write_csv(path: Path, rows: int, names: int, *, seed: int, shift_days: int = 0) -> Path:
    """``name,value,updated_at`` with ``rows`` rows over ``names`` distinct coins.

    Every name appears ``rows / names`` times, in shuffled passes, with random
    timestamps: a name's rows arrive out of time order (the newest-wins rule has
    real work to do). ``shift_days`` moves
    every timestamp later, so a second file overwrites the first one's winners.
    """
    rng = random.Random(seed)
    base = BASE_TIME + timedelta(days=shift_days)
    order = list(range(names))
    tmp = path.with_suffix(".part")
    with tmp.open("w", encoding="utf-8", newline="") as out:
        out.write("name,value,updated_at\n")
        lines: list[str] = []
        for i in range(rows):
            if i % names == 0:
                # Each pass over the names is shuffled anew: every name is present.
                rng.shuffle(order)
            name = _quirky(f"Coin {order[i % names]}", rng)
            value = "" if i % EMPTY_VALUE_EVERY == 7 else f"{rng.uniform(0.0001, 90_000):.6f}"
            ts = base + timedelta(seconds=rng.randrange(SPREAD_SECONDS))
            lines.append(f"{name},{value},{_iso(ts)}\n")
            if len(lines) >= 10_000:
                out.writelines(lines)
                lines.clear()
        out.writelines(lines)
    tmp.replace(path)
    return path


def _gecko(k: int, rng: random.Random) -> dict[str, Any]:
    price = round(rng.uniform(0.0001, 90_000), 6)
    supply = float(rng.randrange(1_000, 10**9))
    ts = BASE_TIME + timedelta(
        seconds=rng.randrange(SPREAD_SECONDS), milliseconds=rng.randrange(1000)
    )
    return {
        "id": f"coin-{k}",
        "symbol": f"c{k}",
        "name": f"Coin {k}",
        "image": f"https://assets.example/coins/{k}/large.png",
        "current_price": price,
        "market_cap": round(price * supply, 2),
        "market_cap_rank": k + 1,
        "fully_diluted_valuation": round(price * supply * 1.1, 2),
        "total_volume": round(price * supply / 50, 2),
        "high_24h": round(price * 1.03, 6),
        "low_24h": round(price * 0.97, 6),
        "price_change_24h": round(price * 0.01, 6),
        "price_change_percentage_24h": round(rng.uniform(-9, 9), 5),
        "circulating_supply": supply,
        "total_supply": supply,
        "max_supply": None,
        "ath": round(price * 2, 6),
        "ath_date": "2025-10-06T18:57:42.558Z",
        "roi": None,
        "last_updated": _iso(ts, millis=True),
    }


def write_jsonl(path: Path, records: int, names: int, *, seed: int) -> Path:
    """CoinGecko ``coins/markets`` objects, one per line."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".part")
    with tmp.open("w", encoding="utf-8") as out:
        lines: list[str] = []
        for _ in range(records):
            lines.append(json.dumps(_gecko(rng.randrange(names), rng), separators=(",", ":")))
            lines.append("\n")
            if len(lines) >= 20_000:
                out.writelines(lines)
                lines.clear()
        out.writelines(lines)
    tmp.replace(path)
    return path


def make_tickers(records: int, *, seed: int, shift_days: int = 0) -> list[dict[str, Any]]:
    """CoinPaprika ``/v1/tickers`` items, one per coin (an upstream lists each coin once).

    Coin ``i`` has the same id and name whatever the seed: another seed with a
    later ``shift_days`` is the same coins refreshed, with new prices and newer
    timestamps.
    """
    rng = random.Random(seed)
    base = BASE_TIME + timedelta(days=shift_days)
    tickers: list[dict[str, Any]] = []
    for i in range(records):
        price = round(rng.uniform(0.0001, 90_000), 6)
        supply = rng.randrange(1_000, 10**9)
        ts = base + timedelta(seconds=rng.randrange(SPREAD_SECONDS))
        tickers.append(
            {
                "id": f"c{i}-coin-{i}",
                "name": f"Coin {i}",
                "symbol": f"C{i}",
                "rank": i + 1,
                "circulating_supply": supply,
                "total_supply": supply,
                "max_supply": 0,
                "beta_value": round(rng.uniform(0.5, 1.5), 4),
                "first_data_at": "2013-04-28T00:00:00Z",
                "last_updated": _iso(ts),
                "quotes": {
                    "USD": {
                        "price": price,
                        "volume_24h": round(price * 1_000, 2),
                        "market_cap": round(price * supply, 2),
                        "percent_change_24h": round(rng.uniform(-9, 9), 2),
                    }
                },
            }
        )
    return tickers


@dataclass(frozen=True, slots=True)
class Inputs:
    """Paths of the generated files and the sources files that declare them."""

    folder: Path
    csv: Path
    csv_second: Path
    csv_third: Path
    jsonl: Path
    memory_csv: Path
    sources_file: Path
    csv_only_sources_file: Path
    api_only_sources_file: Path
    tickers_seed: int = 4


# Placeholder: the real upstream address is given by API_SOURCE_URL once it listens.
_UPSTREAM_PLACEHOLDER = "http://127.0.0.1:9/v1/tickers"


def _sources_toml(csv: Path, jsonl: Path | None, http_page_size: int | None) -> str:
    parts: list[str] = []
    if http_page_size is not None:
        parts.append(
            "[[sources]]\n"
            'name = "api"\nkind = "http"\n'
            f'location = "{_UPSTREAM_PLACEHOLDER}"\n'
            "rate_limit_per_second = 0\nmax_retries = 2\ntimeout_seconds = 60\n"
            f"page_size = {http_page_size}\n"
            'mapping = { name = "name", value = "quotes.USD.price", '
            'observed_at = "last_updated", id = "id" }\n'
        )
    parts.append(
        "[[sources]]\n"
        'name = "csv"\nkind = "csv"\n'
        f"location = {json.dumps(str(csv))}\n"
        'mapping = { name = "name", value = "value", observed_at = "updated_at" }\n'
    )
    if jsonl is not None:
        parts.append(
            "[[sources]]\n"
            'name = "json"\nkind = "json"\n'
            f"location = {json.dumps(str(jsonl))}\n"
            'mapping = { name = "name", value = "current_price", '
            'observed_at = "last_updated", id = "id" }\n'
        )
    return "# Written by the bench.\n\n" + "\n".join(parts)


def _api_only_toml() -> str:
    """The ``api`` source alone, one request for the whole collection (the shipped default)."""
    return (
        "# Written by the bench.\n\n[[sources]]\n"
        'name = "api"\nkind = "http"\n'
        f'location = "{_UPSTREAM_PLACEHOLDER}"\n'
        "rate_limit_per_second = 0\nmax_retries = 2\ntimeout_seconds = 60\npage_size = 0\n"
        'mapping = { name = "name", value = "quotes.USD.price", '
        'observed_at = "last_updated", id = "id" }\n'
    )


def prepare(folder: Path, sizes: Sizes, needed: set[str], log: Any = print) -> Inputs:
    """Generate the files ``needed`` names (``csv``, ``csv_second``, ``csv_third``,
    ``jsonl``, ``memory_csv``) unless an identical one is already in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(
        folder=folder,
        csv=folder / f"rows-{sizes.csv_rows}-names-{sizes.csv_names}.csv",
        csv_second=folder / f"rows-{sizes.csv_rows}-names-{sizes.csv_names}-second.csv",
        csv_third=folder / f"rows-{sizes.csv_rows}-names-{sizes.csv_names}-third.csv",
        jsonl=folder / f"records-{sizes.jsonl_records}-names-{sizes.jsonl_names}.jsonl",
        memory_csv=folder / f"rows-{sizes.memory_rows}-names-{sizes.memory_names}.csv",
        sources_file=folder / "sources.toml",
        csv_only_sources_file=folder / "sources-csv-only.toml",
        api_only_sources_file=folder / "sources-api-only.toml",
    )
    plans: dict[str, tuple[Path, Any]] = {
        "csv": (inputs.csv, lambda p: write_csv(p, sizes.csv_rows, sizes.csv_names, seed=1)),
        "csv_second": (
            inputs.csv_second,
            lambda p: write_csv(p, sizes.csv_rows, sizes.csv_names, seed=2, shift_days=40),
        ),
        "csv_third": (
            inputs.csv_third,
            lambda p: write_csv(p, sizes.csv_rows, sizes.csv_names, seed=3, shift_days=80),
        ),
        "jsonl": (
            inputs.jsonl,
            lambda p: write_jsonl(p, sizes.jsonl_records, sizes.jsonl_names, seed=5),
        ),
        "memory_csv": (
            inputs.memory_csv,
            lambda p: write_csv(p, sizes.memory_rows, sizes.memory_names, seed=6),
        ),
    }
    for key in sorted(needed):
        path, make = plans[key]
        if path.is_file():
            continue
        log(f"  generating {path.name}")
        make(path)
    inputs.sources_file.write_text(
        _sources_toml(inputs.csv, inputs.jsonl, sizes.http_page_size), encoding="utf-8"
    )
    inputs.csv_only_sources_file.write_text(_sources_toml(inputs.csv, None, None), encoding="utf-8")
    inputs.api_only_sources_file.write_text(_api_only_toml(), encoding="utf-8")
    return inputs
