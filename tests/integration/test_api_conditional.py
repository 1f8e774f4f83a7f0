"""``ETag``/``If-None-Match`` on ``/data``, and ``HEAD`` on every ``GET`` endpoint."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from config.settings import Settings
from tests.helpers import csv_entry, csv_rows, write_csv, write_sources
from tests.integration.test_serve import Served, served_on_new_database

KEY = "conditional-key-0123"
AUTH = {"x-api-key": KEY}

Client = AsyncTestClient[Litestar]


async def _seed(pool: asyncpg.Pool[Any], names: list[str], value: float = 1.0) -> None:
    await pool.execute(
        "INSERT INTO unified_data (name, value, source, observed_at, ingested_at, priority,"
        " raw_id, run_id) SELECT n, $2, 'csv', now(), now(), 0, 1, gen_random_uuid()"
        " FROM unnest($1::text[]) AS n",
        names,
        value,
    )


@pytest.fixture(params=[16 * 1024 * 1024, 0], ids=["page-cache", "no-page-cache"])
async def client(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Client]:
    settings = Settings(
        database_url=database_url,
        api_keys=(KEY,),
        etl_on_startup=False,
        etl_interval_seconds=0,
        data_cache_bytes=request.param,
    )
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


async def test_an_unchanged_page_is_304_and_a_change_gives_200_with_a_new_etag(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    await _seed(pool, ["a", "b", "c"])
    first = await client.get("/data", params={"limit": 2}, headers=AUTH)
    assert first.status_code == 200
    tag = first.headers["etag"]
    assert tag.startswith('W/"')

    again = await client.get("/data", params={"limit": 2}, headers={**AUTH, "if-none-match": tag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == tag
    # A list of tags, the strong form of the same tag and "*" match too.
    for header in (f'"other", {tag}', tag.removeprefix("W/"), "*"):
        listed = await client.get(
            "/data", params={"limit": 2}, headers={**AUTH, "if-none-match": header}
        )
        assert listed.status_code == 304, header
    # Another query is another page, with a tag of its own.
    other = await client.get("/data", params={"limit": 3}, headers={**AUTH, "if-none-match": tag})
    assert other.status_code == 200
    assert other.headers["etag"] != tag

    await pool.execute("UPDATE unified_data SET value = 9.5 WHERE name = 'a'")
    changed = await client.get("/data", params={"limit": 2}, headers={**AUTH, "if-none-match": tag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != tag
    assert changed.json()["data"][0]["value"] == 9.5
    settled = await client.get(
        "/data", params={"limit": 2}, headers={**AUTH, "if-none-match": changed.headers["etag"]}
    )
    assert settled.status_code == 304


async def test_a_conditional_request_still_needs_the_key(client: Client) -> None:
    response = await client.get("/data", headers={"if-none-match": "*"})
    assert response.status_code == 401


# -- HEAD ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("head")
    write_csv(folder / "a.csv", csv_rows(20))
    sources = write_sources(folder, csv_entry(folder / "a.csv"))
    with served_on_new_database(server_url, sources, key=KEY, prefix="kasparro_head") as served:
        yield served


def _get_paths(run_id: str) -> list[str]:
    """Every GET route of the app, with its parameters filled in."""
    settings = dataclasses.replace(Settings(), api_keys=(KEY,))
    app = create_app(settings)
    paths = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or "GET" not in route.methods:
            continue
        path = route.path.replace("{run_id:uuid}", run_id).replace("{path:str}", "openapi.json")
        path = path.replace("{name:str}", "coin%200")
        if path == "/compare-runs":
            path += f"?a={run_id}&b={run_id}"
        paths.append(path)
    return paths


def _raw_head(url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """A HEAD request on a socket of its own; everything the server sent, to its close."""
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port or 80), timeout=5) as sock:
        sock.sendall(
            f"HEAD {path} HTTP/1.1\r\nhost: test\r\nx-api-key: {KEY}\r\n"
            "connection: close\r\n\r\n".encode()
        )
        received = b""
        started = time.monotonic()
        while chunk := sock.recv(65536):
            received += chunk
            assert time.monotonic() - started < 5, f"HEAD {path} did not end"
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def test_every_get_endpoint_answers_head_with_the_get_headers_and_no_body(live: Served) -> None:
    run_id = httpx.get(live.url + "/runs?limit=1", headers=AUTH).json()["data"][0]["id"]
    uuid.UUID(run_id)
    paths = _get_paths(run_id)
    assert {"/data", "/metrics", "/changes", "/schema/openapi.json"} <= set(paths)
    assert "/events" in paths
    for path in paths:
        status, headers, body = _raw_head(live.url, path)
        # The headers of the GET only: a stream's body never ends.
        with httpx.stream("GET", live.url + path, headers=AUTH, timeout=5) as get:
            assert status == get.status_code, path
            assert status == 200, path
            assert body == b"", path
            assert headers["content-type"] == get.headers["content-type"], path
            assert headers["x-request-id"], path
            if "content-length" in get.headers:
                assert int(headers["content-length"]) > 0, path
    # Where the body does not vary from one request to the next, the length is the GET's.
    for path in (f"/runs/{run_id}", "/changes?limit=5", "/schema/openapi.json"):
        _, headers, _ = _raw_head(live.url, path)
        get = httpx.get(live.url + path, headers=AUTH, timeout=5)
        assert int(headers["content-length"]) == len(get.content), path
    _, data_head, _ = _raw_head(live.url, "/data?limit=3")
    data_get = httpx.get(live.url + "/data?limit=3", headers=AUTH, timeout=5)
    assert data_head["etag"] == data_get.headers["etag"]


def test_head_is_refused_where_get_is(live: Served) -> None:
    status, _, body = _raw_head(live.url, "/nope")
    assert (status, body) == (404, b"")
    metrics = httpx.get(live.url + "/metrics").text
    assert 'method="HEAD"' in metrics
