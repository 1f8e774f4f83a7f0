"""Pure record transformation: mapping, canonical names, values, timestamps.

No I/O here; everything is a function of its arguments so it can be tested alone
and reused by ``etl reprocess``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from config.sources import FieldMapping

_MISSING = object()
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMERIC = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")
# Epoch values above this are taken as milliseconds (year 5138 in seconds).
_EPOCH_MS_THRESHOLD = 1e11
_ZERO = timedelta(0)
# A canonical name is the unified table's key: a B-tree entry holds at most ~2700
# bytes, so a longer name would fail its whole batch. 500 characters of UTF-8 stay
# within 2000 bytes, far beyond any real asset name.
MAX_NAME_LENGTH = 500
#: A record's id is a key of ``unified_links`` (a B-tree entry too).
MAX_ID_LENGTH = 500
#: Longer tickers are ignored: no real one is that long.
MAX_SYMBOL_LENGTH = 100


@dataclass(slots=True)
class Unified:
    """A valid record, ready for the unified table."""

    name: str
    value: float
    observed_at: datetime | None


@dataclass(slots=True)
class Rejection:
    """Why a record cannot enter the unified table."""

    field: str
    reason: str


def canonical_name(raw: str) -> str:
    """NFKC, case-folded, trimmed, inner whitespace collapsed to one space."""
    if raw.isascii():
        # NFKC leaves ASCII alone and case folding is lower(): the common case, cheaply.
        return " ".join(raw.lower().split())
    return " ".join(unicodedata.normalize("NFKC", raw).casefold().split())


def canonical_symbol(raw: Any) -> str | None:
    """A ticker, compared like names; ``None`` when absent or unusable (it is evidence
    for identity only, so a bad one is dropped rather than rejected)."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or "\x00" in raw or "\ufffd" in raw:
        return None
    text = canonical_name(raw)
    if not text or len(text) > MAX_SYMBOL_LENGTH:
        return None
    return text


def record_id(raw: Any) -> str | Rejection | None:
    """The record's upstream id as text, ``None`` when it has none, or why it is unusable."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        return None
    text = str(raw)
    if not text.strip():
        return None
    if "\x00" in text or "\ufffd" in text:
        return Rejection("id", "contains a NUL or unreadable character")
    if len(text) > MAX_ID_LENGTH:
        return Rejection("id", f"too long ({len(text)} characters, at most {MAX_ID_LENGTH})")
    return text


def lookup(record: Any, path: str) -> Any:
    """Value at a dotted ``path`` in ``record``; ``_MISSING`` when absent.

    A key that itself contains dots (a CSV header such as ``quotes.USD.price``)
    is tried first as a whole.
    """
    if isinstance(record, dict):
        direct = record.get(path, _MISSING)
        if direct is not _MISSING or "." not in path:
            return direct
    current = record
    for part in path.split("."):
        if isinstance(current, dict):
            current = current.get(part, _MISSING)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
        if current is _MISSING:
            return _MISSING
    return current


def is_missing(value: Any) -> bool:
    return value is _MISSING


def parse_value(raw: Any) -> float | str:
    """A finite float, or the reason it is not one."""
    kind = type(raw)
    if kind is float:
        return raw if math.isfinite(raw) else f"not a finite number: {_short(raw)}"
    if kind is str and _NUMERIC.match(raw):
        value = float(raw)
        return value if math.isfinite(value) else f"not a finite number: {_short(raw)}"
    if raw is _MISSING or raw is None:
        return "missing"
    if isinstance(raw, bool):
        return "not a number (boolean)"
    if isinstance(raw, int | float):
        value = float(raw) if not isinstance(raw, int) or abs(raw) < 2**1023 else math.inf
    elif isinstance(raw, str):
        text = raw.strip()
        if not text:
            return "missing"
        if _THOUSANDS.match(text):
            text = text.replace(",", "")
        elif not _NUMERIC.match(text):
            try:
                value = float(text)
            except ValueError:
                return f"not a number: {_short(raw)}"
            if math.isfinite(value):
                return f"not a number: {_short(raw)}"
            return f"not a finite number: {_short(raw)}"
        value = float(text)
    else:
        return f"not a number ({type(raw).__name__})"
    if not math.isfinite(value):
        return f"not a finite number: {_short(raw)}"
    return value


def parse_timestamp(raw: Any) -> datetime | str | None:
    """UTC datetime, ``None`` when the record has none, or the reason it is invalid.

    Accepts ISO 8601 (``Z`` or an offset; a naive time is taken as UTC), a date
    without time (midnight UTC), and epoch seconds or milliseconds as numbers or
    numeric strings.
    """
    if type(raw) is str and len(raw) > 19 and raw[10] == "T":
        # The usual shape (ISO 8601 with a zone): parse it directly.
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            return parsed if parsed.utcoffset() == _ZERO else parsed.astimezone(UTC)
    if raw is _MISSING or raw is None:
        return None
    if isinstance(raw, bool):
        return "not a timestamp (boolean)"
    if isinstance(raw, int | float):
        return _from_epoch(float(raw), raw)
    if not isinstance(raw, str):
        return f"not a timestamp ({type(raw).__name__})"
    text = raw.strip()
    if not text:
        return None
    if _NUMERIC.match(text):
        return _from_epoch(float(text), raw)
    try:
        if len(text) == 10 and text[4] == "-":
            parsed = datetime.combine(date.fromisoformat(text), time(), UTC)
        else:
            parsed = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
    except (ValueError, IndexError):
        return f"not a timestamp: {_short(raw)}"
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _from_epoch(value: float, raw: Any) -> datetime | str:
    if not math.isfinite(value) or value < 0:
        return f"not a timestamp: {_short(raw)}"
    if value > _EPOCH_MS_THRESHOLD:
        value /= 1000.0
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return f"not a timestamp: {_short(raw)}"


def _short(raw: Any, limit: int = 60) -> str:
    text = repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def transform(record: Any, mapping: FieldMapping) -> Unified | Rejection:
    """Map one raw record to a unified row, or say why it is rejected."""
    if isinstance(record, str):
        # File sources keep a line that is not JSON as the text received.
        return Rejection("record", "malformed JSON")
    if not isinstance(record, dict):
        return Rejection("record", f"not an object ({type(record).__name__})")
    raw_name = lookup(record, mapping.name)
    if raw_name is _MISSING or raw_name is None:
        return Rejection("name", "missing")
    if isinstance(raw_name, int | float) and not isinstance(raw_name, bool):
        raw_name = str(raw_name)
    if not isinstance(raw_name, str):
        return Rejection("name", f"not a string ({type(raw_name).__name__})")
    if "\x00" in raw_name or "\ufffd" in raw_name:
        # Raw keeps such a record with U+FFFD for U+0000 (jsonb cannot hold it);
        # rejecting both makes ingestion and reprocessing agree.
        return Rejection("name", "contains a NUL or unreadable character")
    name = canonical_name(raw_name)
    if not name:
        return Rejection("name", "empty")
    if len(name) > MAX_NAME_LENGTH:
        return Rejection("name", f"too long ({len(name)} characters, at most {MAX_NAME_LENGTH})")
    value = parse_value(lookup(record, mapping.value))
    if isinstance(value, str):
        return Rejection("value", value)
    observed_at: datetime | None = None
    if mapping.observed_at:
        parsed = parse_timestamp(lookup(record, mapping.observed_at))
        if isinstance(parsed, str):
            return Rejection("observed_at", parsed)
        observed_at = parsed
    return Unified(name, value, observed_at)


def observed_at_of(record: Any, mapping: FieldMapping) -> datetime | None:
    """The record's own timestamp when it has a valid one (for high-water marks)."""
    if not mapping.observed_at or not isinstance(record, dict):
        return None
    parsed = parse_timestamp(lookup(record, mapping.observed_at))
    return parsed if isinstance(parsed, datetime) else None
