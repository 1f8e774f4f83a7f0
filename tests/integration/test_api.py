"""The HTTP API through the real app and a real PostgreSQL.

Rows are written with SQL so that these tests depend on the API alone, not on
the pipeline. The app runs in the test client's own event loop; the ``pool``
fixture (the test's loop) only seeds and inspects the database between requests.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import structlog
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.server import create_app
from config.settings import Settings
from observability.metrics import Metrics

KEY_A = "key-alpha-0123456789"
KEY_B = "key-bravo-9876543210"
AUTH = {"x-api-key": KEY_A}
DECLARED = ["api", "csv", "json"]
T0 = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)

Client = AsyncTestClient[Litestar]


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        api_keys=(KEY_A, KEY_B),
        etl_on_startup=False,
        etl_interval_seconds=0,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


def ts(value: str | None) -> datetime | None:
    """Parse an API timestamp, insisting on UTC with a ``Z`` suffix."""
    if value is None:
        return None
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value[:-1] + "+00:00")


async def add_unified(
    pool: asyncpg.Pool[Any], rows: Iterable[tuple[str, float, str, datetime]]
) -> None:
    rows = list(rows)
    await pool.execute(
        """
        INSERT INTO unified_data
            (name, value, source, observed_at, ingested_at, priority, raw_id, run_id)
        SELECT t.name, t.value, t.source, t.observed_at, t.observed_at + interval '1 second',
            0, t.n, $5
        FROM unnest($1::text[], $2::float8[], $3::text[], $4::timestamptz[])
            WITH ORDINALITY AS t(name, value, source, observed_at, n)
        """,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        uuid.uuid4(),
    )


async def add_run(
    pool: asyncpg.Pool[Any],
    *,
    status: str,
    started_at: datetime,
    seconds: float | None,
    sources: dict[str, dict[str, Any]],
    trigger: str = "cli",
) -> uuid.UUID:
    """Insert a run and its per-source rows; each source runs for the whole run."""
    run_id = uuid.uuid4()
    finished = None if seconds is None else started_at + timedelta(seconds=seconds)
    await pool.execute(
        "INSERT INTO etl_runs (id, trigger, status, started_at, finished_at) "
        "VALUES ($1, $2, $3, $4, $5)",
        run_id,
        trigger,
        status,
        started_at,
        finished,
    )
    for position, (name, counts) in enumerate(sources.items()):
        source_seconds = counts.get("seconds", seconds)
        await pool.execute(
            """
            INSERT INTO etl_run_sources (run_id, source, position, status, fetched,
                raw_inserted, duplicates, rejected, unified_upserted, error, drift,
                started_at, finished_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13)
            """,
            run_id,
            name,
            position,
            counts.get("status", "success"),
            counts.get("fetched", 0),
            counts.get("raw_inserted", 0),
            counts.get("duplicates", 0),
            counts.get("rejected", 0),
            counts.get("unified_upserted", 0),
            counts.get("error"),
            msgspec.json.encode(counts.get("drift", [])).decode(),
            started_at,
            None if source_seconds is None else started_at + timedelta(seconds=source_seconds),
        )
    return run_id


async def add_raw(
    pool: asyncpg.Pool[Any], table: str, source: str, run_id: uuid.UUID, payload: Any
) -> int:
    data = msgspec.json.encode(payload)
    raw_id: int = await pool.fetchval(
        f"INSERT INTO {table} (source, run_id, content_hash, payload) "
        "VALUES ($1, $2, $3, $4::jsonb) RETURNING id",
        source,
        run_id,
        data[:16].ljust(16, b"-") + uuid.uuid4().bytes,
        data.decode(),
    )
    return raw_id


async def add_rejection(
    pool: asyncpg.Pool[Any],
    run_id: uuid.UUID,
    source: str,
    table: str,
    raw_id: int,
    field: str,
    reason: str,
) -> int:
    rejection_id: int = await pool.fetchval(
        "INSERT INTO etl_rejections (run_id, source, raw_table, raw_id, field, reason) "
        "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        run_id,
        source,
        table,
        raw_id,
        field,
        reason,
    )
    return rejection_id


def named(body: dict[str, Any]) -> list[str]:
    """The parameters a 400 body names, checked against its detail too."""
    keys = [str(e["key"]) for e in body.get("extra") or []]
    assert body["detail"] == "Invalid parameter: " + ", ".join(keys), body
    return keys


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- shapes -------------------------------------------------------------------------


async def test_every_endpoint_answers_the_contract_shape_on_an_empty_database(
    client: Client,
) -> None:
    root = await client.get("/")
    assert root.status_code == 200
    assert root.json()["status"] == "running"

    health = await client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert {k: body[k] for k in ("status", "db", "last_etl", "etl_loop")} == {
        "status": "ok",
        "db": "ok",
        "last_etl": "never",
        "etl_loop": "disabled",
    }
    assert body["etl_loop_error"] is None

    stats = await client.get("/stats")
    assert stats.status_code == 200
    empty_source = {
        "last_success_at": None,
        "last_failure_at": None,
        "raw_records": 0,
        "checkpoint": None,
        "last_error": None,
    }
    assert stats.json() == {
        "last_run_at": None,
        "last_success_at": None,
        "last_failure_at": None,
        "last_status": "never",
        "last_duration_seconds": None,
        "runs_total": 0,
        "records_processed_total": 0,
        "unified_records": 0,
        "sources": {name: empty_source for name in DECLARED},
    }

    data = await client.get("/data", headers=AUTH)
    assert data.status_code == 200
    page = data.json()
    assert page["data"] == []
    assert page["pagination"] == {"limit": 100, "offset": 0, "total": 0, "next_cursor": None}
    assert page["meta"]["request_id"] == data.headers["x-request-id"]
    assert isinstance(page["meta"]["api_latency_ms"], float)

    runs = await client.get("/runs", headers=AUTH)
    assert runs.status_code == 200
    assert runs.json() == {"data": []}

    rejections = await client.get("/rejections", headers=AUTH)
    assert rejections.json() == {"data": [], "pagination": {"limit": 100, "next_after": None}}

    missing = await client.get(f"/runs/{uuid.uuid4()}", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["status_code"] == 404

    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_stats_runs_and_health_reflect_known_content(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    failed = await add_run(
        pool,
        status="failed",
        started_at=T0,
        seconds=2.0,
        sources={"api": {"status": "failed", "error": "upstream said 503", "fetched": 0}},
    )
    ok = await add_run(
        pool,
        status="success",
        started_at=T0 + timedelta(minutes=5),
        seconds=3.5,
        sources={
            "api": {"fetched": 10, "raw_inserted": 10, "unified_upserted": 10},
            "csv": {"fetched": 20, "raw_inserted": 18, "duplicates": 2, "unified_upserted": 18},
        },
    )
    drift = [
        {
            "kind": "renamed",
            "field": "value",
            "new_field": "price",
            "confidence": 0.91,
            "detail": "value looks renamed to price",
        }
    ]
    partial = await add_run(
        pool,
        status="partial",
        started_at=T0 + timedelta(minutes=10),
        seconds=1.25,
        trigger="schedule",
        sources={
            "api": {"fetched": 5, "raw_inserted": 5, "unified_upserted": 5, "drift": drift},
            "csv": {"status": "failed", "error": "csv: line 7: bad quoting", "fetched": 3},
        },
    )
    # As many raw rows as the runs say they stored (10 + 5 api, 18 csv).
    for i in range(15):
        await add_raw(pool, "raw_api_data", "api", ok, {"id": f"c-{i}", "name": f"Coin {i}"})
    for i in range(18):
        await add_raw(pool, "raw_csv_data", "csv", ok, {"name": f"x{i}", "value": "1"})
    await pool.execute(
        "INSERT INTO etl_checkpoint (source, cursor) VALUES ('csv', $1::jsonb)",
        '{"offset": 4242, "head": "abc"}',
    )
    await add_unified(pool, [("bitcoin", 1.0, "api", T0), ("ether", 2.0, "csv", T0)])

    stats = (await client.get("/stats")).json()
    assert ts(stats["last_run_at"]) == T0 + timedelta(minutes=10)
    assert ts(stats["last_success_at"]) == T0 + timedelta(minutes=5, seconds=3.5)
    assert ts(stats["last_failure_at"]) == T0 + timedelta(seconds=2)
    assert stats["last_status"] == "partial"
    assert stats["last_duration_seconds"] == 1.25
    assert stats["runs_total"] == 3
    assert stats["records_processed_total"] == 0 + 10 + 20 + 5 + 3
    assert stats["unified_records"] == 2
    assert list(stats["sources"]) == DECLARED
    api, csv, json_ = (stats["sources"][n] for n in DECLARED)
    assert ts(api["last_success_at"]) == T0 + timedelta(minutes=10, seconds=1.25)
    assert ts(api["last_failure_at"]) == T0 + timedelta(seconds=2)
    assert api["last_error"] == "upstream said 503"
    assert api["raw_records"] == 15
    assert api["checkpoint"] is None
    assert ts(csv["last_success_at"]) == T0 + timedelta(minutes=5, seconds=3.5)
    assert ts(csv["last_failure_at"]) == T0 + timedelta(minutes=10, seconds=1.25)
    assert csv["last_error"] == "csv: line 7: bad quoting"
    assert csv["raw_records"] == 18
    assert csv["checkpoint"] == {"offset": 4242}  # the head signature stays private
    assert json_ == {
        "last_success_at": None,
        "last_failure_at": None,
        "raw_records": 0,
        "checkpoint": None,
        "last_error": None,
    }

    runs = (await client.get("/runs", headers=AUTH)).json()["data"]
    assert [r["id"] for r in runs] == [str(partial), str(ok), str(failed)]
    newest = runs[0]
    assert set(newest) == {
        "id",
        "trigger",
        "status",
        "started_at",
        "finished_at",
        "duration_seconds",
        "error",
        "sources",
    }
    assert newest["trigger"] == "schedule"
    assert newest["status"] == "partial"
    assert ts(newest["started_at"]) == T0 + timedelta(minutes=10)
    assert ts(newest["finished_at"]) == T0 + timedelta(minutes=10, seconds=1.25)
    assert newest["duration_seconds"] == 1.25
    assert list(newest["sources"]) == ["api", "csv"]
    assert newest["sources"]["api"] == {
        "status": "success",
        "fetched": 5,
        "raw_inserted": 5,
        "duplicates": 0,
        "rejected": 0,
        "unified_upserted": 5,
        "error": None,
        "drift": drift,
    }
    assert newest["sources"]["csv"]["status"] == "failed"
    assert newest["sources"]["csv"]["error"] == "csv: line 7: bad quoting"

    one = await client.get(f"/runs/{partial}", headers=AUTH)
    assert one.status_code == 200
    assert one.json() == newest

    limited = (await client.get("/runs?limit=1", headers=AUTH)).json()["data"]
    assert [r["id"] for r in limited] == [str(partial)]

    health = (await client.get("/health")).json()
    assert health["last_etl"] == "partial"


@pytest.mark.parametrize("path", ["/runs/not-a-uuid", "/runs/1234", "/runs/%27%20OR%201=1"])
async def test_a_malformed_run_id_is_a_client_error(client: Client, path: str) -> None:
    response = await client.get(path, headers=AUTH)
    assert response.status_code in (400, 404)
    assert response.json()["status_code"] == response.status_code


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x"])
async def test_runs_limit_out_of_range_is_400(client: Client, query: str) -> None:
    response = await client.get(f"/runs?{query}", headers=AUTH)
    assert response.status_code == 400
    assert named(response.json()) == ["limit"]


# -- authentication ---------------------------------------------------------------------


PROTECTED = [
    "/data",
    "/runs",
    f"/runs/{uuid.UUID(int=1)}",
    "/rejections",
    f"/compare-runs?a={uuid.UUID(int=1)}&b={uuid.UUID(int=2)}",
]


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": ""},
        {"x-api-key": "wrong"},
        {"x-api-key": KEY_A[:-1]},
        {"x-api-key": KEY_A + "x"},
        {"x-api-key": f"{KEY_A},{KEY_B}"},
    ],
)
async def test_protected_endpoints_refuse_a_missing_or_wrong_key(
    client: Client, path: str, headers: dict[str, str]
) -> None:
    response = await client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"status_code": 401, "detail": "Unauthorized"}


async def test_either_configured_key_is_accepted(client: Client) -> None:
    for key in (KEY_A, KEY_B):
        response = await client.get("/data", headers={"x-api-key": key})
        assert response.status_code == 200, key


@pytest.mark.parametrize("path", ["/", "/health", "/stats", "/metrics", "/schema/openapi.json"])
async def test_public_endpoints_need_no_key(client: Client, path: str) -> None:
    assert (await client.get(path)).status_code == 200


# -- /data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("offset=-1", "offset"),
        ("offset=abc", "offset"),
        ("offset=99999999999999999999999", "offset"),
        ("cursor=%21%21%21", "cursor"),
        ("cursor=bm90LWpzb24", "cursor"),  # base64 of "not-json"
        ("cursor=eyJ2IjoyLCJhZnRlciI6ImEifQ", "cursor"),  # an unknown version
        ("source=a%00b", "source"),  # PostgreSQL text cannot hold U+0000
        ("name=%00", "name"),
        ("name=" + "x" * 10_000, "name"),
        ("source=" + "y" * 10_000, "source"),
    ],
)
async def test_data_rejects_bad_parameters_with_400_naming_them(
    client: Client, query: str, parameter: str
) -> None:
    response = await client.get(f"/data?{query}", headers=AUTH)
    assert response.status_code == 400
    body = response.json()
    assert body["status_code"] == 400
    assert named(body) == [parameter]


async def test_a_cursor_with_a_nonzero_offset_is_400(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    await add_unified(pool, [(f"n{i}", float(i), "csv", T0) for i in range(3)])
    first = (await client.get("/data?limit=1", headers=AUTH)).json()
    cursor = first["pagination"]["next_cursor"]
    assert cursor is not None
    response = await client.get(f"/data?limit=1&offset=1&cursor={cursor}", headers=AUTH)
    assert response.status_code == 400
    assert named(response.json()) == ["cursor"]
    same = await client.get(f"/data?limit=1&offset=0&cursor={cursor}", headers=AUTH)
    assert same.status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "source=%27%20OR%20%271%27=%271",
        "name=%27%3B%20DROP%20TABLE%20unified_data%3B%20--",
        "source=api%27--&name=x",
        "unknown=%27%3B%20SELECT%20pg_sleep(5)%3B--",
    ],
)
async def test_sql_metacharacters_in_queries_find_nothing_and_harm_nothing(
    client: Client, pool: asyncpg.Pool[Any], query: str
) -> None:
    await add_unified(pool, [("bitcoin", 1.0, "api", T0)])
    response = await client.get(f"/data?{query}", headers=AUTH)
    if "unknown=" in query:
        assert response.status_code == 200
        assert response.json()["pagination"]["total"] == 1
    else:
        assert response.status_code == 200
        assert response.json()["data"] == []
        assert response.json()["pagination"]["total"] == 0
    assert await pool.fetchval("SELECT count(*) FROM unified_data") == 1


def _names() -> list[str]:
    # Mixed shapes so ordering is exercised by the database's collation, not by luck.
    names = [f"coin {i:03d}" for i in range(230)]
    names += ["bitcoin", "ether", "strasse", "ω-token", "a", "zz top", "0x", "bitcoin cash"]
    names += [f"z{i}" for i in range(19)]
    return names


async def _seed_many(pool: asyncpg.Pool[Any]) -> list[str]:
    names = _names()
    sources = ["api", "csv", "json"]
    await add_unified(
        pool,
        [
            (n, float(i) + 0.5, sources[i % 3], T0 + timedelta(seconds=i))
            for i, n in enumerate(names)
        ],
    )
    return names


async def test_offset_pages_are_disjoint_and_cover_the_table(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    names = await _seed_many(pool)
    everything = (await client.get("/data?limit=1000", headers=AUTH)).json()
    ordered = [item["name"] for item in everything["data"]]
    assert sorted(ordered) == sorted(names)
    assert everything["pagination"]["next_cursor"] is None

    pages: list[list[str]] = []
    offset = 0
    while True:
        body = (await client.get(f"/data?limit=50&offset={offset}", headers=AUTH)).json()
        assert body["pagination"] == {
            "limit": 50,
            "offset": offset,
            "total": len(names),
            "next_cursor": body["pagination"]["next_cursor"],
        }
        if not body["data"]:
            break
        pages.append([item["name"] for item in body["data"]])
        offset += 50
    seen = [n for page in pages for n in page]
    assert len(seen) == len(set(seen)) == len(names)
    assert seen == ordered  # the same order as one big page: ordered by name


async def test_following_next_cursor_visits_every_row_once(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    names = await _seed_many(pool)
    ordered = [
        i["name"] for i in (await client.get("/data?limit=1000", headers=AUTH)).json()["data"]
    ]
    seen: list[str] = []
    query = "/data?limit=37"
    pages = 0
    while True:
        body = (await client.get(query, headers=AUTH)).json()
        pages += 1
        assert body["pagination"]["total"] == len(names)
        seen += [item["name"] for item in body["data"]]
        cursor = body["pagination"]["next_cursor"]
        if cursor is None:
            break
        assert len(body["data"]) == 37
        query = f"/data?limit=37&cursor={cursor}"
        assert pages < 100
    assert seen == ordered
    assert pages == -(-len(names) // 37)


async def test_names_are_in_code_point_order_whatever_the_servers_locale(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    # Under a linguistic collation (en_US.UTF-8, say) spaces and punctuation
    # weigh less than letters and "é" sorts beside "e"; names are keys, compared
    # byte for byte (collation "C"), so every server gives the same pages.
    names = ["ab", "a b", "a-c", "éclair", "eclair", "f", "zz", "ω", "10", "9", "_x"]
    await add_unified(pool, [(n, 1.0, "api", T0) for n in names])
    query, seen = "/data?limit=4", []
    while query:
        body = (await client.get(query, headers=AUTH)).json()
        seen += [item["name"] for item in body["data"]]
        cursor = body["pagination"]["next_cursor"]
        query = f"/data?limit=4&cursor={cursor}" if cursor else ""
    assert seen == sorted(names)
    collation = await pool.fetchval(
        "SELECT collation_name FROM information_schema.columns"
        " WHERE table_name = 'unified_data' AND column_name = 'name'"
    )
    assert collation == "C"


async def test_next_cursor_is_null_exactly_on_the_last_page(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    await add_unified(pool, [(f"n{i:02d}", 1.0, "csv", T0) for i in range(10)])
    full = (await client.get("/data?limit=10", headers=AUTH)).json()
    assert len(full["data"]) == 10
    assert full["pagination"]["next_cursor"] is None
    short = (await client.get("/data?limit=9", headers=AUTH)).json()
    cursor = short["pagination"]["next_cursor"]
    assert cursor is not None
    # Opaque, but URL-safe base64 without padding.
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    last = (await client.get(f"/data?limit=9&cursor={cursor}", headers=AUTH)).json()
    assert [i["name"] for i in last["data"]] == ["n09"]
    assert last["pagination"]["next_cursor"] is None
    assert last["pagination"]["total"] == 10


async def test_source_and_name_filters(client: Client, pool: asyncpg.Pool[Any]) -> None:
    names = await _seed_many(pool)
    csv_expected = {n for i, n in enumerate(names) if i % 3 == 1}
    body = (await client.get("/data?source=csv&limit=1000", headers=AUTH)).json()
    assert {i["name"] for i in body["data"]} == csv_expected
    assert {i["source"] for i in body["data"]} == {"csv"}
    assert body["pagination"]["total"] == len(csv_expected)

    # Keyset pages inside a filter stay inside it.
    seen: list[str] = []
    query = "/data?source=csv&limit=20"
    while query:
        page = (await client.get(query, headers=AUTH)).json()
        assert page["pagination"]["total"] == len(csv_expected)
        seen += [i["name"] for i in page["data"]]
        cursor = page["pagination"]["next_cursor"]
        query = f"/data?source=csv&limit=20&cursor={cursor}" if cursor else ""
    assert sorted(seen) == sorted(csv_expected)
    assert len(seen) == len(set(seen))

    for raw in ("%20BITCOIN", "bitcoin", "BitCoin%20%20", "%E2%80%83Bitcoin"):
        found = (await client.get(f"/data?name={raw}", headers=AUTH)).json()
        assert [i["name"] for i in found["data"]] == ["bitcoin"], raw
        assert found["pagination"]["total"] == 1
    spaced = (await client.get("/data?name=%20Bitcoin%20%20%20Cash", headers=AUTH)).json()
    assert [i["name"] for i in spaced["data"]] == ["bitcoin cash"]
    for raw in ("%EF%BC%B3TRASSE", "Stra%C3%9Fe"):  # fullwidth S (NFKC); ß (case folding)
        found = (await client.get(f"/data?name={raw}", headers=AUTH)).json()
        assert [i["name"] for i in found["data"]] == ["strasse"], raw

    none = (await client.get("/data?source=nope", headers=AUTH)).json()
    assert none["data"] == []
    assert none["pagination"]["total"] == 0
    both = (await client.get("/data?source=api&name=bitcoin", headers=AUTH)).json()
    assert both["pagination"]["total"] == (1 if names.index("bitcoin") % 3 == 0 else 0)


async def test_data_items_carry_the_contract_fields(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    observed = datetime(2026, 11, 27, 10, 47, 48, tzinfo=UTC)
    await pool.execute(
        """
        INSERT INTO unified_data
            (name, value, source, observed_at, ingested_at, priority, raw_id, run_id)
        VALUES ('bitcoin', 107077.69, 'api', $1, $2, 0, 1, $3)
        """,
        observed,
        datetime(2026, 11, 27, 10, 48, 1, 123456, tzinfo=UTC),
        uuid.uuid4(),
    )
    body = (await client.get("/data", headers=AUTH)).json()
    assert body["data"] == [
        {
            "name": "bitcoin",
            "value": 107077.69,
            "source": "api",
            "observed_at": "2026-11-27T10:47:48Z",
            "ingested_at": "2026-11-27T10:48:01.123456Z",
        }
    ]


# -- request ids, errors, logs ------------------------------------------------------------


async def test_every_response_carries_a_request_id(client: Client) -> None:
    for path in ("/", "/health", "/nope", "/data", "/data?limit=0"):
        response = await client.get(path)
        assert uuid.UUID(response.headers["x-request-id"]).version == 4, path
    ids = {(await client.get("/")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3

    echoed = await client.get("/data", headers={**AUTH, "x-request-id": "trace-abc.123"})
    assert echoed.headers["x-request-id"] == "trace-abc.123"
    assert echoed.json()["meta"]["request_id"] == "trace-abc.123"

    for bad in ("x" * 129, "has space", ""):
        response = await client.get("/", headers={"x-request-id": bad})
        assert response.headers["x-request-id"] != bad
        assert uuid.UUID(response.headers["x-request-id"]).version == 4
    # A POST to a GET route is refused by the router itself; still JSON, still an id.
    refused = await client.post("/health", headers={"x-request-id": "r-405"})
    assert refused.status_code == 405
    assert refused.headers["x-request-id"] == "r-405"
    assert refused.json()["status_code"] == 405


async def test_an_unexpected_error_is_a_json_500_that_leaks_nothing(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    await pool.execute("DROP TABLE etl_rejections")
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        response = await client.get("/rejections", headers={**AUTH, "x-request-id": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {"status_code": 500, "detail": "Internal Server Error"}
    assert "etl_rejections" not in response.text
    errors = [e for e in logs if e["event"] == "unhandled_error"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1"
    access = [e for e in logs if e["event"] == "http_request"]
    assert access == [
        {
            "event": "http_request",
            "log_level": "info",
            "request_id": "boom-1",
            "method": "GET",
            "route": "/rejections",
            "path": "/rejections",
            "status": 500,
            "duration_ms": access[0]["duration_ms"],
        }
    ]
    # The app is still serving.
    assert (await client.get("/")).status_code == 200


async def test_metrics_label_http_requests_by_route_template(client: Client) -> None:
    run_id = uuid.uuid4()
    await client.get(f"/runs/{run_id}", headers=AUTH)
    await client.get(f"/runs/{uuid.uuid4()}", headers=AUTH)
    await client.get("/data", headers=AUTH)
    await client.get("/no/such/path/12345")
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(response.text)
    routes = {
        dict(labels)["route"]
        for (name, labels), _ in samples.items()
        if name == "http_requests_total"
    }
    assert {"/runs/{run_id}", "/data", "<unmatched>"} <= routes
    assert not any(str(run_id) in r or "12345" in r for r in routes)
    key = (
        "http_requests_total",
        (("method", "GET"), ("route", "/runs/{run_id}"), ("status", "404")),
    )
    assert samples[key] == 2
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert {
        "etl_runs",
        "etl_failures",
        "etl_records",
        "etl_duration_seconds",
        "etl_last_success_timestamp_seconds",
        "http_requests",
        "http_request_duration_seconds",
    } <= families


async def test_openapi_documents_every_endpoint_and_the_key(client: Client) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert {
        "/",
        "/health",
        "/data",
        "/stats",
        "/runs",
        "/runs/{run_id}",
        "/compare-runs",
        "/rejections",
        "/metrics",
    } <= set(doc["paths"])
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert scheme == {"type": "apiKey", "name": "x-api-key", "in": "header"}
    assert doc["paths"]["/data"]["get"]["security"] == [{"apiKey": []}]
    assert "security" not in doc["paths"]["/stats"]["get"]
    params = {p["name"] for p in doc["paths"]["/data"]["get"]["parameters"]}
    assert {"limit", "offset", "source", "name", "cursor"} <= params


# -- /rejections --------------------------------------------------------------------------


async def test_rejections_show_the_reason_and_the_raw_record(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    run_a = await add_run(
        pool,
        status="partial",
        started_at=T0,
        seconds=1.0,
        sources={"csv": {"rejected": 3}, "json": {"rejected": 1}},
    )
    run_b = await add_run(
        pool,
        status="partial",
        started_at=T0 + timedelta(minutes=1),
        seconds=1.0,
        sources={"csv": {"rejected": 1}},
    )
    bad_rows = [
        ({"name": "", "value": "1", "updated_at": "2026-01-01"}, "name", "missing"),
        ({"name": "x", "value": "abc", "updated_at": "2026-01-01"}, "value", "not a number: abc"),
        ({"name": "y", "value": "NaN", "updated_at": "2026-01-01"}, "value", "not a finite number"),
    ]
    expected: list[dict[str, Any]] = []
    for payload, field, reason in bad_rows:
        raw_id = await add_raw(pool, "raw_csv_data", "csv", run_a, payload)
        rid = await add_rejection(pool, run_a, "csv", "raw_csv_data", raw_id, field, reason)
        expected.append(
            {
                "id": rid,
                "run_id": str(run_a),
                "source": "csv",
                "raw_id": raw_id,
                "field": field,
                "reason": reason,
                "payload": payload,
                "raw_table": "raw_csv_data",
            }
        )
    json_payload = {"id": "q", "name": "Q", "current_price": None, "nested": {"a": [1, 2]}}
    raw_json = await add_raw(pool, "raw_third_source_data", "json", run_a, json_payload)
    rid = await add_rejection(
        pool, run_a, "json", "raw_third_source_data", raw_json, "value", "missing"
    )
    expected.append(
        {
            "id": rid,
            "run_id": str(run_a),
            "source": "json",
            "raw_id": raw_json,
            "field": "value",
            "reason": "missing",
            "payload": json_payload,
            "raw_table": "raw_third_source_data",
        }
    )
    raw_b = await add_raw(pool, "raw_csv_data", "csv", run_b, {"name": "z", "value": "?"})
    rid_b = await add_rejection(pool, run_b, "csv", "raw_csv_data", raw_b, "value", "nan?")

    everything = (await client.get("/rejections", headers=AUTH)).json()
    assert [r["id"] for r in everything["data"]] == [e["id"] for e in expected] + [rid_b]
    for item, want in zip(everything["data"], expected, strict=False):
        created = item.pop("created_at")
        assert ts(created) is not None
        assert item == want

    by_run = (await client.get(f"/rejections?run_id={run_a}", headers=AUTH)).json()["data"]
    assert [r["id"] for r in by_run] == [e["id"] for e in expected]
    by_source = (await client.get(f"/rejections?run_id={run_a}&source=csv", headers=AUTH)).json()
    assert [r["reason"] for r in by_source["data"]] == [r[2] for r in bad_rows]
    only_json = (await client.get("/rejections?source=json", headers=AUTH)).json()["data"]
    assert [r["payload"] for r in only_json] == [json_payload]

    first = (await client.get("/rejections?limit=2", headers=AUTH)).json()
    assert len(first["data"]) == 2
    after = first["pagination"]["next_after"]
    assert after == first["data"][-1]["id"]
    rest = (await client.get(f"/rejections?limit=2&after={after}", headers=AUTH)).json()
    last = (
        await client.get(
            f"/rejections?limit=2&after={rest['pagination']['next_after']}", headers=AUTH
        )
    ).json()
    paged = [r["id"] for r in first["data"] + rest["data"] + last["data"]]
    assert paged == [r["id"] for r in everything["data"]]
    assert last["pagination"]["next_after"] is None

    for query in ("run_id=nope", "limit=0", "limit=1001", "after=-1"):
        response = await client.get(f"/rejections?{query}", headers=AUTH)
        assert response.status_code == 400, query
        assert named(response.json()) == [query.split("=")[0]]


# -- /compare-runs ----------------------------------------------------------------------------


async def test_compare_runs_flags_a_volume_drop_and_names_the_rule(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    a = await add_run(
        pool,
        status="success",
        started_at=T0,
        seconds=10.0,
        sources={
            "api": {"fetched": 1000, "raw_inserted": 1000, "unified_upserted": 990, "seconds": 8.0},
            "csv": {"fetched": 50, "raw_inserted": 50},
        },
    )
    b = await add_run(
        pool,
        status="success",
        started_at=T0 + timedelta(minutes=5),
        seconds=11.0,
        sources={
            "api": {
                "fetched": 400,
                "raw_inserted": 380,
                "duplicates": 20,
                "unified_upserted": 370,
                "seconds": 9.5,
            },
            "csv": {"fetched": 52, "raw_inserted": 52},
        },
    )
    response = await client.get(f"/compare-runs?a={a}&b={b}", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["a"]["id"] == str(a)
    assert body["b"]["id"] == str(b)
    assert body["duration_delta_seconds"] == 1.0
    assert body["sources"]["api"]["delta"] == {
        "fetched": -600,
        "raw_inserted": -620,
        "duplicates": 20,
        "rejected": 0,
        "unified_upserted": -620,
        "duration_seconds": 1.5,
    }
    assert body["sources"]["api"]["a_status"] == "success"
    assert body["sources"]["api"]["b"]["fetched"] == 400
    assert body["sources"]["csv"]["delta"]["fetched"] == 2
    assert [(x["rule"], x["source"]) for x in body["anomalies"]] == [("volume_change", "api")]
    flag = body["anomalies"][0]
    assert flag["value"] == -0.6
    assert flag["threshold"] == 0.5
    assert "1000" in flag["detail"]
    assert "400" in flag["detail"]


async def test_compare_runs_of_two_similar_runs_flags_nothing(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    drift = [
        {
            "kind": "added",
            "field": "extra",
            "new_field": None,
            "confidence": None,
            "detail": "new field extra",
        }
    ]
    for i in range(10):
        await add_run(
            pool,
            status="success",
            started_at=T0 + timedelta(minutes=i),
            seconds=10.0 + i % 3,
            sources={"api": {"fetched": 1000}},
        )
    a = await add_run(
        pool,
        status="success",
        started_at=T0 + timedelta(hours=1),
        seconds=12.0,
        sources={"api": {"fetched": 1000, "rejected": 10, "drift": drift}, "csv": {"fetched": 200}},
    )
    b = await add_run(
        pool,
        status="success",
        started_at=T0 + timedelta(hours=2),
        seconds=13.0,
        sources={"api": {"fetched": 1100, "rejected": 20, "drift": drift}, "csv": {"fetched": 180}},
    )
    body = (await client.get(f"/compare-runs?a={a}&b={b}", headers=AUTH)).json()
    assert body["anomalies"] == []
    assert body["median_duration_seconds"] == 11.0
    assert body["sources"]["api"]["rejection_rate_b"] == round(20 / 1100, 4)


async def test_compare_runs_flags_every_rule_it_knows(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    for i in range(12):
        await add_run(
            pool,
            status="success",
            started_at=T0 + timedelta(minutes=i),
            seconds=10.0,
            sources={"api": {"fetched": 100}},
        )
    renamed = {
        "kind": "renamed",
        "field": "current_price",
        "new_field": "currentPrice",
        "confidence": 0.93,
        "detail": "renamed",
    }
    a = await add_run(
        pool,
        status="success",
        started_at=T0 + timedelta(hours=1),
        seconds=10.0,
        sources={"api": {"fetched": 1000}, "json": {"fetched": 100}, "csv": {"fetched": 100}},
    )
    b = await add_run(
        pool,
        status="partial",
        started_at=T0 + timedelta(hours=2),
        seconds=31.0,
        sources={
            "api": {"fetched": 1000, "status": "failed", "error": "HTTP 401 from upstream"},
            "json": {"fetched": 100, "drift": [renamed]},
            "csv": {"fetched": 100, "rejected": 6},
        },
    )
    body = (await client.get(f"/compare-runs?a={a}&b={b}", headers=AUTH)).json()
    flags = {(x["rule"], x["source"]) for x in body["anomalies"]}
    assert flags == {
        ("source_failed", "api"),
        ("new_drift", "json"),
        ("rejection_rate", "csv"),
        ("slow_run", None),
    }
    slow = next(x for x in body["anomalies"] if x["rule"] == "slow_run")
    assert slow["threshold"] == 3.0
    assert body["median_duration_seconds"] == 10.0
    failed = next(x for x in body["anomalies"] if x["rule"] == "source_failed")
    assert "HTTP 401 from upstream" in failed["detail"]


async def test_compare_runs_unknown_or_malformed_ids(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    known = await add_run(pool, status="success", started_at=T0, seconds=1.0, sources={})
    unknown = uuid.uuid4()
    for query in (f"a={known}&b={unknown}", f"a={unknown}&b={known}"):
        response = await client.get(f"/compare-runs?{query}", headers=AUTH)
        assert response.status_code == 404
        assert response.json()["status_code"] == 404
    for query, parameter in ((f"a={known}", "b"), (f"a=zz&b={known}", "a")):
        response = await client.get(f"/compare-runs?{query}", headers=AUTH)
        assert response.status_code == 400
        assert named(response.json()) == [parameter]
    same = await client.get(f"/compare-runs?a={known}&b={known}", headers=AUTH)
    assert same.status_code == 200
    assert same.json()["anomalies"] == []


# -- the ingestion loop inside the service ----------------------------------------------------


class CrashingRunner:
    """Raises from every run, as a lost database or a bug in the runner would."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def running(self) -> bool:
        return False

    def request_stop(self) -> None:
        pass

    async def run(self, trigger: str, names: Any = None) -> dict[str, Any]:
        self.calls += 1
        raise RuntimeError("database exploded")


class BlockingRunner:
    """A run that lasts until a stop is requested, then closes like the real one."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.triggers: list[str] = []
        self._running = False
        self._stop: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._running

    def request_stop(self) -> None:
        self.stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self, trigger: str, names: Any = None) -> dict[str, Any]:
        self.triggers.append(trigger)
        self._stop = asyncio.Event()
        self._running = True
        try:
            await self._stop.wait()
        finally:
            self._running = False
        return {"status": "failed"}


async def _poll(client: Client, path: str, until: Any, deadline: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        body = (await client.get(path)).json()
        if until(body):
            return body
        assert loop.time() < end, f"{path} never satisfied the condition: {body}"
        await asyncio.sleep(0.02)


async def test_a_crashing_loop_is_visible_and_the_api_stays_up(settings: Settings) -> None:
    runner = CrashingRunner()
    metrics = Metrics()
    crashing = dataclasses.replace(settings, etl_on_startup=True)
    app = create_app(crashing, runner=runner, metrics=metrics)
    async with AsyncTestClient(app=app) as client:
        health = await _poll(client, "/health", lambda b: b["etl_loop"] == "crashed")
        assert health["status"] == "ok"
        assert health["db"] == "ok"
        assert "database exploded" in health["etl_loop_error"]
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/data", headers=AUTH)).status_code == 200
        samples = metric_samples((await client.get("/metrics")).text)
        assert samples[("kasparro_loop_crashes_total", ())] == 1
    assert runner.calls == 1


async def test_the_loop_is_running_during_a_run_and_shutdown_stops_it(
    settings: Settings,
) -> None:
    runner = BlockingRunner()
    looping = dataclasses.replace(settings, etl_on_startup=True, etl_interval_seconds=3600)
    app = create_app(looping, runner=runner)
    loop = asyncio.get_running_loop()
    async with AsyncTestClient(app=app) as client:
        health = await _poll(client, "/health", lambda b: b["etl_loop"] == "running")
        # last_etl comes from the database, where this runner records nothing.
        assert health["last_etl"] == "never"
        assert runner.stop_requested is False
        stop_started = loop.time()
    # Leaving the client ran the lifespan shutdown: the run was asked to stop and
    # closed well within the stop bound instead of being cancelled.
    assert runner.stop_requested is True
    assert runner.running is False
    assert loop.time() - stop_started < 5.0
    assert runner.triggers == ["startup"]


@pytest.mark.parametrize("query", ["source=a%00b", "source=" + "z" * 10_000])
async def test_rejections_refuse_unstorable_source_filters(client: Client, query: str) -> None:
    response = await client.get(f"/rejections?{query}", headers=AUTH)
    assert response.status_code == 400
    assert named(response.json()) == ["source"]


@pytest.mark.parametrize(
    "headers",
    [{"x-big": "a" * 20_000}, {f"x-h{i}": "1" for i in range(150)}],
    ids=["20 kB header", "150 headers"],
)
async def test_oversized_headers_are_431_with_a_request_id(
    client: Client, headers: dict[str, str]
) -> None:
    response = await client.get("/health", headers=headers)
    assert response.status_code == 431
    assert response.json() == {"status_code": 431, "detail": "Request Header Fields Too Large"}
    assert uuid.UUID(response.headers["x-request-id"]).version == 4
    ordinary = await client.get("/health", headers={"x-small": "a" * 2_000})
    assert ordinary.status_code == 200
