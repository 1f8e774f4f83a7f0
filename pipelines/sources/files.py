"""File sources: CSV and JSON (array or JSON Lines), read incrementally.

Parsing is synchronous CPU work: each chunk is produced in a worker thread
(``asyncio.to_thread``) while the database writes the previous chunk, or, for a
large file, in a parse process of its own (:mod:`pipelines.parse_process`,
through :func:`file_chunks`), where it truly runs in parallel.

Cursor of an offset-based file (CSV, JSON Lines)::

    {"offset": <bytes committed>, "head": <hash of the first head_len bytes>, "head_len": n}

A file that shrank below the offset, or whose head changed, is read again from
the start; raw idempotency collapses what was already stored.

A last line without its newline may be one a writer is still appending: it is
read only once the file has been still for ``SETTLE_SECONDS``, else it waits
for a later run (the cursor stops before it).

A JSON array (``{"mode": "array"}``) has no position to resume from: it is read
whole every run, and every record goes on to the batch, where the ones already
stored count as duplicates. Nothing is skipped for its timestamp.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from config.errors import SourceError
from config.sources import SourceConfig
from pipelines.records import Chunk, RawRecord, make_record
from pipelines.sources.stored import StoredLookup, mark_stored

HEAD_BYTES = 4096
#: How long a file must have been left unchanged for a last line without its
#: newline to count as complete; a writer flushing a long append in pieces
#: leaves such a line for microseconds, an export without a final newline for good.
SETTLE_SECONDS = 0.5
# Large enough for the 1 MB fields real exports contain, small enough to bound memory.
CSV_FIELD_LIMIT = 16 * 1024 * 1024

_json_decoder = msgspec.json.Decoder()
# What a strict decode can raise on bytes that are not (acceptable) JSON: invalid
# UTF-8 surfaces as UnicodeDecodeError and deep nesting as RecursionError.
_STRICT_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Legacy exports: Latin-1 maps every byte, so nothing received is lost.
        return raw.decode("latin-1")


def _settled(handle: BinaryIO) -> bool:
    """Whether the file has been left unchanged for ``SETTLE_SECONDS`` (waiting
    for the rest of that time when it changed more recently)."""
    before = os.fstat(handle.fileno())
    wait = before.st_mtime + SETTLE_SECONDS - time.time()
    if wait <= 0:
        return True
    # Capped: a modification time in the future (a skewed clock) must not stall a read.
    time.sleep(min(wait, SETTLE_SECONDS))
    after = os.fstat(handle.fileno())
    return (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    """The file's lines from where ``handle`` stands; a last line without its
    newline only when the file has settled (it is being written otherwise)."""
    for raw in handle:
        if not raw.endswith(b"\n") and not _settled(handle):
            return
        yield raw


def _head_signature(handle: BinaryIO, length: int) -> str:
    handle.seek(0)
    return hashlib.blake2b(handle.read(length), digest_size=16).hexdigest()


def _start_offset(handle: BinaryIO, size: int, cursor: Mapping[str, Any] | None) -> int:
    """Where to resume: the committed offset, or 0 when the file was replaced."""
    if not cursor:
        return 0
    offset = int(cursor.get("offset", 0))
    head_len = int(cursor.get("head_len", 0))
    if offset > size or head_len > size:
        return 0
    if head_len and _head_signature(handle, head_len) != cursor.get("head"):
        return 0
    return offset


def _cursor(handle: BinaryIO, offset: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    head_len = min(offset, HEAD_BYTES)
    here = handle.tell()
    cursor = {"offset": offset, "head": _head_signature(handle, head_len), "head_len": head_len}
    handle.seek(here)
    if extra:
        cursor.update(extra)
    return cursor


class _LineFeeder:
    """Iterates a binary file's lines as text while counting the bytes consumed."""

    __slots__ = ("consumed", "handle", "strip_bom")

    def __init__(self, handle: BinaryIO, offset: int) -> None:
        self.handle = handle
        self.consumed = offset
        self.strip_bom = offset == 0

    def __iter__(self) -> Iterator[str]:
        for raw in _lines(self.handle):
            self.consumed += len(raw)
            if self.strip_bom:
                self.strip_bom = False
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
            yield _decode_line(raw)


def _header(row: list[str] | None) -> list[str] | None:
    """Column names as used for payload keys, the same on a fresh read and a resume."""
    if row is None:
        return None
    header = [h.strip() for h in row]
    if not any(header):
        return None
    # A repeated column name would overwrite the first column's value in the
    # payload; the repeat is keyed by its position instead, so nothing is lost.
    seen: set[str] = set()
    for index, key in enumerate(header):
        if key in seen:
            header[index] = f"_col{index + 1}"
        seen.add(header[index])
    return header


def _csv_chunks(path: Path, cursor: Mapping[str, Any] | None, batch_size: int) -> Iterator[Chunk]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open("rb") as handle:
        size = path.stat().st_size
        offset = _start_offset(handle, size, cursor)
        header: list[str] | None = None
        if offset > 0:
            handle.seek(0)
            first = _LineFeeder(handle, 0)
            header = _header(next(csv.reader(iter(first)), None))
            if header is None:
                offset = 0
        handle.seek(offset)
        feeder = _LineFeeder(handle, offset)
        reader = csv.reader(iter(feeder))
        records: list[RawRecord] = []
        line_hint = 0
        try:
            for row in reader:
                line_hint += 1
                if header is None:
                    header = _header(row)
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                payload = dict(zip(header, row, strict=False))
                if len(row) > len(header):
                    for index, extra in enumerate(row[len(header) :], start=len(header) + 1):
                        payload[f"_col{index}"] = extra
                records.append(make_record(payload))
                if len(records) >= batch_size:
                    yield Chunk(records, _cursor(handle, feeder.consumed))
                    records = []
        except csv.Error as exc:
            raise SourceError(
                f"unreadable CSV near record {line_hint} of this read: {exc}"
            ) from None
        yield Chunk(records, _cursor(handle, feeder.consumed), final=True)


def _jsonl_chunks(path: Path, cursor: Mapping[str, Any] | None, batch_size: int) -> Iterator[Chunk]:
    with path.open("rb") as handle:
        size = path.stat().st_size
        offset = _start_offset(handle, size, cursor)
        handle.seek(offset)
        consumed = offset
        records: list[RawRecord] = []
        for raw in _lines(handle):
            consumed += len(raw)
            line = raw.strip()
            if consumed - len(raw) == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:].strip()
            if not line:
                continue
            try:
                payload = _json_decoder.decode(line)
            except _STRICT_ERRORS:
                payload = _lenient_json(line)
            records.append(make_record(payload))
            if len(records) >= batch_size:
                yield Chunk(records, _cursor(handle, consumed, {"mode": "lines"}))
                records = []
        yield Chunk(records, _cursor(handle, consumed, {"mode": "lines"}), final=True)


def _lenient_json(raw: bytes) -> Any:
    """Decode what strict JSON refuses but real exports contain (NaN, Infinity).

    A line that is not JSON at all is kept as the text received, a JSON string,
    so the raw table still holds it and the record is rejected as malformed.
    """
    text = _decode_line(raw)
    try:
        return json.loads(text, parse_constant=str, parse_float=_float_or_text)
    except (ValueError, RecursionError):
        return text


def loads_lenient(data: bytes) -> Any:
    """Decode a JSON document that strict decoding refused.

    NaN and Infinity literals and numbers beyond float range are kept as the text
    received; bytes that are not UTF-8 are read as Latin-1.

    Raises:
        ValueError: the document is not JSON even so (or nests too deeply).
    """
    try:
        return json.loads(_decode_line(data), parse_constant=str, parse_float=_float_or_text)
    except RecursionError:
        raise ValueError("nesting too deep") from None


def _float_or_text(text: str) -> float | str:
    """A JSON number; one beyond float range (``1e999``) stays the text received.

    Encoding an infinite float would store ``null`` in raw instead of what came in.
    """
    value = float(text)
    return value if math.isfinite(value) else text


def _first_significant_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def _json_array_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        document = _json_decoder.decode(data)
    except _STRICT_ERRORS as exc:
        try:
            document = loads_lenient(data)
        except ValueError:
            raise SourceError(f"malformed JSON in {path.name}: {exc}") from None
    items = _records_of(document, path)
    # Read whole every run: each record goes on, and raw idempotency makes the
    # ones already stored duplicates. Records are not in time order, so no
    # timestamp could say which of them are new.
    for start in range(0, len(items), batch_size):
        records = [make_record(item) for item in items[start : start + batch_size]]
        yield Chunk(records, {"mode": "array"})
    yield Chunk([], {"mode": "array"}, final=True)


def _records_of(document: Any, path: Path) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [v for v in document.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise SourceError(
            f"{path.name}: expected a JSON array of records or JSON Lines, got an object"
        )
    raise SourceError(
        f"{path.name}: expected a JSON array of records or JSON Lines, "
        f"got {type(document).__name__}"
    )


def _json_chunks(path: Path, cursor: Mapping[str, Any] | None, batch_size: int) -> Iterator[Chunk]:
    first = _first_significant_byte(path)
    if first == b"[":
        yield from _json_array_chunks(path, batch_size)
    elif first == b"{":
        if _looks_like_single_document(path):
            yield from _json_array_chunks(path, batch_size)
        else:
            yield from _jsonl_chunks(path, cursor, batch_size)
    elif first == b"":
        yield Chunk([], {}, final=True)
    else:
        raise SourceError(f"{path.name}: expected a JSON array or JSON Lines")


def _looks_like_single_document(path: Path) -> bool:
    """A pretty-printed object spans lines that are not JSON on their own.

    JSON Lines whose first line is broken are still JSON Lines (so the broken
    line is rejected and the others load): the next non-empty line is an object
    on its own and the file as a whole is not a JSON document.
    """
    with path.open("rb") as handle:
        first_line = handle.readline().strip().removeprefix(b"\xef\xbb\xbf").strip()
        if _is_json(first_line):
            return False
        second_line = next((s for s in (raw.strip() for raw in handle) if s), b"")
    if not second_line.startswith(b"{") or not _is_json(second_line):
        return True
    return _is_json(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))


def _is_json(data: bytes) -> bool:
    try:
        _json_decoder.decode(data)
    except _STRICT_ERRORS:
        try:
            json.loads(_decode_line(data), parse_constant=str)
        except (ValueError, RecursionError):
            return False
    return True


def read_error(exc: Exception, label: str) -> SourceError | None:
    """The one-line source error a reading failure means, ``None`` for a bug."""
    if isinstance(exc, FileNotFoundError):
        return SourceError(f"{label}: file not found")
    if isinstance(exc, SourceError):
        return SourceError(f"{label}: {exc}")
    if isinstance(exc, OSError):
        return SourceError(f"{label}: cannot read ({exc.strerror or exc})")
    return None


async def _drive(chunks: Iterator[Chunk], label: str) -> AsyncGenerator[Chunk, None]:
    """Pull chunks from a synchronous generator in a worker thread."""
    sentinel: Any = object()
    while True:
        try:
            chunk = await asyncio.to_thread(next, chunks, sentinel)
        except (SourceError, OSError) as exc:
            raise read_error(exc, label) or exc from None
        if chunk is sentinel:
            return
        yield chunk


def file_chunks(
    source: SourceConfig, cursor: Mapping[str, Any] | None, batch_size: int
) -> Iterator[Chunk]:
    """The chunks of a file source, synchronously (for a parse process)."""
    path = _check_file(source)
    if source.kind == "csv":
        return _csv_chunks(path, cursor, batch_size)
    return _json_chunks(path, cursor, batch_size)


def unread_bytes(source: SourceConfig, cursor: Mapping[str, Any] | None) -> int:
    """About how much of the file a run would read from ``cursor`` (0 when absent)."""
    try:
        size = source.path.stat().st_size
    except OSError:
        return 0
    offset = (cursor or {}).get("offset")
    return size - offset if isinstance(offset, int) and 0 <= offset <= size else size


def _check_file(source: SourceConfig) -> Path:
    path = source.path
    if not path.is_file():
        raise SourceError(f"{source.name}: file not found: {path.name}")
    return path


async def read_csv(
    source: SourceConfig, cursor: Mapping[str, Any] | None, batch_size: int
) -> AsyncGenerator[Chunk, None]:
    """Stream a CSV file from the committed byte offset; rows become header-to-string objects."""
    path = _check_file(source)
    async for chunk in _drive(_csv_chunks(path, cursor, batch_size), source.name):
        yield chunk


async def read_json(
    source: SourceConfig,
    cursor: Mapping[str, Any] | None,
    batch_size: int,
    *,
    stored: StoredLookup | None = None,
) -> AsyncGenerator[Chunk, None]:
    """A JSON array (read whole every run) or JSON Lines (from the committed byte offset).

    ``stored`` tells which records raw already holds; an array's chunks carry
    them in ``stored``, so they are not prepared again.
    """
    path = _check_file(source)
    async for chunk in _drive(_json_chunks(path, cursor, batch_size), source.name):
        yield await mark_stored(chunk, stored) if chunk.cursor.get("mode") == "array" else chunk
