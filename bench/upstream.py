"""A paged CoinPaprika-like upstream on 127.0.0.1 for the HTTP ingestion scenario.

Pages are encoded once, before the clock starts, so the upstream costs next to
nothing while it is measured: ``GET /v1/tickers?page=N&per_page=M`` answers a
slice of the records, ``[]`` past the end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web


class PagedUpstream:
    """Serves ``records`` in pages from a background thread with its own loop."""

    def __init__(self, records: Sequence[Any], page_size: int) -> None:
        self._records = records
        self._page_size = page_size
        self._pages: dict[tuple[int, int], bytes] = {}
        for page in range(1, len(records) // page_size + 2):
            self._page(page, page_size)
        self.requests = 0
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/tickers"

    def _page(self, page: int, per_page: int) -> bytes:
        key = (page, per_page)
        body = self._pages.get(key)
        if body is None:
            start = (page - 1) * per_page
            body = msgspec.json.encode(list(self._records[start : start + per_page]))
            self._pages[key] = body
        return body

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.path != "/v1/tickers":
            return web.json_response({"error": "not found"}, status=404)
        try:
            page = int(request.query.get("page", "0"))
            per_page = int(request.query.get("per_page", str(self._page_size)))
        except ValueError:
            return web.json_response({"error": "page and per_page must be integers"}, status=400)
        if page < 1:
            return web.Response(
                body=msgspec.json.encode(list(self._records)), content_type="application/json"
            )
        return web.Response(
            body=self._page(page, max(1, per_page)), content_type="application/json"
        )

    def start(self) -> PagedUpstream:
        ready = threading.Event()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = int(runner.addresses[0][1])
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the bench upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
