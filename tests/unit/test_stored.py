"""Records raw already holds are marked before preparing, and go no further than drift."""

from __future__ import annotations

from collections.abc import Sequence

from config.sources import FieldMapping, SourceConfig
from pipelines.prepare import prepare
from pipelines.records import Chunk, make_record
from pipelines.sources.stored import mark_stored

MAPPING = FieldMapping(name="name", value="current_price", observed_at="at")
SOURCE = SourceConfig(name="json", kind="json", location="x.json", mapping=MAPPING)
FROZEN = SourceConfig(
    name="json", kind="json", location="x.json", mapping=MAPPING, drift_policy="freeze"
)


def records(*names: str) -> list[dict[str, object]]:
    return [{"name": n, "current_price": 1.5, "at": "2026-01-01T00:00:00Z"} for n in names]


async def test_the_lookup_marks_what_raw_holds() -> None:
    chunk = Chunk([make_record(p) for p in records("a", "b", "c")], {"mode": "array"})
    held = {chunk.records[1].content_hash}
    asked: list[list[bytes]] = []

    async def lookup(hashes: Sequence[bytes]) -> set[bytes]:
        asked.append(list(hashes))
        return held & set(hashes)

    marked = await mark_stored(chunk, lookup)

    assert asked == [[r.content_hash for r in chunk.records]]
    assert marked.stored == frozenset(held)
    assert len(marked.records) == 3


async def test_without_a_lookup_or_records_nothing_is_asked() -> None:
    async def lookup(hashes: Sequence[bytes]) -> set[bytes]:
        raise AssertionError("not to be asked")

    empty = Chunk([], {}, final=True)
    assert (await mark_stored(empty, lookup)).stored == frozenset()
    chunk = Chunk([make_record(p) for p in records("a")], {})
    assert (await mark_stored(chunk, None)).stored == frozenset()


def test_stored_records_count_as_fetched_but_are_not_prepared() -> None:
    payloads = records("a", "b", "c", "c")
    chunk = Chunk([make_record(p) for p in payloads], {"mode": "array"})
    chunk.stored = frozenset({chunk.records[0].content_hash, chunk.records[2].content_hash})

    prepared = prepare(SOURCE, chunk, None)

    assert prepared.fetched == 4
    assert prepared.columns.content_hash == [chunk.records[1].content_hash]


SCHEMA = {"name": "string", "current_price": "number", "at": "string"}


def test_under_freeze_drift_is_judged_on_stored_records_too() -> None:
    # A frozen source keeps failing while its upstream stays drifted, even when
    # every record it sends was stored by an earlier run.
    renamed = [{"title": "a", "current_price": 1.5, "at": "2026-01-01T00:00:00Z"}]
    chunk = Chunk([make_record(p) for p in renamed], {"mode": "array"})
    chunk.stored = frozenset(r.content_hash for r in chunk.records)

    prepared = prepare(FROZEN, chunk, SCHEMA)

    assert prepared.outcome.error is not None
    assert prepared.columns.content_hash == []


def test_under_evolve_drift_is_judged_on_new_records() -> None:
    # A document that keeps its old records and adds renamed ones: the rename is
    # followed for the new records; the old ones were judged when they came.
    old = records("a", "b")
    new = [{"name": "c", "current_price_usd": 2.5, "at": "2026-01-02T00:00:00Z"}]
    chunk = Chunk([make_record(p) for p in [*old, *new]], {"mode": "array"})
    chunk.stored = frozenset(r.content_hash for r in chunk.records[:2])

    prepared = prepare(SOURCE, chunk, SCHEMA)

    assert prepared.outcome.error is None
    assert [e.kind for e in prepared.outcome.events] == ["renamed"]
    assert prepared.outcome.mapping.value == "current_price_usd"
    assert prepared.columns.content_hash == [chunk.records[2].content_hash]
    assert prepared.fetched == 3


def test_under_evolve_an_unchanged_rerun_reports_no_drift() -> None:
    chunk = Chunk([make_record(p) for p in records("a", "b")], {"mode": "array"})
    chunk.stored = frozenset(r.content_hash for r in chunk.records)

    prepared = prepare(SOURCE, chunk, SCHEMA)

    assert prepared.outcome.events == []
    assert prepared.outcome.error is None
