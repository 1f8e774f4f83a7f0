"""``/health`` while the database goes away and comes back (issue 3, acceptance 3).

A TCP proxy the test controls sits between the app and PostgreSQL. It runs in a
thread of its own: the test client blocks the test's event loop during each
request, and the app's loop must still reach the database through the proxy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.server import create_app
from pipelines.settings import Settings

KEY = "health-key-123"


class PostgresProxy:
    """Forwards TCP connections on 127.0.0.1 to PostgreSQL, until told otherwise.

    Modes: ``forward``; ``refuse`` (new connections are closed at once); ``hang``
    (new connections are accepted and never answered). Cutting closes every
    connection in flight, as a lost server or network would.
    """

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        port = parts.port or int(query.get("port", 5432))
        host = query.pop("host", None) or parts.hostname or "127.0.0.1"
        # A host starting with '/' is the socket directory of a local server.
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._tcp = (host, port)
        self._parts = parts._replace(query=urlencode(query))
        self.mode = "forward"
        self._links: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        user = self._parts.username or ""
        password = self._parts.password or ""
        netloc = f"{user}:{password}@127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self, mode: str) -> None:
        async def apply() -> None:
            self.mode = mode
            for writer in list(self._links):
                writer.transport.abort()
            self._links.clear()

        self._call(apply())

    def restore(self) -> None:
        self.cut("forward")

    def close(self) -> None:
        async def shutdown() -> None:
            for writer in list(self._links):
                writer.transport.abort()
            if self._server is not None:
                self._server.close()

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        self._links.add(writer)
        if self.mode == "hang":
            return
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        except OSError:
            writer.transport.abort()
            self._links.discard(writer)
            return
        self._links.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._links.discard(writer)
        self._links.discard(up_writer)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
def proxy(database_url: str) -> Iterator[PostgresProxy]:
    p = PostgresProxy(database_url)
    p.start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def client(proxy: PostgresProxy) -> AsyncIterator[AsyncTestClient[Litestar]]:
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
    client: AsyncTestClient[Litestar], proxy: PostgresProxy, outage: str
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
    client: AsyncTestClient[Litestar], proxy: PostgresProxy
) -> None:
    for _ in range(3):
        proxy.cut("refuse")
        assert (await client.get("/health")).status_code == 503
        proxy.restore()
        await _health_until(client, 200, deadline=10.0)
