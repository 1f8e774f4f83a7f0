"""Settings and the sources file: bad values name the setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import environment, load_settings
from config.sources import load_sources, select_sources
from tests.helpers import CSV_MAPPING, api_entry, csv_entry, json_entry, write_sources


@pytest.fixture
def sources_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return write_sources(
        tmp_path,
        api_entry("http://127.0.0.1:9/v1/tickers"),
        csv_entry("data/prices.csv"),
        json_entry("data/coins.json"),
    )


def test_defaults(sources_file: Path) -> None:
    settings = load_settings({"SOURCES_FILE": str(sources_file)}, env_file=None)
    assert settings.database_url is None
    assert settings.etl_interval_seconds == 300.0
    assert settings.etl_on_startup is True
    assert settings.etl_fail_after_records is None
    assert settings.etl_batch_size == 10_000
    assert settings.etl_parse_process_min_bytes == 8 * 1024 * 1024
    assert settings.data_cache_bytes == 16 * 1024 * 1024
    assert settings.etl_lease_seconds == 30.0
    assert (settings.database_pool_size, settings.database_run_pool_size) == (10, 3)
    assert settings.database_statement_cache_size == 100
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.app_env == "development"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://u@h/db"),
        ("DATABASE_URL", "postgresql://u@h:notaport/db"),
        ("DATABASE_LISTEN_URL", "http://db:5432/k"),
        ("EVENTS_KEEPALIVE_SECONDS", "0"),
        ("ETL_INTERVAL_SECONDS", "-1"),
        ("ETL_INTERVAL_SECONDS", "soon"),
        ("ETL_INTERVAL_SECONDS", "nan"),
        ("ETL_FAIL_AFTER_RECORDS", "-3"),
        ("ETL_BATCH_SIZE", "0"),
        ("ETL_PARSE_PROCESS_MIN_BYTES", "-1"),
        ("ETL_PARSE_PROCESS_MIN_BYTES", "8MB"),
        ("DATA_CACHE_BYTES", "-1"),
        ("DATA_CACHE_BYTES", "16MiB"),
        ("ETL_LEASE_SECONDS", "0.5"),
        ("ETL_LEASE_SECONDS", "forever"),
        ("DATABASE_POOL_SIZE", "0"),
        ("DATABASE_RUN_POOL_SIZE", "1"),
        ("DATABASE_STATEMENT_CACHE_SIZE", "-1"),
        ("DATABASE_STATEMENT_CACHE_SIZE", "off"),
        ("ETL_ON_STARTUP", "maybe"),
        ("PORT", "70000"),
        ("API_SOURCE_URL", "ftp://example.invalid/x"),
        ("CSV_SOURCE_PATH", "/no/such/file.csv"),
        ("JSON_SOURCE_PATH", "/no/such/file.json"),
        ("SOURCES_FILE", "/no/such/sources.toml"),
        ("LOG_FORMAT", "xml"),
        ("APP_ENV", "staging"),
    ],
)
def test_a_bad_setting_is_refused_with_its_name(sources_file: Path, name: str, value: str) -> None:
    environ = {"SOURCES_FILE": str(sources_file), name: value}
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, env_file=None)
    message = str(caught.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("extra", "name"),
    [({}, "API_KEY"), ({"API_KEY": "k", "ETL_FAIL_AFTER_RECORDS": "5"}, "ETL_FAIL_AFTER_RECORDS")],
)
def test_production_refuses_development_conveniences(
    sources_file: Path, extra: dict[str, str], name: str
) -> None:
    environ = {"SOURCES_FILE": str(sources_file), "APP_ENV": "production", **extra}
    with pytest.raises(ConfigError, match=f"^{name}:"):
        load_settings(environ, env_file=None)


def test_the_env_file_is_read_and_the_environment_wins(tmp_path: Path, sources_file: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport ETL_BATCH_SIZE=7\nETL_INTERVAL_SECONDS='12'\nPORT=9000 # inline\n",
        encoding="utf-8",
    )
    settings = load_settings({"SOURCES_FILE": str(sources_file), "PORT": "9100"}, env_file=env_file)
    assert (settings.etl_batch_size, settings.etl_interval_seconds, settings.port) == (
        7,
        12.0,
        9100,
    )


def test_relative_locations_resolve_against_the_sources_file(sources_file: Path) -> None:
    sources = load_sources(load_settings({"SOURCES_FILE": str(sources_file)}, env_file=None))
    assert [(s.name, s.kind, s.priority) for s in sources] == [
        ("api", "http", 0),
        ("csv", "csv", 1),
        ("json", "json", 2),
    ]
    assert sources[1].location == str(sources_file.parent / "data" / "prices.csv")
    assert sources[0].raw_table == "raw_api_data"
    assert sources[1].raw_table == "raw_csv_data"
    assert sources[2].raw_table == "raw_third_source_data"


def test_overrides_replace_the_default_locations(tmp_path: Path, sources_file: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("name,value,updated_at\n", encoding="utf-8")
    settings = load_settings(
        {
            "SOURCES_FILE": str(sources_file),
            "CSV_SOURCE_PATH": str(other),
            "API_SOURCE_URL": "http://127.0.0.1:9/elsewhere",
            "API_SOURCE_KEY": "upstream-key",
        },
        env_file=None,
    )
    sources = {s.name: s for s in load_sources(settings)}
    assert sources["csv"].location == str(other)
    assert sources["api"].location == "http://127.0.0.1:9/elsewhere"
    assert sources["api"].auth_key == "upstream-key"
    assert sources["csv"].auth_key is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[sources]]\nname = "x"\nkind = "ftp"\nlocation = "a"\n' + CSV_MAPPING, "kind"),
        ('[[sources]]\nname = "x"\nkind = "csv"\nlocation = "a"\n', "mapping"),
        (
            '[[sources]]\nname = "x"\nkind = "csv"\nlocation = "a"\ncolour = 1\n' + CSV_MAPPING,
            "colour",
        ),
        (
            '[[sources]]\nname = "x"\nkind = "csv"\nlocation = "a"\npriority = 1\n' + CSV_MAPPING,
            "priority",
        ),
        ('[[sources]]\nname = "x y"\nkind = "csv"\nlocation = "a"\n' + CSV_MAPPING, "name"),
        ('[[sources]]\nname = "x"\nkind = "http"\nlocation = "nowhere"\n' + CSV_MAPPING, "http"),
        ("[[sources]\n", "SOURCES_FILE"),
        ("", "sources"),
        ("sources = []\n", "declares no [[sources]]"),
    ],
)
def test_a_bad_sources_file_is_refused_with_one_line(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    settings = load_settings({"SOURCES_FILE": str(path)}, env_file=None)
    with pytest.raises(ConfigError) as caught:
        load_sources(settings)
    message = str(caught.value)
    assert message.startswith("SOURCES_FILE:")
    assert needle in message


def test_a_source_declared_twice_is_refused(tmp_path: Path) -> None:
    path = write_sources(tmp_path, csv_entry("a.csv"), csv_entry("b.csv"))
    with pytest.raises(ConfigError, match="declared twice"):
        load_sources(load_settings({"SOURCES_FILE": str(path)}, env_file=None))


def test_selecting_an_unknown_source_names_it(sources_file: Path) -> None:
    sources = load_sources(load_settings({"SOURCES_FILE": str(sources_file)}, env_file=None))
    assert [s.name for s in select_sources(sources, ["json", "api"])] == ["api", "json"]
    with pytest.raises(ConfigError, match="'nope'"):
        select_sources(sources, ["nope"])


def test_a_childs_environment_gives_back_the_very_settings(
    sources_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "prices.csv").write_text("name,value,updated_at\n")
    (tmp_path / "identity.toml").write_text("")
    settings = load_settings(
        {
            "SOURCES_FILE": str(sources_file),
            "IDENTITY_FILE": str(tmp_path / "identity.toml"),
            "DATABASE_URL": "postgresql://u:p%40ss@db:6432/k",  # pragma: allowlist secret
            "API_KEY": "one, two",  # pragma: allowlist secret
            "CSV_SOURCE_PATH": str(tmp_path / "prices.csv"),
            "ETL_INTERVAL_SECONDS": "0.25",
            "ETL_ON_STARTUP": "false",
            "ETL_FAIL_AFTER_RECORDS": "7",
            "ETL_LEASE_SECONDS": "4.5",
            "DATABASE_STATEMENT_CACHE_SIZE": "0",
            "DATABASE_POOL_SIZE": "3",
            "DATABASE_LISTEN_URL": "postgresql://u@db:5432/k",
            "EVENTS_KEEPALIVE_SECONDS": "2.5",
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "debug",
        },
        env_file=None,
    )
    assert load_settings(environment(settings), env_file=None) == settings
    # One variable per setting: a new setting cannot be left out of the child's.
    assert len(environment(settings)) == len(dataclasses.fields(settings))


MALFORMED_DATABASE_URLS = [
    "postgresql://kasparro:Pw-s3cret-9@db:notaport/kasparro",  # pragma: allowlist secret
    "postgresql://kasparro:Pw-s3cret-9@[::1/kasparro",  # pragma: allowlist secret
    "postgresql://kasparro:Pw-s3cret-9@/kasparro",  # pragma: allowlist secret
    "postgresql://kasparro:Pw-s3cret-9@db:99999/kasparro",  # pragma: allowlist secret
    "postgresql://kasparro:Pw@s3cret@9@db:70000/kasparro",  # pragma: allowlist secret
    "postgresql:///kasparro?user=kasparro&password=Pw-s3cret-9",  # pragma: allowlist secret
]


@pytest.mark.parametrize("name", ["DATABASE_URL", "DATABASE_READ_URL"])
@pytest.mark.parametrize("url", MALFORMED_DATABASE_URLS)
def test_a_malformed_database_url_is_refused_without_its_password(
    sources_file: Path, name: str, url: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"SOURCES_FILE": str(sources_file), name: url}, env_file=None)
    message = str(refused.value)
    assert message.startswith(f"{name}: ")
    assert "s3cret" not in message
    assert "***" in message
