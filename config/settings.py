"""Service settings, read once from the environment (and a ``.env`` file).

Each setting is declared once, on :class:`Settings`: its variable, how its text
is parsed and checked, its default and a line saying what it does. Nothing here
runs at import time: :func:`load_settings` is called by the entry points and the
result is passed down.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCES_FILE = REPO_ROOT / "sources.toml"
DEFAULT_API_URL = "https://api.coinpaprika.com/v1/tickers"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Parse = Callable[[str, str], Any]
"""Turns a variable's text (stripped, never empty) into its value; raises
:class:`ConfigError` naming the variable."""


def _text(name: str, raw: str) -> str:
    return raw


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _number(minimum: float, *, above: bool = False) -> Parse:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not value >= minimum or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: must be a finite number >= {minimum:g}, got {raw!r}")
        if above and value == minimum:
            raise ConfigError(f"{name}: must be > {minimum:g}")
        return value

    return parse


def _integer(minimum: int, maximum: int | None = None) -> Parse:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {raw!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}: expected {minimum}..{maximum}, got {raw!r}")
        return value

    return parse


def _choice(*allowed: str, message: str | None = None) -> Parse:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            expected = message or f"one of {sorted(allowed)}"
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")
        return value

    return parse


def _keys(name: str, raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _existing_file(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: file not found: {raw}")
    return path.resolve()


def _database_url(name: str, raw: str) -> str:
    return check_database_url(name, raw)


def _http_url(name: str, raw: str) -> str:
    return check_http_url(name, raw)


def _default_sources_file() -> Path:
    local = Path("sources.toml")
    return local.resolve() if local.is_file() else DEFAULT_SOURCES_FILE


def _default_log_format() -> str:
    return "console" if sys.stdout.isatty() else "json"


def _env(variable: str, parse: Parse, default: Any = None, *, factory: Any = None) -> Any:
    """A setting read from ``variable``; unset or blank gives the default."""
    metadata = {"env": variable, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service, parsed and checked."""

    database_url: str | None = _env("DATABASE_URL", _database_url)
    """External PostgreSQL; ``None`` means the embedded server under ``data_dir``."""
    database_read_url: str | None = _env("DATABASE_READ_URL", _database_url)
    """Optional replica for the read endpoints."""
    database_listen_url: str | None = _env("DATABASE_LISTEN_URL", _database_url)
    """Direct connection for the events listener (LISTEN needs a session of its own,
    which PgBouncer in transaction mode does not keep); the database URL by default."""
    data_dir: Path = _env("DATA_DIR", _path, Path(".data"))
    """Where the embedded database lives."""
    api_keys: tuple[str, ...] = _env("API_KEY", _keys, ())
    """Inbound keys accepted in ``x-api-key``; empty means one is generated at start."""
    app_env: str = _env(
        "APP_ENV",
        _choice("development", "production", "test", message="development or production"),
        "development",
    )
    """``production`` turns on the strict checks."""
    sources_file: Path = _env("SOURCES_FILE", _existing_file, factory=_default_sources_file)
    """The TOML file that declares the sources (``sources.toml`` here, else the repository's)."""
    api_source_url: str | None = _env("API_SOURCE_URL", _http_url)
    """Overrides the location of the ``api`` source."""
    api_source_key: str | None = _env("API_SOURCE_KEY", _text)
    """Upstream key for the ``api`` source, sent as ``Authorization``."""
    csv_source_path: Path | None = _env("CSV_SOURCE_PATH", _existing_file)
    """Overrides the location of the ``csv`` source."""
    json_source_path: Path | None = _env("JSON_SOURCE_PATH", _existing_file)
    """Overrides the location of the ``json`` source."""
    identity_file: Path | None = _env("IDENTITY_FILE", _existing_file)
    """Forced links and splits; ``None``: ``identity.toml`` beside the sources file, if any."""
    etl_interval_seconds: float = _env("ETL_INTERVAL_SECONDS", _number(0), 300.0)
    """Pause between runs of the ingestion loop; 0 means only the startup run."""
    etl_on_startup: bool = _env("ETL_ON_STARTUP", _bool, True)
    """Run once as soon as the service starts."""
    etl_fail_after_records: int | None = _env("ETL_FAIL_AFTER_RECORDS", _integer(0))
    """Controlled failure after this many records read in a run (never in production)."""
    etl_batch_size: int = _env("ETL_BATCH_SIZE", _integer(1), 10_000)
    """Records per batch (one transaction each)."""
    etl_parse_process_min_bytes: int = _env(
        "ETL_PARSE_PROCESS_MIN_BYTES", _integer(0), 8 * 1024 * 1024
    )
    """A file source with at least this much left to read is parsed in a process
    of its own, in parallel with the writes; 0 = always."""
    etl_lease_seconds: float = _env("ETL_LEASE_SECONDS", _number(1), 30.0)
    """How long a run's claim on a source lasts unless renewed (every third of
    it): how soon the sources of a run whose process died are free again."""
    database_pool_size: int = _env("DATABASE_POOL_SIZE", _integer(1), 10)
    """Connections the service's API reads may use at once."""
    database_run_pool_size: int = _env("DATABASE_RUN_POOL_SIZE", _integer(2), 3)
    """Connections of one run (``etl run``, the service's run, ``etl reprocess``)."""
    database_statement_cache_size: int = _env("DATABASE_STATEMENT_CACHE_SIZE", _integer(0), 100)
    """Prepared statements kept per connection; 0 behind a transaction pooler."""
    data_cache_bytes: int = _env("DATA_CACHE_BYTES", _integer(0), 16 * 1024 * 1024)
    """Memory for rendered ``/data`` pages, each served again while the data is
    unchanged; 0 = off."""
    events_keepalive_seconds: float = _env("EVENTS_KEEPALIVE_SECONDS", _number(0.01), 15.0)
    """A comment goes down an idle ``/events`` stream this often."""
    host: str = _env("HOST", _text, "127.0.0.1")
    """Where ``serve`` listens."""
    port: int = _env("PORT", _integer(0, 65535), 8000)
    """The port ``serve`` listens on (0: any free port)."""
    serve_address_file: Path | None = _env("SERVE_ADDRESS_FILE", _path)
    """Where ``serve`` writes the URL it listens on (removed at exit): the
    container's health check reads it, so it follows ``--port`` too."""
    http_header_timeout_seconds: float = _env(
        "HTTP_HEADER_TIMEOUT_SECONDS", _number(0, above=True), 10.0
    )
    """A connection whose request head is incomplete this long is closed."""
    http_keep_alive_seconds: int = _env("HTTP_KEEP_ALIVE_SECONDS", _integer(1), 5)
    """An idle kept-alive connection is closed after this long."""
    log_format: str = _env(
        "LOG_FORMAT",
        _choice("json", "console", message="json or console"),
        factory=_default_log_format,
    )
    """``json`` lines, or ``console`` for a terminal (the default on one)."""
    log_level: str = _env("LOG_LEVEL", _choice(*_LOG_LEVELS), "info")
    """The lowest level logged."""

    @property
    def production(self) -> bool:
        return self.app_env == "production"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the .env file ({exc})") from exc
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


_PASSWORD_PARAMETER = re.compile(r"(password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter)
    replaced by ``***``, for messages; works on URLs too malformed to parse."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # The last @ ends the user part: a password may hold @ or /.
        userinfo, _, location = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{location}"
    return _PASSWORD_PARAMETER.sub(r"\1***", f"{scheme}{sep}{rest}")


def check_database_url(name: str, url: str) -> str:
    """Refuse a URL that is not ``postgresql://…`` with a clear one-line message
    (which never shows the URL's password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port raises on garbage
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot parse {redact_url(url)!r} ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{name}: expected postgresql://user:pass@host:port/db, got scheme {parts.scheme!r}"
        )
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError(f"{name}: no host in {redact_url(url)!r}")
    return url


def check_http_url(name: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot parse {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {url!r}")
    return url


def variables(
    environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env")
) -> dict[str, str]:
    """The variables settings are read from: ``environ`` (the process environment
    by default) over those of the ``.env`` file."""
    env: dict[str, str] = {}
    if env_file is not None:
        env.update(read_env_file(env_file))
    env.update(os.environ if environ is None else environ)
    return env


def load_settings(
    environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env")
) -> Settings:
    """Build :class:`Settings` from the process environment and ``.env``.

    Real environment variables win over the ``.env`` file.

    Raises:
        ConfigError: a setting is invalid; the message names it.
    """
    env = variables(environ, env_file=env_file)
    given: dict[str, Any] = {}
    for spec in dataclasses.fields(Settings):
        raw = env.get(spec.metadata["env"], "").strip()
        if raw:
            given[spec.name] = spec.metadata["parse"](spec.metadata["env"], raw)
    settings = Settings(**given)
    if settings.production and not settings.api_keys:
        raise ConfigError("API_KEY: must be set when APP_ENV=production")
    if settings.production and settings.etl_fail_after_records is not None:
        raise ConfigError("ETL_FAIL_AFTER_RECORDS: not allowed when APP_ENV=production")
    return settings


def _render(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def environment(settings: Settings) -> dict[str, str]:
    """The variables from which :func:`load_settings` builds ``settings`` again:
    how a child process (the service's run) gets the very settings of its parent.
    An empty value means unset."""
    return {
        spec.metadata["env"]: _render(getattr(settings, spec.name))
        for spec in dataclasses.fields(Settings)
    }
