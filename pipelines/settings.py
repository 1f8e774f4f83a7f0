"""Service settings, read once from the environment (and a ``.env`` file).

Nothing here runs at import time: :func:`load_settings` is called by the entry
points and the result is passed down.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCES_FILE = REPO_ROOT / "sources.toml"
DEFAULT_API_URL = "https://api.coinpaprika.com/v1/tickers"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of contract section 2, parsed and checked."""

    database_url: str | None = None
    """External PostgreSQL; ``None`` means the embedded server under ``data_dir``."""
    database_read_url: str | None = None
    """Optional replica for the read endpoints."""
    database_listen_url: str | None = None
    """Direct connection for the events listener (LISTEN needs a session of its own,
    which PgBouncer in transaction mode does not keep); the database URL by default."""
    data_dir: Path = Path(".data")
    """Where the embedded database lives."""
    api_keys: tuple[str, ...] = ()
    """Inbound keys accepted in ``x-api-key``; empty means one is generated at start."""
    app_env: str = "development"
    """``production`` turns on the strict checks."""
    sources_file: Path = DEFAULT_SOURCES_FILE
    """The TOML file that declares the sources."""
    api_source_url: str | None = None
    """Overrides the location of the ``api`` source."""
    api_source_key: str | None = None
    """Upstream key for the ``api`` source, sent as ``Authorization``."""
    csv_source_path: Path | None = None
    """Overrides the location of the ``csv`` source."""
    json_source_path: Path | None = None
    """Overrides the location of the ``json`` source."""
    etl_interval_seconds: float = 300.0
    """Pause between runs of the ingestion loop; 0 means only the startup run."""
    etl_on_startup: bool = True
    """Run once as soon as the service starts."""
    etl_fail_after_records: int | None = None
    """Controlled failure after this many records read in a run (never in production)."""
    etl_batch_size: int = 10_000
    """Records per batch (one transaction each)."""
    etl_parse_process_min_bytes: int = 8 * 1024 * 1024
    """A file source with at least this much left to read is parsed in a process
    of its own, in parallel with the writes; 0 = always."""
    etl_lease_seconds: float = 30.0
    """How long a run's claim on a source lasts unless renewed (every third of
    it): how soon the sources of a run whose process died are free again."""
    database_pool_size: int = 10
    """Connections the service's API reads may use at once."""
    database_run_pool_size: int = 3
    """Connections of one run (``etl run``, the service's run, ``etl reprocess``)."""
    database_statement_cache_size: int = 100
    """Prepared statements kept per connection; 0 behind a transaction pooler."""
    data_cache_bytes: int = 16 * 1024 * 1024
    """Memory for rendered ``/data`` pages, each served again while the data is
    unchanged; 0 = off."""
    events_keepalive_seconds: float = 15.0
    """A comment goes down an idle ``/events`` stream this often."""
    host: str = "127.0.0.1"
    port: int = 8000
    serve_address_file: Path | None = None
    """Where ``serve`` writes the URL it listens on (removed at exit): the
    container's health check reads it, so it follows ``--port`` too."""
    http_header_timeout_seconds: float = 10.0
    """A connection whose request head is incomplete this long is closed."""
    http_keep_alive_seconds: int = 5
    """An idle kept-alive connection is closed after this long."""
    log_format: str = field(
        default_factory=lambda: "json" if not sys.stdout.isatty() else "console"
    )
    log_level: str = "info"

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


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {env[name]!r}")


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not value >= minimum or value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}: must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {raw!r}")
    return value


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


def _existing_file(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: file not found: {raw}")
    return path.resolve()


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

    app_env = env.get("APP_ENV", "").strip().lower() or "development"
    if app_env not in ("development", "production", "test"):
        raise ConfigError(f"APP_ENV: expected development or production, got {app_env!r}")
    production = app_env == "production"

    database_url = env.get("DATABASE_URL", "").strip() or None
    if database_url:
        check_database_url("DATABASE_URL", database_url)
    read_url = env.get("DATABASE_READ_URL", "").strip() or None
    if read_url:
        check_database_url("DATABASE_READ_URL", read_url)
    listen_url = env.get("DATABASE_LISTEN_URL", "").strip() or None
    if listen_url:
        check_database_url("DATABASE_LISTEN_URL", listen_url)
    keepalive = _number(env, "EVENTS_KEEPALIVE_SECONDS", 15.0, minimum=0.01)

    keys = tuple(k.strip() for k in env.get("API_KEY", "").split(",") if k.strip())
    if production and not keys:
        raise ConfigError("API_KEY: must be set when APP_ENV=production")

    fail_after = _integer(env, "ETL_FAIL_AFTER_RECORDS", minimum=0)
    if production and fail_after is not None:
        raise ConfigError("ETL_FAIL_AFTER_RECORDS: not allowed when APP_ENV=production")

    sources_raw = env.get("SOURCES_FILE", "").strip()
    if sources_raw:
        sources_file = Path(sources_raw).expanduser()
        if not sources_file.is_file():
            raise ConfigError(f"SOURCES_FILE: file not found: {sources_raw}")
        sources_file = sources_file.resolve()
    elif Path("sources.toml").is_file():
        sources_file = Path("sources.toml").resolve()
    else:
        sources_file = DEFAULT_SOURCES_FILE

    api_url = env.get("API_SOURCE_URL", "").strip() or None
    if api_url:
        check_http_url("API_SOURCE_URL", api_url)

    port_raw = env.get("PORT", "").strip()
    port = 8000
    if port_raw:
        try:
            port = int(port_raw)
        except ValueError:
            raise ConfigError(f"PORT: expected a port number, got {port_raw!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"PORT: expected 0..65535, got {port_raw!r}")

    log_format = env.get("LOG_FORMAT", "").strip().lower() or (
        "console" if sys.stdout.isatty() else "json"
    )
    if log_format not in ("json", "console"):
        raise ConfigError(f"LOG_FORMAT: expected json or console, got {log_format!r}")
    log_level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL: expected one of {sorted(_LOG_LEVELS)}, got {log_level!r}")

    batch_size = _integer(env, "ETL_BATCH_SIZE", minimum=1)
    parse_process_min = _integer(env, "ETL_PARSE_PROCESS_MIN_BYTES", minimum=0)
    data_cache_bytes = _integer(env, "DATA_CACHE_BYTES", minimum=0)
    lease_seconds = _number(env, "ETL_LEASE_SECONDS", 30.0, minimum=1)
    pool_size = _integer(env, "DATABASE_POOL_SIZE", minimum=1)
    run_pool_size = _integer(env, "DATABASE_RUN_POOL_SIZE", minimum=2)
    statement_cache = _integer(env, "DATABASE_STATEMENT_CACHE_SIZE", minimum=0)
    address_file = env.get("SERVE_ADDRESS_FILE", "").strip()
    header_timeout = _number(env, "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0)
    if header_timeout <= 0:
        raise ConfigError("HTTP_HEADER_TIMEOUT_SECONDS: must be > 0")
    keep_alive = _integer(env, "HTTP_KEEP_ALIVE_SECONDS", minimum=1)

    return Settings(
        database_url=database_url,
        database_read_url=read_url,
        database_listen_url=listen_url,
        data_dir=Path(env.get("DATA_DIR", "").strip() or ".data").expanduser(),
        api_keys=keys,
        app_env=app_env,
        sources_file=sources_file,
        api_source_url=api_url,
        api_source_key=env.get("API_SOURCE_KEY", "").strip() or None,
        csv_source_path=_existing_file(env, "CSV_SOURCE_PATH"),
        json_source_path=_existing_file(env, "JSON_SOURCE_PATH"),
        etl_interval_seconds=_number(env, "ETL_INTERVAL_SECONDS", 300.0, minimum=0),
        etl_on_startup=_bool(env, "ETL_ON_STARTUP", True),
        etl_fail_after_records=fail_after,
        etl_batch_size=batch_size if batch_size is not None else 10_000,
        etl_parse_process_min_bytes=(
            parse_process_min if parse_process_min is not None else 8 * 1024 * 1024
        ),
        etl_lease_seconds=lease_seconds,
        database_pool_size=pool_size if pool_size is not None else 10,
        database_run_pool_size=run_pool_size if run_pool_size is not None else 3,
        database_statement_cache_size=statement_cache if statement_cache is not None else 100,
        data_cache_bytes=data_cache_bytes if data_cache_bytes is not None else 16 * 1024 * 1024,
        events_keepalive_seconds=keepalive,
        host=env.get("HOST", "").strip() or "127.0.0.1",
        port=port,
        serve_address_file=Path(address_file).expanduser() if address_file else None,
        http_header_timeout_seconds=header_timeout,
        http_keep_alive_seconds=keep_alive if keep_alive is not None else 5,
        log_format=log_format,
        log_level=log_level,
    )


def environment(settings: Settings) -> dict[str, str]:
    """The variables from which :func:`load_settings` builds ``settings`` again:
    how a child process (the service's run) gets the very settings of its parent.
    An empty value means unset."""

    def text(value: object) -> str:
        return "" if value is None else str(value)

    return {
        "DATABASE_URL": text(settings.database_url),
        "DATABASE_READ_URL": text(settings.database_read_url),
        "DATABASE_LISTEN_URL": text(settings.database_listen_url),
        "DATA_DIR": str(settings.data_dir),
        "API_KEY": ",".join(settings.api_keys),
        "APP_ENV": settings.app_env,
        "SOURCES_FILE": str(settings.sources_file),
        "API_SOURCE_URL": text(settings.api_source_url),
        "API_SOURCE_KEY": text(settings.api_source_key),
        "CSV_SOURCE_PATH": text(settings.csv_source_path),
        "JSON_SOURCE_PATH": text(settings.json_source_path),
        "ETL_INTERVAL_SECONDS": repr(settings.etl_interval_seconds),
        "ETL_ON_STARTUP": "true" if settings.etl_on_startup else "false",
        "ETL_FAIL_AFTER_RECORDS": text(settings.etl_fail_after_records),
        "ETL_BATCH_SIZE": str(settings.etl_batch_size),
        "ETL_PARSE_PROCESS_MIN_BYTES": str(settings.etl_parse_process_min_bytes),
        "ETL_LEASE_SECONDS": repr(settings.etl_lease_seconds),
        "DATABASE_POOL_SIZE": str(settings.database_pool_size),
        "DATABASE_RUN_POOL_SIZE": str(settings.database_run_pool_size),
        "DATABASE_STATEMENT_CACHE_SIZE": str(settings.database_statement_cache_size),
        "DATA_CACHE_BYTES": str(settings.data_cache_bytes),
        "EVENTS_KEEPALIVE_SECONDS": repr(settings.events_keepalive_seconds),
        "HOST": settings.host,
        "PORT": str(settings.port),
        "SERVE_ADDRESS_FILE": text(settings.serve_address_file),
        "HTTP_HEADER_TIMEOUT_SECONDS": repr(settings.http_header_timeout_seconds),
        "HTTP_KEEP_ALIVE_SECONDS": str(settings.http_keep_alive_seconds),
        "LOG_FORMAT": settings.log_format,
        "LOG_LEVEL": settings.log_level,
    }
