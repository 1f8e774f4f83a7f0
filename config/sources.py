"""The declared sources, read from ``sources.toml``."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from config.errors import ConfigError
from config.settings import Settings, check_http_url, variables

Kind = Literal["http", "csv", "json"]
DriftPolicy = Literal["evolve", "freeze"]

#: Raw table of each kind; the three default sources use exactly these.
RAW_TABLES: dict[str, str] = {
    "http": "raw_api_data",
    "csv": "raw_csv_data",
    "json": "raw_third_source_data",
}


class FieldMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where each unified field lives in a source record (dotted paths)."""

    name: str
    value: str
    observed_at: str | None = None
    id: str | None = None
    symbol: str | None = None
    """The ticker (``BTC``): evidence for linking records of different sources."""


class SourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[sources]]`` table."""

    name: str
    kind: Kind
    location: str
    mapping: FieldMapping
    rate_limit_per_second: float = 2.0
    max_retries: int = 5
    timeout_seconds: float = 30.0
    page_size: int = 0
    drift_policy: DriftPolicy = "evolve"
    headers: dict[str, str] = {}
    """Sent with every request of an ``http`` source; ``${VAR}`` in a value is
    replaced by the environment variable ``VAR`` when the file is read."""
    # Set from the order in the file: a smaller number wins ties.
    priority: int = 0
    # The upstream key (``API_SOURCE_KEY``), never read from the file.
    auth_key: str | None = None

    @property
    def raw_table(self) -> str:
        return RAW_TABLES[self.kind]

    @property
    def path(self) -> Path:
        return Path(self.location)


class _SourcesFile(msgspec.Struct, forbid_unknown_fields=True):
    sources: list[dict[str, object]]


_ENV_OVERRIDES = {"api": "api_source_url", "csv": "csv_source_path", "json": "json_source_path"}


_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _substitute(label: str, headers: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with each ``${VAR}`` replaced by the variable's value.

    Messages name the header and the variable, never a value: the values are
    secrets (upstream keys) kept out of the file for that reason.
    """
    resolved: dict[str, str] = {}
    for header, template in headers.items():

        def value_of(match: re.Match[str], header: str = header) -> str:
            name = match[1]
            if not _VARIABLE_NAME.fullmatch(name):
                raise ConfigError(f"{label}: header {header!r}: {match[0]!r} is not ${{NAME}}")
            value = env.get(name, "")
            if not value:
                raise ConfigError(
                    f"{label}: header {header!r}: environment variable {name} is not set"
                )
            return value

        value = _VARIABLE.sub(value_of, template)
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ConfigError(f"{label}: header {header!r}: the value holds a line break or NUL")
        resolved[header] = value
    return resolved


def load_sources(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[SourceConfig]:
    """Read, check and resolve the sources file.

    Relative file locations resolve against the file's folder; the ``API_SOURCE_URL``,
    ``CSV_SOURCE_PATH`` and ``JSON_SOURCE_PATH`` settings override the default sources;
    ``${VAR}`` in an ``http`` source's headers is replaced by the variable of
    ``environ`` (by default the process environment over the ``.env`` file).

    Raises:
        ConfigError: the file is missing or invalid, or a header names an unset
            variable; the message names the source and key.
    """
    env = variables() if environ is None else environ
    path = settings.sources_file
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"SOURCES_FILE: file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"SOURCES_FILE: {path}: {exc}") from None
    try:
        doc = msgspec.convert(data, _SourcesFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"SOURCES_FILE: {path}: {exc}") from None

    base = path.resolve().parent
    sources: list[SourceConfig] = []
    seen: set[str] = set()
    for index, table in enumerate(doc.sources):
        label = f"SOURCES_FILE: {path}: sources[{index}]"
        if "priority" in table or "auth_key" in table:
            raise ConfigError(f"{label}: 'priority' and 'auth_key' cannot be set in the file")
        try:
            source = msgspec.convert(table, SourceConfig)
        except msgspec.ValidationError as exc:
            name = table.get("name", index)
            raise ConfigError(f"SOURCES_FILE: {path}: source {name!r}: {exc}") from None
        label = f"SOURCES_FILE: {path}: source {source.name!r}"
        if not source.name or not source.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{label}: name must be letters, digits, '-' or '_'")
        if source.name in seen:
            raise ConfigError(f"{label}: declared twice")
        seen.add(source.name)
        if source.rate_limit_per_second < 0:
            raise ConfigError(f"{label}: rate_limit_per_second must be >= 0")
        if source.max_retries < 0 or source.page_size < 0 or source.timeout_seconds <= 0:
            raise ConfigError(f"{label}: max_retries, page_size must be >= 0, timeout > 0")

        location = source.location
        override = getattr(settings, _ENV_OVERRIDES.get(source.name, ""), None)
        if override is not None:
            location = str(override)
        auth_key = settings.api_source_key if source.name == "api" else None
        headers = source.headers
        if source.kind == "http":
            check_http_url(f"{label}: location", location)
            headers = _substitute(label, headers, env)
        else:
            file_path = Path(location).expanduser()
            if not file_path.is_absolute():
                file_path = base / file_path
            location = str(file_path)
        sources.append(
            msgspec.structs.replace(
                source, location=location, headers=headers, priority=index, auth_key=auth_key
            )
        )
    if not sources:
        raise ConfigError(f"SOURCES_FILE: {path}: declares no [[sources]]")
    return sources


def id_sources(sources: list[SourceConfig]) -> dict[str, bool]:
    """Each source, with whether its keys are upstream ids (its mapping has an ``id``)."""
    return {s.name: s.mapping.id is not None for s in sources}


def select_sources(sources: list[SourceConfig], names: list[str] | None) -> list[SourceConfig]:
    """Keep the named sources (all when ``names`` is empty), in file order."""
    if not names:
        return sources
    known = {s.name for s in sources}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--source: unknown source {unknown[0]!r}; declared: {sorted(known)}")
    wanted = set(names)
    return [s for s in sources if s.name in wanted]
