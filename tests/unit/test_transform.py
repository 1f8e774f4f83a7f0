"""Canonical names, values and timestamps: pipelines/transform.py."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from config.sources import FieldMapping
from pipelines.transform import (
    Rejection,
    Unified,
    canonical_name,
    is_missing,
    lookup,
    observed_at_of,
    parse_timestamp,
    parse_value,
    transform,
)

CSV = FieldMapping(name="name", value="value", observed_at="updated_at")
API = FieldMapping(name="name", value="quotes.USD.price", observed_at="last_updated", id="id")
TEN_UTC = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
EPOCH_TEN_UTC = 1_767_261_600  # 2026-01-01T10:00:00Z


# -- canonical names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("  Bitcoin ", "bitcoin"),
        ("BITCOIN", "bitcoin"),
        ("bitcoin", "bitcoin"),
        ("\uff22\uff29\uff34\uff23\uff2f\uff29\uff2e", "bitcoin"),  # fullwidth: NFKC
        ("\ufb01nance", "finance"),  # the "fi" ligature: NFKC
        ("Straße", "strasse"),  # case folding, not lower(): ß folds to ss
        ("STRASSE", "strasse"),
        ("\u00a0Bitcoin\u00a0", "bitcoin"),  # no-break spaces are whitespace after NFKC
        ("Bitcoin   Cash", "bitcoin cash"),
        ("Bitcoin\t\n Cash\r\n", "bitcoin cash"),
        ("\u3000Bit\u2003coin", "bit coin"),  # ideographic and em spaces
    ],
)
def test_canonical_name(raw: str, canonical: str) -> None:
    assert canonical_name(raw) == canonical


def test_the_three_spellings_of_the_acceptance_are_one_entity() -> None:
    assert {canonical_name(n) for n in ("Bitcoin", " BITCOIN ", "bitcoin")} == {"bitcoin"}


@pytest.mark.parametrize("raw", ["", "   ", "\u00a0", "\t\n", "\u3000"])
def test_a_record_with_an_empty_name_is_rejected(raw: str) -> None:
    result = transform({"name": raw, "value": "1", "updated_at": ""}, CSV)
    assert result == Rejection("name", "empty")


@pytest.mark.parametrize(
    ("record", "rejection"),
    [
        ({"value": "1"}, Rejection("name", "missing")),
        ({"name": None, "value": "1"}, Rejection("name", "missing")),
        ({"name": ["x"], "value": "1"}, Rejection("name", "not a string (list)")),
        ({"name": True, "value": "1"}, Rejection("name", "not a string (bool)")),
    ],
)
def test_missing_or_non_text_names_are_rejected(
    record: dict[str, Any], rejection: Rejection
) -> None:
    assert transform(record, CSV) == rejection


def test_a_numeric_name_becomes_text() -> None:
    assert transform({"name": 42, "value": "1"}, CSV) == Unified("42", 1.0, None)


# -- values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1,234.5", 1234.5),
        ("1,234,567", 1234567.0),
        (" 42 ", 42.0),
        ("-0.5", -0.5),
        ("+5", 5.0),
        ("1e3", 1000.0),
        ("2.5E-3", 0.0025),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_values_parse_to_finite_floats(raw: Any, value: float) -> None:
    result = parse_value(raw)
    assert isinstance(result, float)
    assert result == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("NaN", "not a finite number: 'NaN'"),
        ("nan", "not a finite number: 'nan'"),
        ("inf", "not a finite number: 'inf'"),
        ("-Infinity", "not a finite number: '-Infinity'"),
        ("1e999", "not a finite number: '1e999'"),
        (math.nan, "not a finite number: nan"),
        (math.inf, "not a finite number: inf"),
        (True, "not a number (boolean)"),
        (False, "not a number (boolean)"),
        (None, "missing"),
        ("", "missing"),
        ("   ", "missing"),
        ("abc", "not a number: 'abc'"),
        ("1,23", "not a number: '1,23'"),
        ("12 345", "not a number: '12 345'"),
        ([1], "not a number (list)"),
        ({"v": 1}, "not a number (dict)"),
    ],
)
def test_values_that_are_not_finite_numbers_are_rejected_with_a_reason(
    raw: Any, reason: str
) -> None:
    assert parse_value(raw) == reason


def test_an_integer_too_large_for_a_float_is_rejected() -> None:
    result = parse_value(10**400)
    assert isinstance(result, str)
    assert result.startswith("not a finite number")


def test_a_boolean_value_rejects_the_record() -> None:
    record = {"name": "Bitcoin", "quotes": {"USD": {"price": True}}, "last_updated": None}
    assert transform(record, API) == Rejection("value", "not a number (boolean)")


# -- timestamps -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-01-01T10:00:00Z", TEN_UTC),
        ("2026-01-01T10:00:00.000Z", TEN_UTC),
        ("2026-01-01T12:00:00+02:00", TEN_UTC),
        ("2026-01-01T05:00:00-05:00", TEN_UTC),
        ("2026-01-01T10:00:00", TEN_UTC),  # naive: taken as UTC
        ("2026-01-01 10:00:00", TEN_UTC),
        ("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC)),  # a date is midnight UTC
        (EPOCH_TEN_UTC, TEN_UTC),  # epoch seconds
        (EPOCH_TEN_UTC * 1000, TEN_UTC),  # epoch milliseconds
        (float(EPOCH_TEN_UTC), TEN_UTC),
        (str(EPOCH_TEN_UTC), TEN_UTC),
        (str(EPOCH_TEN_UTC * 1000), TEN_UTC),
    ],
)
def test_timestamps_normalise_to_utc(raw: Any, expected: datetime) -> None:
    parsed = parse_timestamp(raw)
    assert isinstance(parsed, datetime)
    assert parsed == expected
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("yesterday", "not a timestamp: 'yesterday'"),
        ("2026-13-01", "not a timestamp: '2026-13-01'"),
        ("2026-01-01T25:00:00Z", "not a timestamp: '2026-01-01T25:00:00Z'"),
        (True, "not a timestamp (boolean)"),
        (-1, "not a timestamp: -1"),
        (math.nan, "not a timestamp: nan"),
        ([2026], "not a timestamp (list)"),
    ],
)
def test_garbage_timestamps_are_rejected_with_a_reason(raw: Any, reason: str) -> None:
    assert parse_timestamp(raw) == reason


@pytest.mark.parametrize("raw", [None, "", "  "])
def test_an_absent_timestamp_is_none(raw: Any) -> None:
    assert parse_timestamp(raw) is None


def test_a_garbage_timestamp_rejects_the_record() -> None:
    record = {"name": "Bitcoin", "value": "1", "updated_at": "soon"}
    assert transform(record, CSV) == Rejection("observed_at", "not a timestamp: 'soon'")


# -- mapping --------------------------------------------------------------------------


def test_dotted_paths_reach_nested_fields() -> None:
    record = {
        "id": "btc-bitcoin",
        "name": " Bitcoin ",
        "last_updated": "2026-01-01T10:00:00Z",
        "quotes": {"USD": {"price": 107077.69}},
    }
    assert transform(record, API) == Unified("bitcoin", 107077.69, TEN_UTC)
    assert observed_at_of(record, API) == TEN_UTC
    assert is_missing(lookup(record, "quotes.EUR.price"))
    assert lookup(record, "quotes.USD") == {"price": 107077.69}
    assert transform({**record, "quotes": {}}, API) == Rejection("value", "missing")


def test_a_header_that_contains_dots_is_looked_up_whole() -> None:
    mapping = FieldMapping(name="name", value="quotes.USD.price")
    assert transform({"name": "x", "quotes.USD.price": "3"}, mapping) == Unified("x", 3.0, None)


@pytest.mark.parametrize(
    ("record", "rejection"),
    [
        ("not json at all", Rejection("record", "malformed JSON")),
        ([1, 2], Rejection("record", "not an object (list)")),
        (7, Rejection("record", "not an object (int)")),
    ],
)
def test_records_that_are_not_objects_are_rejected(record: Any, rejection: Rejection) -> None:
    assert transform(record, CSV) == rejection
