"""The corpus of bad inputs: each file, and what the pipeline must make of it.

Every case is run through the real pipeline by ``tests/integration/test_corpus.py``,
one source per run, with the default mappings (``csv``:
name/value/updated_at; ``json``: name/current_price/last_updated/id) unless the
case gives another.

Outcomes:

``coerced``
    The source succeeds and nothing is rejected (run ``success``); ``unified`` lists
    every row of ``unified_data`` the file produces.
``rejected``
    The source succeeds; the bad records are in raw and rejected, each with a
    field and a reason (run ``partial``); ``rejected`` lists
    ``(field, reason substring, count)`` and ``unified`` the rows of the good ones.
``source_failed``
    The file cannot be read as records (or its mapped identity/value field is
    absent): the source fails with a one-line message containing ``error``
    (run ``failed``). Whatever was read as records is still in raw (``raw``).

``raw`` is the expected row count of the raw table: every distinct record
received, rejected or not. A unified row is ``(name, value, observed_at)`` with
``observed_at`` in UTC, or ``None`` when the record has no timestamp of its own
(it is observed when ingested). ``payloads`` are records that must be in raw
exactly as written (for CSV, header-to-string objects).

Files are under ``files/`` and byte-exact (``.gitattributes`` keeps git off their
line endings); the 1 MB case is generated (see ``build``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FILES = Path(__file__).resolve().parent / "files"

Outcome = Literal["coerced", "rejected", "source_failed"]
#: ``(canonical name, value, observed_at as ISO 8601 UTC or None)``
Row = tuple[str, float, str | None]
#: ``(field, reason substring, how many records)``
Reject = tuple[str, str, int]

T = "2026-01-01T00:00:00Z"
NESTED_MAPPING = {
    "name": "name",
    "value": "quotes.USD.price",
    "observed_at": "last_updated",
    "id": "id",
}


@dataclass(frozen=True, slots=True)
class Case:
    file: str
    kind: Literal["csv", "json"]
    outcome: Outcome
    raw: int
    why: str
    unified: tuple[Row, ...] = ()
    rejected: tuple[Reject, ...] = ()
    error: str | None = None
    duplicates: int = 0
    payloads: tuple[dict[str, Any], ...] = ()
    mapping: dict[str, str] | None = None
    build: Callable[[], bytes] | None = None
    #: Set when the behaviour is known to be wrong and reported, not yet fixed.
    known_bug: str | None = None

    @property
    def id(self) -> str:
        return self.file.rsplit(".", 1)[0]

    def content(self) -> bytes:
        return self.build() if self.build is not None else (FILES / self.file).read_bytes()


MB = 1024 * 1024


def _one_megabyte_fields() -> bytes:
    """A 1 MB extra column (kept), a 1 MB name (too long) and a 1 MB number (infinite)."""
    note = "".join(chr(ord("a") + (i * 7) % 26) for i in range(MB))
    name = "Coin " + "".join(chr(ord("A") + (i * 11) % 26) for i in range(MB))
    lines = [
        "name,value,updated_at,note",
        f'Bitcoin,100.5,{T},"{note}"',
        f"{name},1,{T},",
        f"Ether,{'1' * MB},{T},",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


CASES: tuple[Case, ...] = (
    # -- CSV ----------------------------------------------------------------------------
    Case(
        file="csv_no_header.csv",
        kind="csv",
        outcome="source_failed",
        raw=2,
        error="identity field 'name' missing and no confident rename",
        why="the first data line is read as the header, so no record has a `name`: "
        "the source fails; the other two lines are kept in raw under those keys",
    ),
    Case(
        file="csv_missing_name_column.csv",
        kind="csv",
        outcome="source_failed",
        raw=2,
        error="identity field 'name' missing and no confident rename",
        why="no `name` column at all: every record would be rejected, the source fails",
    ),
    Case(
        file="csv_extra_columns.csv",
        kind="csv",
        outcome="coerced",
        raw=2,
        unified=(("bitcoin", 100.5, T), ("ethereum", 2000.0, "2026-01-02T00:00:00Z")),
        payloads=(
            {
                "name": "Bitcoin",
                "symbol": "BTC",
                "value": "100.5",
                "updated_at": T,
                "market_cap": "1e12",
                "": "",
            },
        ),
        why="unmapped columns (even a nameless one) are kept in raw and ignored",
    ),
    Case(
        file="csv_utf8_bom.csv",
        kind="csv",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 100.5, T),),
        payloads=({"name": "Bitcoin", "value": "100.5", "updated_at": T},),
        why="the BOM is not part of the first column's name",
    ),
    Case(
        file="csv_non_utf8.csv",
        kind="csv",
        outcome="coerced",
        raw=3,
        unified=(("bad ÿþ bytes", 3.0, T), ("café coin", 2.5, T), ("ñandú", 1.25, T)),
        why="a line that is not UTF-8 is read as Latin-1 (every byte maps), the UTF-8 "
        "lines stay UTF-8",
    ),
    Case(
        file="csv_crlf.csv",
        kind="csv",
        outcome="coerced",
        raw=2,
        unified=(("bitcoin", 100.5, T), ("ethereum", 2000.0, T)),
        payloads=({"name": "Bitcoin", "value": "100.5", "updated_at": T},),
        why="CRLF line endings: no stray \\r in the last column",
    ),
    Case(
        file="csv_quoted_newline.csv",
        kind="csv",
        outcome="coerced",
        raw=3,
        unified=(("bit coin", 100.5, T), ('ethereum "classic"', 1234.5, T), ("solana", 150.0, T)),
        payloads=({"name": "Bit\ncoin", "value": "100.5", "updated_at": T},),
        why="a quoted field spanning lines is one field (the name's newline collapses to a "
        "space); quoted thousands separators are read",
    ),
    Case(
        file="csv_ragged_rows.csv",
        kind="csv",
        outcome="rejected",
        raw=4,
        rejected=(("value", "missing", 1),),
        unified=(("bitcoin", 100.5, T), ("dogecoin", 0.25, T), ("ethereum", 2000.0, None)),
        payloads=(
            {"name": "Ethereum", "value": "2000"},
            {"name": "Solana"},
            {
                "name": "Dogecoin",
                "value": "0.25",
                "updated_at": T,
                "_col4": "extra",
                "_col5": "more",
            },
        ),
        why="a short row lacks the trailing columns (no timestamp: ingestion time; no "
        "value: rejected); a long row keeps its extra cells as _colN",
    ),
    Case(
        file="csv_1mb_field.csv",
        kind="csv",
        outcome="rejected",
        raw=3,
        build=_one_megabyte_fields,
        rejected=(("name", "too long", 1), ("value", "not a finite number", 1)),
        unified=(("bitcoin", 100.5, T),),
        why="a 1 MB unmapped field is kept; a 1 MB name cannot be a key and is rejected; "
        "a 1 MB number overflows to infinity and is rejected",
    ),
    Case(
        file="csv_empty.csv",
        kind="csv",
        outcome="coerced",
        raw=0,
        why="an empty file holds no records: nothing to load, nothing lost",
    ),
    Case(
        file="csv_header_only.csv",
        kind="csv",
        outcome="coerced",
        raw=0,
        why="a header and no rows: no records",
    ),
    Case(
        file="csv_blank_lines.csv",
        kind="csv",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 100.5, T),),
        why="empty and whitespace-only lines are not records",
    ),
    Case(
        file="csv_unterminated_quote.csv",
        kind="csv",
        outcome="rejected",
        raw=2,
        rejected=(("value", "missing", 1),),
        unified=(("bitcoin", 100.5, T),),
        why="an opening quote never closed swallows the rest of the file into one name; "
        "that record (with the lines it swallowed) is kept in raw and rejected",
    ),
    Case(
        file="csv_bad_values.csv",
        kind="csv",
        outcome="rejected",
        raw=7,
        rejected=(
            ("value", "not a number: 'abc'", 1),
            ("value", "not a finite number: 'NaN'", 1),
            ("value", "missing", 1),
            ("value", "not a finite number: '1e999'", 1),
            ("observed_at", "not a timestamp: 'yesterday'", 1),
            ("value", "not a number: '1_000'", 1),
        ),
        unified=(("eta", 42.0, T),),
        why="each bad value or timestamp is rejected with its reason; a padded number is read",
    ),
    Case(
        file="csv_duplicate_header.csv",
        kind="csv",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 100.5, T),),
        payloads=({"name": "Bitcoin", "value": "100.5", "updated_at": T, "_col4": "999"},),
        why="a repeated column name: the first column is the mapped one, the repeat is "
        "kept as _colN instead of overwriting it",
    ),
    Case(
        file="csv_nul_byte.csv",
        kind="csv",
        outcome="rejected",
        raw=2,
        rejected=(("name", "NUL", 1),),
        unified=(("ethereum", 2000.0, T),),
        why="a NUL character in a name: the record must reach raw and be rejected, the "
        "next row must load",
    ),
    # -- JSON ---------------------------------------------------------------------------
    Case(
        file="json_object_not_array.json",
        kind="json",
        outcome="source_failed",
        raw=0,
        error="expected a JSON array of records or JSON Lines, got an object",
        why="one pretty-printed object with no list of records inside is not a record stream",
    ),
    Case(
        file="json_object_with_list.json",
        kind="json",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 100.5, T),),
        why="an envelope object with exactly one list: that list is the records",
    ),
    Case(
        file="json_two_lists.json",
        kind="json",
        outcome="source_failed",
        raw=0,
        error="expected a JSON array of records or JSON Lines, got an object",
        why="an object with two lists is ambiguous",
    ),
    Case(
        file="json_scalar.json",
        kind="json",
        outcome="source_failed",
        raw=0,
        error="expected a JSON array or JSON Lines",
        why="a bare string is not records",
    ),
    Case(
        file="json_truncated.json",
        kind="json",
        outcome="source_failed",
        raw=0,
        error="malformed JSON in json_truncated.json",
        why="a cut-off array cannot be parsed; the source fails with the parser's reason",
    ),
    Case(
        file="json_deep_nesting.json",
        kind="json",
        outcome="source_failed",
        raw=0,
        error="malformed JSON in json_deep_nesting.json",
        why="nesting deeper than the parsers allow fails the source cleanly (no traceback)",
    ),
    Case(
        file="json_nulls.json",
        kind="json",
        outcome="rejected",
        raw=4,
        rejected=(("name", "missing", 1), ("value", "missing", 1)),
        unified=(("beta", 2.5, None), ("gamma", 3.5, T)),
        why="null name or value: rejected; null timestamp: ingestion time; null id: no id",
    ),
    Case(
        file="json_numbers_as_strings.json",
        kind="json",
        outcome="rejected",
        raw=5,
        rejected=(("value", "not a number: '12abc'", 1),),
        unified=(
            ("alpha", 100.5, T),
            ("beta", 1234.5, T),
            ("epsilon", -0.001, T),
            ("gamma", 42.0, T),
        ),
        why="numeric strings (padded, with thousands separators, negative) are numbers",
    ),
    Case(
        file="json_nan_literal.json",
        kind="json",
        outcome="rejected",
        raw=4,
        rejected=(("value", "not a finite number", 3),),
        unified=(("delta", 4.5, T),),
        payloads=({"id": "a", "name": "Alpha", "current_price": "NaN", "last_updated": T},),
        why="NaN/Infinity literals are read (kept in raw as their text) and rejected",
    ),
    Case(
        file="json_1e999.json",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("value", "not a finite number: '1e999'", 1),),
        unified=(("beta", 5.5, T),),
        payloads=({"id": "a", "name": "Alpha", "current_price": "1e999", "last_updated": T},),
        why="a number beyond float range is kept in raw as its text and rejected",
    ),
    Case(
        file="json_huge_integer.json",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("value", "not a finite number", 1),),
        unified=(("alpha", 1e29, T),),
        why="a big integer within float range is read; a 400-digit one is rejected",
    ),
    Case(
        file="json_nested_path_partly_missing.json",
        kind="json",
        outcome="rejected",
        raw=5,
        mapping=NESTED_MAPPING,
        rejected=(("value", "missing", 4),),
        unified=(("alpha", 1.5, T),),
        why="quotes.USD.price absent, null, under another currency or under a string: "
        "those records are rejected",
    ),
    Case(
        file="json_nested_path_absent.json",
        kind="json",
        outcome="source_failed",
        raw=2,
        mapping=NESTED_MAPPING,
        error="value field 'quotes.USD.price' missing and no confident rename",
        why="the mapped nested path is in no record: the source fails, raw keeps the records",
    ),
    Case(
        file="json_epoch_seconds.json",
        kind="json",
        outcome="coerced",
        raw=4,
        unified=(
            ("alpha", 1.0, T),
            ("beta", 2.0, T),
            ("delta", 4.0, "2026-01-01T00:00:00.500000Z"),
            ("gamma", 3.0, "2026-01-01T01:00:00Z"),
        ),
        why="epoch seconds (number, fractional, numeric string) and milliseconds",
    ),
    Case(
        file="json_date_only.json",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("observed_at", "not a timestamp: '2026-02-30'", 1),),
        unified=(("alpha", 1.0, T),),
        why="a date without time is midnight UTC; an impossible date is rejected",
    ),
    Case(
        file="json_offsets.json",
        kind="json",
        outcome="coerced",
        raw=5,
        unified=(
            ("alpha", 1.0, T),
            ("beta", 2.0, T),
            ("delta", 4.0, T),
            ("epsilon", 5.0, "2026-01-01T00:00:00.123456Z"),
            ("gamma", 3.0, T),
        ),
        why="+05:30 and -05:00 offsets, a space separator and a naive time are UTC instants",
    ),
    Case(
        file="json_bad_timestamps.json",
        kind="json",
        outcome="rejected",
        raw=4,
        rejected=(("observed_at", "not a timestamp", 4),),
        why="text, boolean, negative epoch and object timestamps are rejected",
    ),
    Case(
        file="json_wrong_types.json",
        kind="json",
        outcome="rejected",
        raw=5,
        rejected=(
            ("name", "not a string (dict)", 1),
            ("value", "not a number (boolean)", 1),
            ("value", "not a number (list)", 1),
            ("value", "not a number (dict)", 1),
        ),
        unified=(("42", 1.0, T),),
        why="a numeric name is its text; objects, lists and booleans are rejected",
    ),
    Case(
        file="json_utf8_bom.json",
        kind="json",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 100.5, T),),
        why="a BOM before the array is skipped",
    ),
    Case(
        file="json_latin1.json",
        kind="json",
        outcome="coerced",
        raw=2,
        unified=(("alpha", 1.0, T), ("café", 2.0, T)),
        why="an array that is not UTF-8 is read as Latin-1 (no traceback)",
    ),
    Case(
        file="json_empty.json",
        kind="json",
        outcome="coerced",
        raw=0,
        why="an empty file holds no records",
    ),
    Case(
        file="json_empty_array.json",
        kind="json",
        outcome="coerced",
        raw=0,
        why="an empty array holds no records",
    ),
    Case(
        file="json_duplicate_records.json",
        kind="json",
        outcome="coerced",
        raw=2,
        duplicates=1,
        unified=(("alpha", 2.0, "2026-01-02T00:00:00Z"),),
        why="an identical record twice is one raw row and one duplicate; two spellings "
        "of a name are one entity holding the newest value",
    ),
    Case(
        file="json_nul_escape.json",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("name", "NUL", 1),),
        unified=(("beta", 2.0, T),),
        why="a \\u0000 escape in a name: the record must reach raw and be rejected, the "
        "other must load",
    ),
    # -- JSON Lines ---------------------------------------------------------------------
    Case(
        file="jsonl_malformed_line.jsonl",
        kind="json",
        outcome="rejected",
        raw=4,
        rejected=(("record", "malformed JSON", 1),),
        unified=(("alpha", 1.0, T), ("beta", 2.0, T), ("gamma", 3.0, T)),
        why="a broken line is kept in raw as the text received and rejected; the others load",
    ),
    Case(
        file="jsonl_malformed_first_line.jsonl",
        kind="json",
        outcome="rejected",
        raw=3,
        rejected=(("record", "malformed JSON", 1),),
        unified=(("alpha", 1.0, T), ("beta", 2.0, T)),
        why="a broken first line does not make the file look like one broken document",
    ),
    Case(
        file="jsonl_nan_first_line.jsonl",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("value", "not a finite number: 'NaN'", 1),),
        unified=(("beta", 2.0, T),),
        why="a NaN literal on the first line is still JSON Lines",
    ),
    Case(
        file="jsonl_not_objects.jsonl",
        kind="json",
        outcome="rejected",
        raw=5,
        rejected=(("record", "not an object", 3), ("record", "malformed JSON", 1)),
        unified=(("alpha", 1.0, T),),
        why="lines holding a number, null or a list are not records; a bare JSON string "
        "is indistinguishable from a kept broken line and is rejected as malformed",
    ),
    Case(
        file="jsonl_latin1_line.jsonl",
        kind="json",
        outcome="coerced",
        raw=2,
        unified=(("alpha", 1.0, T), ("café", 2.0, T)),
        why="a line that is not UTF-8 is read as Latin-1 (no traceback)",
    ),
    # -- names --------------------------------------------------------------------------
    Case(
        file="names_whitespace_only.json",
        kind="json",
        outcome="rejected",
        raw=5,
        rejected=(("name", "empty", 4),),
        unified=(("ok", 5.0, T),),
        why='spaces, tab/newline, NBSP + ideographic space, and "" are empty names',
    ),
    Case(
        file="names_fullwidth.json",
        kind="json",
        outcome="coerced",
        raw=1,
        unified=(("bitcoin", 1.5, T),),
        why="NFKC: ＢＩＴＣＯＩＮ is bitcoin",  # noqa: RUF001 (fullwidth on purpose)
    ),
    Case(
        file="names_sharp_s.json",
        kind="json",
        outcome="coerced",
        raw=2,
        unified=(("strasse", 3.5, "2026-01-02T00:00:00Z"),),
        why="case folding: Straße and STRASSE are one entity (the newer value wins); "
        "read without ids, since two ids are two entities whatever their names",
        mapping={"name": "name", "value": "current_price", "observed_at": "last_updated"},
    ),
    Case(
        file="names_nbsp.json",
        kind="json",
        outcome="coerced",
        raw=2,
        unified=(("bitcoin cash", 1.5, T), ("ether classic", 2.5, T)),
        why="non-breaking spaces are whitespace: trimmed and collapsed",
    ),
    Case(
        file="names_same_entity.csv",
        kind="csv",
        outcome="coerced",
        raw=3,
        unified=(("bitcoin", 2.0, "2026-01-03T00:00:00Z"),),
        why="'  Bitcoin ', 'BITCOIN', 'bitcoin': one row, the newest observation",
    ),
    Case(
        file="names_long.json",
        kind="json",
        outcome="rejected",
        raw=2,
        rejected=(("name", "too long", 1),),
        unified=(("short", 2.0, T),),
        why="a name longer than 500 characters cannot be a key: rejected, not a failed batch",
    ),
)
