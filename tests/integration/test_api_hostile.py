"""Hostile and careless clients against the real app and a real PostgreSQL:
values the database cannot store, keys with stray whitespace, what the public
endpoints reveal, and the OpenAPI document against the validation it describes.
"""

from __future__ import annotations

import base64
import decimal
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from app.api.errors import exception_handlers
from app.api.pagination import MAX_CURSOR_LENGTH, MAX_ID, encode_cursor
from app.api.server import create_app
from tests.helpers import csv_entry, csv_rows, make_settings, run_etl, write_csv, write_sources

KEY = "hostile-key-0123456789"
AUTH = {"x-api-key": KEY}

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def client(database_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    write_csv(tmp_path / "a.csv", csv_rows(3))
    sources = write_sources(tmp_path, csv_entry(tmp_path / "a.csv"))
    settings = make_settings(
        sources,
        DATABASE_URL=database_url,
        API_KEY=KEY,
        ETL_ON_STARTUP="false",
        ETL_INTERVAL_SECONDS=0,
    )
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


def _raw_cursor(document: bytes) -> str:
    return base64.urlsafe_b64encode(document).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize(
    "cursor",
    [
        encode_cursor("a\x00b"),
        _raw_cursor(b'{"v":1,"after":"a\\u0000b"}'),
        _raw_cursor(b'{"v":1,"after":"a\\ud800b"}'),
    ],
    ids=["NUL", "escaped NUL", "lone surrogate"],
)
async def test_a_cursor_decoding_to_unstorable_text_is_400(client: Client, cursor: str) -> None:
    response = await client.get("/data", params={"cursor": cursor}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["extra"][0]["key"] == "cursor"


async def test_database_data_errors_are_400_through_the_one_error_mapping(
    database_url: str,
) -> None:
    # The error mapping of the app, with handlers that hand the database values it refuses.
    async def query(sql: str, value: Any) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.fetchval(sql, value)
        finally:
            await conn.close()

    @get("/nul")
    async def nul() -> None:
        await query("SELECT $1::text", "a\x00b")  # refused by the server, SQLSTATE 22021

    @get("/not-a-number")
    async def not_a_number() -> None:
        await query("SELECT $1::text::int", "12x")  # the server's 22P02

    @get("/out-of-range")
    async def out_of_range() -> None:
        await query("SELECT $1::int4", 2**40)  # refused by asyncpg while encoding

    app = Litestar([nul, not_a_number, out_of_range], exception_handlers=exception_handlers())
    async with AsyncTestClient(app=app) as c:
        for path in ("/nul", "/not-a-number", "/out-of-range"):
            response = await c.get(path)
            assert response.status_code == 400, (path, response.text)
            assert response.json() == {"status_code": 400, "detail": "Invalid parameter value"}


@pytest.mark.parametrize("sent", [KEY, f" {KEY}", f"{KEY} ", f"\t{KEY} \t", f"  {KEY}  "], ids=repr)
async def test_the_key_is_compared_after_trimming_both_ends(client: Client, sent: str) -> None:
    response = await client.get("/data", headers={"x-api-key": sent})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "sent",
    [KEY[:-1], KEY + "x", f"{KEY[:5]} {KEY[5:]}", KEY.upper(), f"{KEY},{KEY}", ""],
    ids=repr,
)
async def test_anything_but_the_key_itself_is_401(client: Client, sent: str) -> None:
    response = await client.get("/data", headers={"x-api-key": sent})
    assert response.status_code == 401


async def test_stats_shows_no_server_path_and_no_checkpoint_internals(
    database_url: str, pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    folder = tmp_path / "srv" / "kasparro-data"
    folder.mkdir(parents=True)
    write_csv(folder / "coins.csv", csv_rows(20))
    sources = write_sources(folder, csv_entry(folder / "coins.csv"))
    settings = make_settings(
        sources, DATABASE_URL=database_url, API_KEY=KEY, ETL_ON_STARTUP="false"
    )
    first = await run_etl(pool, settings)
    assert first["status"] == "success"
    (folder / "coins.csv").unlink()
    second = await run_etl(pool, settings)
    assert second["status"] == "failed"

    async with AsyncTestClient(app=create_app(settings)) as c:
        response = await c.get("/stats")
    assert response.status_code == 200
    assert str(tmp_path) not in response.text
    assert "/srv/" not in response.text
    csv = response.json()["sources"]["csv"]
    assert csv["last_error"] == "csv: file not found: coins.csv"
    assert set(csv["checkpoint"]) <= {"offset", "high_water"}
    assert csv["checkpoint"]["offset"] > 0
    stored = await pool.fetchval("SELECT cursor::text FROM etl_checkpoint WHERE source = 'csv'")
    assert "head" in json.loads(stored)  # the reader keeps it; /stats does not show it


async def test_the_openapi_bounds_are_exactly_those_the_server_enforces(client: Client) -> None:
    text = (await client.get("/schema/openapi.json")).text
    # Read as decimals: a bound printed as 4.611686018427388e18 is not the bound.
    doc = json.loads(text, parse_float=decimal.Decimal)
    parameters = {p["name"]: p["schema"] for p in doc["paths"]["/rejections"]["get"]["parameters"]}
    assert decimal.Decimal(parameters["after"]["maximum"]) == MAX_ID
    for after, status in ((MAX_ID, 200), (MAX_ID + 1, 400)):
        response = await client.get("/rejections", params={"after": after}, headers=AUTH)
        assert response.status_code == status, (after, response.text)

    cursor = {p["name"]: p for p in doc["paths"]["/data"]["get"]["parameters"]}["cursor"]
    assert cursor["schema"]["minLength"] == 1
    assert cursor["schema"]["maxLength"] == MAX_CURSOR_LENGTH
    assert cursor["schema"]["pattern"] == "^[A-Za-z0-9_-]+$"
    for refused in ("", "a" * (MAX_CURSOR_LENGTH + 1), "abc=", "a b"):
        response = await client.get("/data", params={"cursor": refused}, headers=AUTH)
        assert response.status_code == 400, (refused[:10], response.text)
    valid = encode_cursor("m")
    assert (await client.get("/data", params={"cursor": valid}, headers=AUTH)).status_code == 200
