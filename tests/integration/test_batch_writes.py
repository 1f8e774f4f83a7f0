"""The batch statement itself (persistence/batches.py), on a real database.

Batches are written optimistically (no ON CONFLICT) while records keep being
new, and the careful way for a while after one was already stored; either way
the counts and the stored rows are those of the contract.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from persistence import batches
from persistence.batches import BatchColumns, InsertMode
from pipelines.identity import IdentityRules, Resolver
from pipelines.records import make_record

RESOLVER = Resolver(IdentityRules(), {"csv": False})

TABLE = "raw_csv_data"


def _columns(names_values: list[tuple[str, float]], when: datetime) -> BatchColumns:
    cols = BatchColumns()
    for name, value in names_values:
        record = make_record({"name": name, "value": repr(value), "updated_at": when.isoformat()})
        cols.content_hash.append(record.content_hash)
        cols.payload.append(record.data.decode())
        cols.name.append(name.lower())
        cols.value.append(value)
        cols.observed_at.append(when)
        cols.record_id.append(None)
        cols.rejected_field.append(None)
        cols.rejected_reason.append(None)
    return cols


async def _write(conn: Any, cols: BatchColumns, mode: InsertMode) -> tuple[int, int, int]:
    return await batches.write_batch_adaptive(
        conn,
        TABLE,
        cols,
        mode,
        resolver=RESOLVER,
        source="csv",
        priority=0,
        run_id=uuid.uuid4(),
        ingested_at=datetime.now(UTC),
        fetched=len(cols.content_hash),
        cursor={"offset": 0},
        schema=None,
    )


T1 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_a_batch_holding_a_stored_record_is_written_again_the_careful_way(
    pool: asyncpg.Pool[Any],
) -> None:
    mode = InsertMode()
    async with pool.acquire() as conn:
        assert await _write(conn, _columns([("A", 1.0), ("B", 2.0)], T1), mode) == (2, 0, 2)
        assert mode.careful == 0  # new records: still optimistic

        # "A" again (stored), with two new ones: the optimistic statement fails as a
        # whole and the careful one stores exactly the new ones.
        again = _columns([("A", 1.0), ("C", 3.0), ("D", 4.0)], T1)
        assert await _write(conn, again, mode) == (2, 0, 2)
        assert mode.careful == batches.SAFE_BATCHES_AFTER_DUPLICATE

        rows = await conn.fetch(f"SELECT payload FROM {TABLE} ORDER BY id")
        names = [msgspec.json.decode(r["payload"])["name"] for r in rows]
        assert names == ["A", "B", "C", "D"]  # nothing twice, nothing lost, in order
        assert await conn.fetchval("SELECT count(*) FROM unified_data") == 4


async def test_careful_batches_end_after_a_run_of_batches_without_stored_records(
    pool: asyncpg.Pool[Any],
) -> None:
    mode = InsertMode(careful=3)
    async with pool.acquire() as conn:
        for index, expected in enumerate((2, 1, 0)):
            written = await _write(conn, _columns([(f"N{index}", 1.0)], T1), mode)
            assert written[0] == 1
            assert mode.careful == expected
        # A careful batch that meets a stored record starts the count again.
        mode.careful = 2
        await _write(conn, _columns([("N0", 1.0), ("M", 1.0)], T1), mode)
        assert mode.careful == batches.SAFE_BATCHES_AFTER_DUPLICATE
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE}") == 4


async def test_values_and_timestamps_reach_the_database_exactly(
    pool: asyncpg.Pool[Any],
) -> None:
    # The batch travels as JSON: floats must come back bit for bit, timestamps
    # to the microsecond, text with quotes, backslashes and non-ASCII intact.
    values = [0.1 + 0.2, 1e-300, 1.7976931348623157e308, -0.0, 123456789.12345679, 5e-324]
    when = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    names = [f'quote " back \\ ü {i}' for i in range(len(values))]
    cols = _columns(list(zip(names, values, strict=True)), when)
    cols.record_id = [f"id-{i}-\u00e9" for i in range(len(values))]
    async with pool.acquire() as conn:
        await _write(conn, cols, InsertMode())
        rows = await conn.fetch(
            "SELECT name, value, observed_at, source_record_id FROM unified_data ORDER BY name"
        )
        stored_payloads = await conn.fetch(f"SELECT payload FROM {TABLE} ORDER BY id")
    got = {r["name"]: (r["value"], r["observed_at"], r["source_record_id"]) for r in rows}
    expected = {
        n.lower(): (v, when, f"id-{i}-\u00e9")
        for i, (n, v) in enumerate(zip(names, values, strict=True))
    }
    assert got == expected
    assert [msgspec.json.decode(r["payload"]) for r in stored_payloads] == [
        msgspec.json.decode(p) for p in cols.payload
    ]


async def test_special_characters_and_edge_values_arrive_as_they_were(
    pool: asyncpg.Pool[Any],
) -> None:
    # Whatever format the batch travels in: tab, newline, carriage return and
    # backslash arrive as they were, and a value reading "\N" is text, not NULL.
    tricky = ["tab\there", "line\nbreak", "cr\rhere", "back\\slash", "\\N", "", "\\\\N\t\\"]
    cols = _columns([(f"name {i} {t}", float(i)) for i, t in enumerate(tricky)], T1)
    cols.record_id = [t for t in tricky]
    cols.record_id[0] = None
    # Payloads whose JSON holds escapes: the server must store the JSON as given.
    for i, text in enumerate(tricky):
        record = make_record({"name": cols.name[i], "raw": text, "q": '"\\u00e9"'})
        cols.content_hash[i] = record.content_hash
        cols.payload[i] = record.data.decode()
    # Timestamps at the edges of the range, and one not in UTC.
    from datetime import timedelta, timezone

    cols.observed_at[1] = datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    cols.observed_at[2] = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    cols.observed_at[3] = datetime(
        2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))
    )
    cols.observed_at[4] = None
    # Two rejected rows: their reason and field keep every character.
    cols.name[5] = cols.name[6] = None
    cols.value[5] = cols.value[6] = None
    cols.rejected_field[5], cols.rejected_reason[5] = "value", "not a number: 'a\tb\nc\\d'"
    cols.rejected_field[6], cols.rejected_reason[6] = "na\\me", ""
    when = datetime(2026, 2, 2, tzinfo=UTC)
    async with pool.acquire() as conn:
        written = await batches.write_batch_adaptive(
            conn,
            TABLE,
            cols,
            InsertMode(),
            resolver=RESOLVER,
            source="csv",
            priority=0,
            run_id=uuid.uuid4(),
            ingested_at=when,
            fetched=len(cols.content_hash),
            cursor={"offset": 0},
            schema=None,
        )
        unified = await conn.fetch(
            "SELECT name, value, observed_at, source_record_id FROM unified_data"
        )
        raw = await conn.fetch(f"SELECT content_hash, payload FROM {TABLE} ORDER BY id")
        rejections = await conn.fetch("SELECT field, reason FROM etl_rejections ORDER BY raw_id")
    assert written == (7, 2, 5)
    assert {r["name"]: (r["value"], r["observed_at"], r["source_record_id"]) for r in unified} == {
        cols.name[i]: (
            cols.value[i],
            cols.observed_at[i] if cols.observed_at[i] is not None else when,
            cols.record_id[i],
        )
        for i in range(5)
    }
    assert [bytes(r["content_hash"]) for r in raw] == cols.content_hash
    assert [msgspec.json.decode(r["payload"]) for r in raw] == [
        msgspec.json.decode(p) for p in cols.payload
    ]
    assert [(r["field"], r["reason"]) for r in rejections] == [
        ("value", "not a number: 'a\tb\nc\\d'"),
        ("na\\me", ""),
    ]
