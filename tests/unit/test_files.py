"""File readers (pipelines/sources/files.py): chunks, byte offsets, replaced files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from config.errors import SourceError
from config.sources import FieldMapping, SourceConfig
from pipelines.records import Chunk
from pipelines.sources import files
from pipelines.sources.files import read_csv, read_json
from tests.helpers import csv_bytes, csv_rows, row_end_offsets

CSV_MAPPING = FieldMapping(name="name", value="value", observed_at="updated_at")
JSON_MAPPING = FieldMapping(name="name", value="current_price", observed_at="last_updated", id="id")


def csv_source(path: Path) -> SourceConfig:
    return SourceConfig(name="csv", kind="csv", location=str(path), mapping=CSV_MAPPING)


def json_source(path: Path) -> SourceConfig:
    return SourceConfig(name="json", kind="json", location=str(path), mapping=JSON_MAPPING)


async def read_all_csv(
    path: Path, cursor: dict[str, Any] | None = None, batch_size: int = 1000
) -> list[Chunk]:
    return [chunk async for chunk in read_csv(csv_source(path), cursor, batch_size)]


async def read_all_json(
    path: Path, cursor: dict[str, Any] | None = None, batch_size: int = 1000
) -> list[Chunk]:
    return [chunk async for chunk in read_json(json_source(path), cursor, batch_size)]


def payloads(chunks: list[Chunk]) -> list[Any]:
    return [record.payload for chunk in chunks for record in chunk.records]


# -- CSV ------------------------------------------------------------------------------


async def test_csv_chunks_carry_the_offset_just_after_their_last_row(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(csv_bytes(csv_rows(7)))
    ends = row_end_offsets(path)

    chunks = await read_all_csv(path, batch_size=3)

    assert [len(c.records) for c in chunks] == [3, 3, 1]
    assert [c.cursor["offset"] for c in chunks] == [ends[2], ends[5], ends[6]]
    assert [c.final for c in chunks] == [False, False, True]
    assert chunks[-1].cursor["offset"] == path.stat().st_size
    assert payloads(chunks)[0] == {
        "name": "coin 0",
        "value": "0.5",
        "updated_at": csv_rows(1)[0][2],
    }


async def test_csv_resumes_from_a_committed_offset(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(csv_bytes(csv_rows(7)))
    first = await read_all_csv(path, batch_size=3)

    rest = await read_all_csv(path, first[0].cursor)

    assert [p["name"] for p in payloads(rest)] == [f"coin {i}" for i in range(3, 7)]
    assert rest[-1].cursor["offset"] == path.stat().st_size


async def test_csv_at_its_end_yields_one_empty_final_chunk(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(csv_bytes(csv_rows(2)))
    done = (await read_all_csv(path))[-1].cursor

    again = await read_all_csv(path, done)

    assert [(len(c.records), c.final) for c in again] == [(0, True)]
    assert again[0].cursor["offset"] == path.stat().st_size


async def test_csv_that_shrank_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(csv_bytes(csv_rows(6)))
    cursor = (await read_all_csv(path))[-1].cursor
    path.write_bytes(csv_bytes(csv_rows(2)))

    assert [p["name"] for p in payloads(await read_all_csv(path, cursor))] == ["coin 0", "coin 1"]


async def test_csv_whose_head_changed_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(csv_bytes(csv_rows(3)))
    cursor = (await read_all_csv(path))[-1].cursor
    replaced = csv_bytes(csv_rows(3, prefix="nioc"))  # same length, other bytes
    assert len(replaced) == path.stat().st_size
    path.write_bytes(replaced)

    names = [p["name"] for p in payloads(await read_all_csv(path, cursor))]

    assert names == ["nioc 0", "nioc 1", "nioc 2"]


async def test_csv_quoted_newlines_bom_crlf_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"\xef\xbb\xbf name ,value, updated_at\r\n"
        b'"Multi\r\nLine",1,2026-01-01\r\n'
        b"\r\n"
        b"Plain,2,2026-01-02,extra\r\n"
        b"Short,3\r\n"
        b"Caf\xe9,4,2026-01-03\r\n"
    )

    chunks = await read_all_csv(path, batch_size=1)

    assert payloads(chunks) == [
        {"name": "Multi\r\nLine", "value": "1", "updated_at": "2026-01-01"},
        {"name": "Plain", "value": "2", "updated_at": "2026-01-02", "_col4": "extra"},
        {"name": "Short", "value": "3"},
        {"name": "Café", "value": "4", "updated_at": "2026-01-03"},
    ]
    # The multi-line row ends after its second physical line.
    assert chunks[0].cursor["offset"] == len(b"\xef\xbb\xbf name ,value, updated_at\r\n") + len(
        b'"Multi\r\nLine",1,2026-01-01\r\n'
    )
    resumed = await read_all_csv(path, chunks[1].cursor)
    assert [p["name"] for p in payloads(resumed)] == ["Short", "Café"]


async def test_csv_resumed_keys_match_the_first_read(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b" name , value ,updated_at\nA,1,2026-01-01\nB,2,2026-01-02\n")
    chunks = await read_all_csv(path, batch_size=1)

    resumed = await read_all_csv(path, chunks[0].cursor)

    assert (
        payloads(resumed)
        == [payloads(chunks)[1]]
        == [{"name": "B", "value": "2", "updated_at": "2026-01-02"}]
    )


def _append_soon(path: Path, data: bytes) -> threading.Timer:
    """A writer that sends the rest of its line while the reader is at it."""

    def append() -> None:
        with path.open("ab") as handle:
            handle.write(data)

    timer = threading.Timer(files.SETTLE_SECONDS / 3, append)
    timer.start()
    return timer


async def test_a_line_still_being_appended_waits_for_a_later_read(tmp_path: Path) -> None:
    # A writer's append arrives in pieces: the reader must not take half a line
    # for a record, nor move its offset past it.
    path = tmp_path / "growing.csv"
    head = b"name,value,updated_at\ncoin a,1.5,2025-01-01T00:00:00Z\n"
    path.write_bytes(head + b"coin b,2.")
    writer = _append_soon(path, b"5,2025-01-01T00:00:01Z\n")

    first = await read_all_csv(path)
    writer.join()

    assert [p["name"] for p in payloads(first)] == ["coin a"]
    assert first[-1].cursor["offset"] == len(head)
    second = await read_all_csv(path, cursor=first[-1].cursor)
    assert payloads(second) == [
        {"name": "coin b", "value": "2.5", "updated_at": "2025-01-01T00:00:01Z"}
    ]


async def test_a_settled_file_without_a_final_newline_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(b"name,value,updated_at\ncoin a,1.5,2025-01-01T00:00:00Z")
    os.utime(path, (time.time() - 60, time.time() - 60))

    chunks = await read_all_csv(path)

    assert [p["name"] for p in payloads(chunks)] == ["coin a"]
    assert chunks[-1].cursor["offset"] == path.stat().st_size


async def test_a_json_line_still_being_appended_waits_for_a_later_read(tmp_path: Path) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_bytes(b'{"name": "a", "current_price": 1}\n{"name": "b", "curr')
    writer = _append_soon(path, b'ent_price": 2}\n')

    first = await read_all_json(path)
    writer.join()

    assert payloads(first) == [{"name": "a", "current_price": 1}]
    second = await read_all_json(path, cursor=first[-1].cursor)
    assert payloads(second) == [{"name": "b", "current_price": 2}]


async def test_csv_missing_file_fails_the_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="file not found"):
        await read_all_csv(tmp_path / "nope.csv")


# -- JSON Lines -----------------------------------------------------------------------


async def test_json_lines_resume_and_keep_what_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"name": "A", "current_price": 1}),
        "",
        '{"name": "B", "current_price": NaN}',
        "this is not json",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    chunks = await read_all_json(path, batch_size=2)

    assert payloads(chunks) == [
        {"name": "A", "current_price": 1},
        {"name": "B", "current_price": "NaN"},
        "this is not json",
    ]
    assert chunks[-1].cursor["offset"] == path.stat().st_size
    assert chunks[-1].cursor["mode"] == "lines"

    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"name": "C", "current_price": 3}) + "\n")
    more = await read_all_json(path, chunks[-1].cursor)
    assert payloads(more) == [{"name": "C", "current_price": 3}]


# -- JSON arrays ----------------------------------------------------------------------


def coins(*stamps: str) -> list[dict[str, Any]]:
    return [
        {"id": f"c{i}", "name": f"C{i}", "current_price": i, "last_updated": stamp}
        for i, stamp in enumerate(stamps)
    ]


async def test_json_array_is_read_whole_every_run(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    items = coins("2026-01-01T00:00:02Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:03Z")
    path.write_text(json.dumps(items), encoding="utf-8")

    first = await read_all_json(path, batch_size=2)

    assert payloads(first) == items
    assert [c.cursor for c in first] == [{"mode": "array"}] * 3
    assert [(len(c.records), c.final) for c in first] == [(2, False), (1, False), (0, True)]

    # Older than the newest record of the first read, and as old as it: both are
    # real records, so both are read (raw idempotency makes the repeats duplicates).
    lagging = {"id": "c8", "name": "C8", "current_price": 8, "last_updated": "2026-01-01T00:00:01Z"}
    same = {"id": "c2", "name": "C2", "current_price": 2.5, "last_updated": "2026-01-01T00:00:03Z"}
    path.write_text(json.dumps([*items, lagging, same]), encoding="utf-8")

    second = await read_all_json(path, first[-1].cursor)

    assert payloads(second) == [*items, lagging, same]


async def test_json_array_ignores_a_high_water_mark_of_an_older_version(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    items = coins("2026-01-01T00:00:02Z")
    path.write_text(json.dumps(items), encoding="utf-8")

    chunks = await read_all_json(path, {"high_water": "2030-01-01T00:00:00Z", "mode": "array"})

    assert payloads(chunks) == items
    assert chunks[-1].cursor == {"mode": "array"}


async def test_json_object_with_one_list_is_read_as_its_records(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    items = coins("2026-01-01T00:00:01Z")
    path.write_text(json.dumps({"data": items}, indent=2), encoding="utf-8")

    assert payloads(await read_all_json(path)) == items


@pytest.mark.parametrize(
    ("text", "needle"),
    [('[{"name": ', "malformed JSON"), ('"just a string"', "expected a JSON array")],
)
async def test_json_that_cannot_be_records_fails_the_source(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SourceError, match=needle):
        await read_all_json(path)


async def test_a_modification_time_in_the_future_does_not_stall_the_read(tmp_path: Path) -> None:
    path = tmp_path / "skewed.csv"
    path.write_bytes(b"name,value,updated_at\ncoin a,1.5,2025-01-01T00:00:00Z")
    os.utime(path, (time.time() + 3600, time.time() + 3600))
    started = time.monotonic()

    chunks = await read_all_csv(path)

    assert time.monotonic() - started < 10 * files.SETTLE_SECONDS
    assert [p["name"] for p in payloads(chunks)] == ["coin a"]
