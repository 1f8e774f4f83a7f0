"""``/health`` while the database goes away and comes back.

A TCP proxy the test controls sits between the app and PostgreSQL. It runs in a
thread of its own: the test client blocks the test's event loop during each
request, and the app's loop must still reach the database through the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from config.settings import Settings
from tests.pg_proxy import PgProxy

KEY = "health-key-123"


@pytest.fixture
def proxy(database_url: str) -> Iterator[PgProxy]:
    p = PgProxy(database_url).start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def client(proxy: PgProxy) -> AsyncIterator[AsyncTestClient[Litestar]]:
    settings = Settings(
        database_url=proxy.url, api_keys=(KEY,), etl_on_startup=False, etl_interval_seconds=0
    )
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


async def _health_until(client: AsyncTestClient[Litestar], status: int, deadline: float) -> Any:
    end = time.monotonic() + deadline
    while True:
        response = await client.get("/health")
        if response.status_code == status:
            return response
        assert time.monotonic() < end, f"/health stayed {response.status_code}: {response.text}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("outage", ["refuse", "hang"])
async def test_health_reports_the_database_down_and_recovers_without_restart(
    client: AsyncTestClient[Litestar], proxy: PgProxy, outage: str
) -> None:
    up = await client.get("/health")
    assert up.status_code == 200
    assert up.json()["db"] == "ok"
    assert (await client.get("/data", headers={"x-api-key": KEY})).status_code == 200

    proxy.cut(outage)
    started = time.monotonic()
    down = await client.get("/health")
    elapsed = time.monotonic() - started
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "degraded"
    assert body["db"] == "down"
    assert body["last_etl"] in ("unknown", "never")
    assert elapsed < 2.5, f"the database check took {elapsed:.2f} s"
    assert down.headers["x-request-id"]

    root = await client.get("/")
    assert root.status_code == 200
    assert root.json()["status"] == "running"
    if outage == "refuse":
        # Reads fail fast and say so in JSON, without internals.
        data = await client.get("/data", headers={"x-api-key": KEY})
        assert data.status_code == 503
        assert data.json() == {"status_code": 503, "detail": "Database unavailable"}
    # Still down while the outage lasts: no stale success.
    assert (await client.get("/health")).status_code == 503

    proxy.restore()
    back = await _health_until(client, 200, deadline=10.0)
    assert back.json()["status"] == "ok"
    assert back.json()["db"] == "ok"
    assert back.json()["last_etl"] == "never"
    assert (await client.get("/data", headers={"x-api-key": KEY})).status_code == 200
    stats = await client.get("/stats")
    assert stats.status_code == 200


async def test_health_recovers_after_repeated_outages(
    client: AsyncTestClient[Litestar], proxy: PgProxy
) -> None:
    for _ in range(3):
        proxy.cut("refuse")
        assert (await client.get("/health")).status_code == 503
        proxy.restore()
        await _health_until(client, 200, deadline=10.0)
