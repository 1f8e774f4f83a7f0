"""``kasparro etl run`` as a process: exit codes, ``--json``, one-line errors.

The CLI runs as ``python -m app.cli`` from the repository root with a clean
environment; the ``api`` source points at the fake upstream in a thread.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream, Fault
from tests.helpers import (
    api_entry,
    cli_env,
    coin,
    csv_entry,
    csv_rows,
    json_entry,
    run_cli,
    ticker,
    write_csv,
    write_json_array,
    write_sources,
)

RUN_FIELDS = {"id", "trigger", "status", "started_at", "finished_at", "duration_seconds", "sources"}
SOURCE_FIELDS = {
    "status",
    "fetched",
    "raw_inserted",
    "duplicates",
    "rejected",
    "unified_upserted",
    "error",
    "drift",
}
TICKERS = [ticker(f"Api Coin {i}", 1.0 + i, f"2026-01-02T00:00:{i:02d}Z") for i in range(3)]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(TICKERS) as upstream:
        yield upstream


def files_sources(tmp_path: Path, *extra: str, csv_rows_count: int = 4) -> Path:
    write_csv(tmp_path / "prices.csv", csv_rows(csv_rows_count))
    write_json_array(
        tmp_path / "coins.json",
        [coin(f"Json Coin {i}", 5.0, "2026-01-03T00:00:00Z") for i in range(2)],
    )
    return write_sources(tmp_path, *extra, csv_entry("prices.csv"), json_entry("coins.json"))


def parse_one_line(stdout: str) -> dict[str, Any]:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    run: dict[str, Any] = json.loads(lines[0])
    return run


def assert_run_object(run: dict[str, Any], sources: set[str]) -> None:
    assert set(run) >= RUN_FIELDS
    assert run["id"] == str(uuid.UUID(run["id"]))
    assert run["trigger"] == "cli"
    for field in ("started_at", "finished_at"):
        assert run[field].endswith("Z")
        datetime.fromisoformat(run[field])
    assert isinstance(run["duration_seconds"], int | float)
    assert run["duration_seconds"] >= 0
    assert set(run["sources"]) == sources
    for item in run["sources"].values():
        assert set(item) >= SOURCE_FIELDS
        assert isinstance(item["drift"], list)


def assert_one_clean_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


async def cli(*args: str, env: dict[str, str]) -> Any:
    return await asyncio.to_thread(run_cli, *args, env=env)


async def test_success_exits_0_and_json_prints_exactly_the_run_object(
    database_url: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    env = cli_env(database_url, files_sources(tmp_path, api_entry(fake.url)))

    result = await cli("etl", "run", "--json", env=env)

    assert result.returncode == 0, result.stderr
    run = parse_one_line(result.stdout)
    assert_run_object(run, {"api", "csv", "json"})
    assert run["status"] == "success"
    assert {
        name: (s["status"], s["fetched"], s["raw_inserted"], s["error"])
        for name, s in run["sources"].items()
    } == {
        "api": ("success", 3, 3, None),
        "csv": ("success", 4, 4, None),
        "json": ("success", 2, 2, None),
    }

    summary = await cli("etl", "run", env=env)
    assert summary.returncode == 0, summary.stderr
    assert "success" in summary.stdout.splitlines()[0]


async def test_api_sending_malformed_json_is_partial_and_exits_3(
    database_url: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.enqueue(Fault.raw(b'[{"id": "btc", "name": "Bitc'))
    env = cli_env(database_url, files_sources(tmp_path, api_entry(fake.url)))

    result = await cli("etl", "run", "--json", env=env)

    assert result.returncode == 3, result.stderr
    run = parse_one_line(result.stdout)
    assert_run_object(run, {"api", "csv", "json"})
    assert run["status"] == "partial"
    api = run["sources"]["api"]
    assert (api["status"], api["fetched"], api["raw_inserted"]) == ("failed", 0, 0)
    assert "malformed JSON" in api["error"]
    assert "\n" not in api["error"]
    assert (run["sources"]["csv"]["status"], run["sources"]["csv"]["raw_inserted"]) == (
        "success",
        4,
    )
    assert (run["sources"]["json"]["status"], run["sources"]["json"]["raw_inserted"]) == (
        "success",
        2,
    )
    assert len(fake.requests) == 1


async def test_every_source_failing_exits_1(
    database_url: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.enqueue(Fault.html_200())
    sources_file = write_sources(
        tmp_path, api_entry(fake.url), csv_entry("missing.csv"), json_entry("missing.json")
    )

    result = await cli("etl", "run", "--json", env=cli_env(database_url, sources_file))

    assert result.returncode == 1, result.stderr
    run = parse_one_line(result.stdout)
    assert_run_object(run, {"api", "csv", "json"})
    assert run["status"] == "failed"
    assert {name: s["status"] for name, s in run["sources"].items()} == {
        "api": "failed",
        "csv": "failed",
        "json": "failed",
    }
    assert "file not found" in run["sources"]["csv"]["error"]
    assert "file not found" in run["sources"]["json"]["error"]


async def test_rejected_records_make_the_run_partial(database_url: str, tmp_path: Path) -> None:
    write_csv(tmp_path / "prices.csv", [*csv_rows(2), ("Bad", "n/a", "")])
    env = cli_env(database_url, write_sources(tmp_path, csv_entry("prices.csv")))

    result = await cli("etl", "run", "--json", env=env)

    assert result.returncode == 3, result.stderr
    run = parse_one_line(result.stdout)
    assert run["status"] == "partial"
    assert (run["sources"]["csv"]["status"], run["sources"]["csv"]["rejected"]) == ("success", 1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("etl", "run", "--bogus"), "--bogus"),
        (("etl",), "etl"),
        (("etl", "reset"), "--source"),
        (("frobnicate",), "frobnicate"),
    ],
)
async def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    result = await cli(*args, env=cli_env(None, files_sources(tmp_path)))

    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, needle)


@pytest.mark.parametrize("command", ["run", "reset"])
async def test_unknown_source_name_exits_2_with_one_line(
    database_url: str, tmp_path: Path, command: str
) -> None:
    env = cli_env(database_url, files_sources(tmp_path))

    result = await cli("etl", command, "--source", "nope", env=env)

    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "--source", "nope")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://user@localhost/db"),
        ("CSV_SOURCE_PATH", "{tmp}/no-such.csv"),
        ("ETL_INTERVAL_SECONDS", "-5"),
        ("SOURCES_FILE", "{tmp}/unknown-kind.toml"),
    ],
)
async def test_config_errors_exit_2_with_one_line_naming_the_setting(
    database_url: str, tmp_path: Path, setting: str, value: str
) -> None:
    (tmp_path / "unknown-kind.toml").write_text(
        '[[sources]]\nname = "ftp"\nkind = "ftp"\nlocation = "ftp://example.invalid/x"\n'
        'mapping = { name = "name", value = "value" }\n',
        encoding="utf-8",
    )
    env = cli_env(database_url, files_sources(tmp_path))
    env[setting] = value.format(tmp=tmp_path)

    result = await cli("etl", "run", env=env)

    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, setting)
    if setting == "SOURCES_FILE":
        assert "ftp" in result.stderr
