"""Secrets for any ``http`` source: ``${VAR}`` in its ``headers`` comes from the
environment when the sources file is read, never from the file, and never
shows in a log line, an error or a stored run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from config.errors import ConfigError
from config.sources import load_sources
from tests.fakes.upstream import FakeUpstream, Fault
from tests.helpers import cli_env, make_settings, run_cli, ticker, write_sources

SECRET = "cg-demo-7f3a9c1e5b"  # pragma: allowlist secret
TICKERS = [ticker(f"Gecko Coin {i}", 1.0 + i, f"2026-01-02T00:00:{i:02d}Z") for i in range(3)]


def _gecko(url: str, headers: str) -> str:
    return (
        f'[[sources]]\nname = "gecko"\nkind = "http"\nlocation = "{url}"\n'
        "rate_limit_per_second = 0.0\nmax_retries = 0\ntimeout_seconds = 10\n"
        f"headers = {headers}\n"
        'mapping = { name = "name", value = "quotes.USD.price", '
        'observed_at = "last_updated", id = "id" }\n'
    )


def test_variables_in_header_values_are_replaced_from_the_environment(tmp_path: Path) -> None:
    headers = (
        '{ "x-cg-demo-api-key" = "${COINGECKO_API_KEY}", "x-pair" = "${A}:${B}", "x-fixed" = "1" }'
    )
    settings = make_settings(write_sources(tmp_path, _gecko("http://127.0.0.1:9/t", headers)))
    env = {"COINGECKO_API_KEY": SECRET, "A": "left", "B": "right"}
    (gecko,) = load_sources(settings, env)
    assert gecko.headers == {"x-cg-demo-api-key": SECRET, "x-pair": "left:right", "x-fixed": "1"}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("${COINGECKO_API_KEY}", "COINGECKO_API_KEY is not set"),
        ("${EMPTY_ONE}", "EMPTY_ONE is not set"),
        ("${not a name}", "'${not a name}' is not ${NAME}"),
        ("${LINE}", "line break"),
    ],
)
def test_a_header_that_cannot_be_resolved_is_refused_naming_it(
    tmp_path: Path, value: str, needle: str
) -> None:
    headers = f'{{ "x-cg-demo-api-key" = "{value}" }}'
    settings = make_settings(write_sources(tmp_path, _gecko("http://127.0.0.1:9/t", headers)))
    with pytest.raises(ConfigError) as refused:
        load_sources(settings, {"EMPTY_ONE": "", "LINE": "a\r\nx-injected: 1"})
    message = str(refused.value)
    assert needle in message
    assert "x-cg-demo-api-key" in message
    assert "gecko" in message
    assert "x-injected" not in message


async def test_an_unset_variable_stops_every_command_with_one_line_and_exit_2(
    tmp_path: Path, database_url: str
) -> None:
    headers = '{ "x-cg-demo-api-key" = "${COINGECKO_API_KEY}" }'
    sources = write_sources(tmp_path, _gecko("http://127.0.0.1:9/t", headers))
    env = cli_env(database_url, sources)
    for command in (("serve", "--port", "0"), ("etl", "run"), ("db", "upgrade")):
        result = await asyncio.to_thread(run_cli, *command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert "COINGECKO_API_KEY" in lines[0]
        assert "Traceback" not in result.stderr


async def test_the_secret_reaches_the_upstream_and_nothing_else(
    tmp_path: Path, database_url: str
) -> None:
    # The upstream refuses the key (401): the failure path writes the most.
    with FakeUpstream(TICKERS, require_auth="not-what-we-send") as fake:
        headers = '{ "x-cg-demo-api-key" = "${COINGECKO_API_KEY}" }'
        sources = write_sources(tmp_path, _gecko(fake.url, headers))
        env = cli_env(database_url, sources, COINGECKO_API_KEY=SECRET, LOG_LEVEL="debug")
        failed = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env)
        fake.enqueue(Fault.ok())
        fake.require_auth = None
        succeeded = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env)
        seen = [r.headers.get("x-cg-demo-api-key") for r in fake.requests]
    assert seen == [SECRET, SECRET]
    assert json.loads(failed.stdout)["status"] == "failed"
    assert json.loads(succeeded.stdout)["status"] == "success"
    for result in (failed, succeeded):
        assert SECRET not in result.stdout
        assert SECRET not in result.stderr
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT string_agg(coalesce(error, '') || drift::text, ' ') FROM etl_run_sources"
        )
    finally:
        await conn.close()
    assert SECRET not in stored
    assert "401" in stored


def test_the_api_source_still_takes_api_source_key(tmp_path: Path) -> None:
    entry = _gecko("http://127.0.0.1:9/t", "{}").replace('name = "gecko"', 'name = "api"')
    settings = make_settings(write_sources(tmp_path, entry), API_SOURCE_KEY="paprika-key")
    (api,) = load_sources(settings, {})
    assert api.auth_key == "paprika-key"  # pragma: allowlist secret
    assert api.headers == {}
