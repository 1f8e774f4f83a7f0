"""Shared building blocks of the pipeline and CLI tests.

Each test writes its own ``sources.toml`` and data files into ``tmp_path``; the
``api`` source, when declared, always points at the local fake upstream.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings, load_settings
from config.sources import load_sources
from observability.metrics import Metrics, exposition
from persistence.metric_totals import read_totals
from pipelines.runner import Runner

REPO_ROOT = Path(__file__).resolve().parent.parent

CSV_HEADER = ("name", "value", "updated_at")
RAW_TABLES = {"api": "raw_api_data", "csv": "raw_csv_data", "json": "raw_third_source_data"}

API_MAPPING = (
    'mapping = { name = "name", value = "quotes.USD.price", '
    'observed_at = "last_updated", id = "id" }'
)
CSV_MAPPING = 'mapping = { name = "name", value = "value", observed_at = "updated_at" }'
JSON_MAPPING = (
    'mapping = { name = "name", value = "current_price", observed_at = "last_updated", id = "id" }'
)


# -- sources files ------------------------------------------------------------------


def api_entry(url: str, *, name: str = "api", max_retries: int = 0) -> str:
    """An ``http`` source with no rate limit (tests never wait on the bucket)."""
    return (
        f'[[sources]]\nname = "{name}"\nkind = "http"\nlocation = "{url}"\n'
        f"rate_limit_per_second = 0.0\nmax_retries = {max_retries}\ntimeout_seconds = 10\n"
        f"{API_MAPPING}\n"
    )


def csv_entry(location: str | Path, *, name: str = "csv") -> str:
    return f'[[sources]]\nname = "{name}"\nkind = "csv"\nlocation = \'{location}\'\n{CSV_MAPPING}\n'


def json_entry(location: str | Path, *, name: str = "json") -> str:
    return (
        f'[[sources]]\nname = "{name}"\nkind = "json"\nlocation = \'{location}\'\n{JSON_MAPPING}\n'
    )


def write_sources(directory: Path, *entries: str) -> Path:
    """``directory/sources.toml`` declaring ``entries`` in this order (the tie-break order)."""
    path = directory / "sources.toml"
    path.write_text("\n".join(entries), encoding="utf-8")
    return path


def make_settings(sources_file: Path, **env: str | int) -> Settings:
    """Settings as the service would build them from these variables (no ``.env``)."""
    environ = {"SOURCES_FILE": str(sources_file), "LOG_FORMAT": "json"}
    environ.update({key: str(value) for key, value in env.items()})
    return load_settings(environ, env_file=None)


async def run_etl(
    pool: asyncpg.Pool[Any], settings: Settings, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """One run, as ``kasparro etl run`` does it; returns the run object."""
    runner = Runner(pool, settings, load_sources(settings), Metrics())
    run: dict[str, Any] = msgspec.to_builtins(await runner.run("test", names))
    return run


# -- data files ---------------------------------------------------------------------


def csv_bytes(rows: Iterable[Sequence[str]], header: Sequence[str] | None = CSV_HEADER) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def write_csv(path: Path, rows: Iterable[Sequence[str]]) -> None:
    path.write_bytes(csv_bytes(rows))


def append_csv(path: Path, rows: Iterable[Sequence[str]]) -> None:
    with path.open("ab") as handle:
        handle.write(csv_bytes(rows, header=None))


def csv_rows(count: int, *, prefix: str = "coin", start: int = 0) -> list[tuple[str, str, str]]:
    """``count`` distinct, valid rows: ``(f"{prefix} {i}", value, timestamp)``."""
    return [
        (f"{prefix} {i}", f"{i}.5", f"2026-01-01T00:{(i // 60) % 60:02d}:{i % 60:02d}Z")
        for i in range(start, start + count)
    ]


def csv_payload(row: Sequence[str]) -> dict[str, str]:
    """The raw payload a CSV row is stored as."""
    return dict(zip(CSV_HEADER, row, strict=True))


def row_end_offsets(path: Path) -> list[int]:
    """Byte offset just after each data row (the file has a header and one line per row)."""
    ends: list[int] = []
    position = 0
    with path.open("rb") as handle:
        for index, line in enumerate(handle):
            position += len(line)
            if index > 0:
                ends.append(position)
    return ends


def coin(name: str, price: float, updated: str, *, coin_id: str | None = None) -> dict[str, Any]:
    """A CoinGecko ``coins/markets`` item (the ``json`` source's shape)."""
    return {
        "id": coin_id or name.strip().lower().replace(" ", "-"),
        "symbol": name.strip()[:3].lower(),
        "name": name,
        "current_price": price,
        "market_cap": price * 1000,
        "last_updated": updated,
    }


def ticker(
    name: str, price: float, updated: str, *, ticker_id: str | None = None
) -> dict[str, Any]:
    """A CoinPaprika ``/v1/tickers`` item (the ``api`` source's shape)."""
    return {
        "id": ticker_id or "t-" + name.strip().lower().replace(" ", "-"),
        "name": name,
        "symbol": name.strip()[:3].upper(),
        "rank": 1,
        "last_updated": updated,
        "quotes": {"USD": {"price": price, "volume_24h": price * 10}},
    }


def write_json_array(path: Path, items: Sequence[Mapping[str, Any]]) -> None:
    path.write_text(json.dumps(list(items), indent=1), encoding="utf-8")


def write_json_lines(path: Path, items: Sequence[Mapping[str, Any]], *, mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")


# -- database -----------------------------------------------------------------------


async def count(pool: asyncpg.Pool[Any], table: str) -> int:
    value: int = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def raw_counts(pool: asyncpg.Pool[Any]) -> dict[str, int]:
    return {name: await count(pool, table) for name, table in RAW_TABLES.items()}


async def raw_payloads(pool: asyncpg.Pool[Any], table: str) -> list[Any]:
    """Every payload of a raw table, decoded, in id order."""
    rows = await pool.fetch(f"SELECT payload FROM {table} ORDER BY id")
    return [json.loads(row["payload"]) for row in rows]


async def unified_rows(pool: asyncpg.Pool[Any]) -> list[dict[str, Any]]:
    """Every column of every unified row, ordered by name."""
    rows = await pool.fetch("SELECT * FROM unified_data ORDER BY name")
    return [dict(row) for row in rows]


async def unified_row(pool: asyncpg.Pool[Any], name: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        "SELECT name, value, source, observed_at FROM unified_data WHERE name = $1", name
    )
    return None if row is None else dict(row)


async def checkpoint(pool: asyncpg.Pool[Any], source: str) -> dict[str, Any] | None:
    raw = await pool.fetchval("SELECT cursor FROM etl_checkpoint WHERE source = $1", source)
    return None if raw is None else dict(json.loads(raw))


#: Samples of a text exposition: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

DRIFT_KINDS = ("added", "missing", "renamed", "type_changed")


def parse_samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def db_metric_samples(pool: asyncpg.Pool[Any], sources: Sequence[str]) -> Samples:
    """The etl_* samples a scrape of any replica would show now (read from the database)."""
    text = exposition(Metrics(), await read_totals(pool), sources, DRIFT_KINDS)
    return parse_samples(text.decode())


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


# -- the command line ---------------------------------------------------------------


_PINNED_BLANK = (
    "DATABASE_URL",
    "APP_ENV",
    "API_KEY",
    "API_SOURCE_URL",
    "API_SOURCE_KEY",
    "CSV_SOURCE_PATH",
    "JSON_SOURCE_PATH",
    "SOURCES_FILE",
    "ETL_FAIL_AFTER_RECORDS",
    "ETL_BATCH_SIZE",
    "ETL_PARSE_PROCESS_MIN_BYTES",
)


def cli_env(
    database_url: str | None, sources_file: Path | None, **extra: str | int
) -> dict[str, str]:
    """A clean environment for ``python -m app.cli``: only what the test sets, plus PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR")
    }
    # The environment wins over a developer's .env in the repository; blank means unset.
    env.update(dict.fromkeys(_PINNED_BLANK, ""))
    env.update(LOG_FORMAT="json", LOG_LEVEL="info", PYTHONDONTWRITEBYTECODE="1")
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if sources_file is not None:
        env["SOURCES_FILE"] = str(sources_file)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def kasparro_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kasparro_command(*args),
        cwd=REPO_ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
