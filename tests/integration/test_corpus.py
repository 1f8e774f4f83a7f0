"""Every case of the bad-input corpus through the real pipeline.

Each case gets a fresh database and a sources file declaring one source that reads
the case's file. The run must end as written beside the case in
``tests/corpus/cases.py``, and in every case:

- no traceback and no error-level log line, and the run's error is one line;
- nothing lost: ``fetched = raw_inserted + duplicates``, the raw table holds
  exactly the expected records, and each raw record is accounted for (rejected
  with the reason the transform gives it, or present in ``unified_data``);
- the API serves the run, its rejections and the data without a 500.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from app.api.server import create_app
from config.settings import Settings
from config.sources import FieldMapping, load_sources
from pipelines.transform import Rejection, transform
from tests.corpus.cases import CASES, Case
from tests.helpers import RAW_TABLES, make_settings, run_etl, write_sources

KEY = "corpus-key-0123456789"
AUTH = {"x-api-key": KEY}
RUN_STATUS = {"coerced": "success", "rejected": "partial", "source_failed": "failed"}


def _params() -> list[Any]:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def _entry(case: Case, path: Path) -> str:
    mapping = case.mapping or (
        {"name": "name", "value": "value", "observed_at": "updated_at"}
        if case.kind == "csv"
        else {"name": "name", "value": "current_price", "observed_at": "last_updated", "id": "id"}
    )
    pairs = ", ".join(f'{key} = "{value}"' for key, value in mapping.items())
    return (
        f'[[sources]]\nname = "{case.kind}"\nkind = "{case.kind}"\n'
        f"location = '{path}'\nmapping = {{ {pairs} }}\n"
    )


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _problems(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Log entries that betray a crash: errors, exceptions, tracebacks."""
    return [
        entry
        for entry in logs
        if entry.get("log_level") in ("error", "critical", "exception")
        or "exc_info" in entry
        or "exception" in entry
        or "Traceback" in json.dumps(entry, default=str)
    ]


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The read API over the case's database (no ingestion loop)."""
    settings = Settings(
        database_url=database_url,
        api_keys=(KEY,),
        etl_on_startup=False,
        etl_interval_seconds=0,
    )
    async with AsyncTestClient(app=create_app(settings, sources=[])) as c:
        yield c


@pytest.mark.parametrize("case", _params())
async def test_corpus_case(
    pool: asyncpg.Pool[Any], tmp_path: Path, client: AsyncTestClient[Litestar], case: Case
) -> None:
    path = tmp_path / "data" / case.file
    path.parent.mkdir()
    path.write_bytes(case.content())
    settings = make_settings(write_sources(tmp_path, _entry(case, path)))
    (source_config,) = load_sources(settings)

    with capture_logs() as logs:
        run = await run_etl(pool, settings)

    assert _problems(logs) == []
    source = run["sources"][case.kind]
    error = source["error"]
    assert run["status"] == RUN_STATUS[case.outcome], error
    if case.outcome == "source_failed":
        assert source["status"] == "failed"
        assert case.error is not None
        assert error is not None
        assert case.error in error, error
        assert "\n" not in error
        assert "Traceback" not in error
    else:
        assert (source["status"], error) == ("success", None)

    # Counts balance and the raw table holds every distinct record received.
    table = RAW_TABLES[case.kind]
    assert source["fetched"] == source["raw_inserted"] + source["duplicates"]
    assert (source["raw_inserted"], source["duplicates"]) == (case.raw, case.duplicates)
    raw = {
        row["id"]: json.loads(row["payload"])
        for row in await pool.fetch(f"SELECT id, payload FROM {table} ORDER BY id")
    }
    assert len(raw) == case.raw
    for payload in case.payloads:
        assert payload in raw.values()

    # Rejections: the expected field and reason, each pointing at its raw row.
    rejections = await pool.fetch(
        "SELECT raw_id, field, reason, raw_table FROM etl_rejections ORDER BY id"
    )
    assert source["rejected"] == len(rejections)
    assert {r["raw_table"] for r in rejections} <= {table}
    assert len({r["raw_id"] for r in rejections}) == len(rejections)
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    for rejection in rejections:
        match = next(
            (
                (field, reason)
                for field, reason, _ in case.rejected
                if rejection["field"] == field and reason in rejection["reason"]
            ),
            None,
        )
        assert match is not None, f"unexpected rejection {dict(rejection)}"
        tally[match] += 1
    assert dict(tally) == {(field, reason): n for field, reason, n in case.rejected}

    # Unified rows: canonical names, values and timestamps.
    unified = await pool.fetch(
        "SELECT name, value, observed_at, ingested_at, source FROM unified_data ORDER BY name"
    )
    assert [(u["name"], u["value"]) for u in unified] == [(n, v) for n, v, _ in case.unified]
    for row, (_, _, observed) in zip(unified, case.unified, strict=True):
        expected = row["ingested_at"] if observed is None else _utc(observed)
        assert row["observed_at"] == expected, row["name"]
        assert row["source"] == case.kind

    # Nothing lost: raw alone explains every outcome (what reprocess relies on).
    if case.outcome == "source_failed":
        assert (rejections, unified) == ([], [])
    else:
        mapping: FieldMapping = source_config.mapping
        reasons = {r["raw_id"]: (r["field"], r["reason"]) for r in rejections}
        names = {u["name"] for u in unified}
        for raw_id, payload in raw.items():
            result = transform(payload, mapping)
            if isinstance(result, Rejection):
                assert reasons.get(raw_id) == (result.field, result.reason), payload
            else:
                assert raw_id not in reasons, payload
                assert result.name in names, payload

    # The API serves all of it.
    got = await client.get(f"/runs/{run['id']}", headers=AUTH)
    assert got.status_code == 200
    assert got.json()["sources"][case.kind]["status"] == source["status"]
    listed = await client.get(f"/rejections?run_id={run['id']}&limit=1000", headers=AUTH)
    assert listed.status_code == 200
    items = listed.json()["data"]
    assert [(i["raw_id"], i["field"], i["reason"]) for i in items] == [
        (r["raw_id"], r["field"], r["reason"]) for r in rejections
    ]
    assert all(i["payload"] == raw[i["raw_id"]] for i in items)
    data = await client.get("/data?limit=1000", headers=AUTH)
    assert data.status_code == 200
    assert [d["name"] for d in data.json()["data"]] == [u["name"] for u in unified]
    assert (await client.get("/stats")).status_code == 200
