"""A fake HTTP upstream: a real aiohttp server on 127.0.0.1 that plays CoinPaprika.

It serves a list of records (paginated when the query has ``page``/``per_page``)
and, before that, a FIFO queue of scripted faults, one per request. Every request
is recorded with a monotonic timestamp so tests can check rate limits and headers.

In a test's own loop::

    async with FakeUpstream(make_tickers(10)) as fake:
        fake.enqueue(Fault.http(503), Fault.http(429, retry_after=2))
        ...  # point the source at fake.url

From another thread (e.g. while the service runs as a subprocess)::

    fake = FakeUpstream(make_tickers(10)).start()
    try:
        ...
    finally:
        fake.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal

import msgspec
from aiohttp import web
from multidict import CIMultiDict

FaultKind = Literal["ok", "status", "stall", "truncated", "html", "cut", "raw"]

_JSON = "application/json"
_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>cloudflare</p></body></html>"
)


@dataclass(frozen=True, slots=True)
class Fault:
    """What the fake does to one request instead of (or before) answering normally.

    Build with the class methods; the fields are the plan they describe.
    """

    kind: FaultKind
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    body: bytes = b""
    content_type: str = _JSON
    retry_after_date_in: float | None = None

    @classmethod
    def ok(cls) -> Fault:
        """Answer normally: a placeholder to aim the next faults at later requests."""
        return cls("ok")

    @classmethod
    def http(
        cls,
        status: int,
        *,
        retry_after: float | str | None = None,
        retry_after_date_in: float | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b'{"error": "scripted"}',
    ) -> Fault:
        """Answer ``status`` with a small JSON body.

        Args:
            status: the HTTP status code.
            retry_after: sent as ``Retry-After`` as is (a number becomes delta seconds).
            retry_after_date_in: send ``Retry-After`` as an HTTP date this many seconds
                after the moment the request is served.
            headers: further response headers.
            body: the response body.
        """
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = (
                f"{retry_after:g}" if isinstance(retry_after, int | float) else retry_after
            )
        return cls(
            "status",
            status=status,
            headers=all_headers,
            body=body,
            retry_after_date_in=retry_after_date_in,
        )

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Wait ``seconds`` (or until the server stops), then answer normally."""
        return cls("stall", seconds=seconds)

    @classmethod
    def truncated_json(cls) -> Fault:
        """Status 200 with the first half of the normal JSON body; the HTTP framing is
        intact (Content-Length matches what is sent), only the JSON is cut."""
        return cls("truncated")

    @classmethod
    def html_200(cls) -> Fault:
        """An HTML error page (a proxy's) served with status 200."""
        return cls("html", body=_HTML_PAGE, content_type="text/html")

    @classmethod
    def cut_mid_stream(cls) -> Fault:
        """Announce the full Content-Length, send half the body, drop the connection."""
        return cls("cut")

    @classmethod
    def raw(cls, body: bytes, *, content_type: str = _JSON, status: int = 200) -> Fault:
        """Answer exactly ``body`` (e.g. valid JSON of the wrong shape)."""
        return cls("raw", status=status, body=body, content_type=content_type)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake saw it.

    Attributes:
        at: ``time.monotonic()`` when the request reached the handler.
        method: the HTTP method.
        path: the URL path.
        query: the query string, one value per key (the last one wins).
        headers: the request headers; lookups ignore case.
        fault: the fault that answered it, or ``None`` for a normal answer.
    """

    at: float
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    fault: Fault | None


class FakeUpstream:
    """The fake server. Thread-safe to script and inspect from any thread.

    Args:
        records: what the endpoint serves (a JSON array, sliced by ``page``/``per_page``).
        path: the endpoint's path; other paths answer 404.
        envelope: serve ``{"data": [...]}`` instead of a bare array.
        require_auth: when set, requests whose ``Authorization`` header differs get 401.
        default_per_page: the page size when ``page`` is given without ``per_page``.
        paginate: ``False`` plays an upstream that ignores ``page``/``per_page``.
    """

    def __init__(
        self,
        records: Iterable[Mapping[str, Any]] = (),
        *,
        path: str = "/v1/tickers",
        envelope: bool = False,
        require_auth: str | None = None,
        default_per_page: int = 100,
        paginate: bool = True,
    ) -> None:
        self.path = path
        self.envelope = envelope
        self.require_auth = require_auth
        self.default_per_page = default_per_page
        self.paginate = paginate
        self._records: list[Mapping[str, Any]] = list(records)
        self._faults: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        # One condition guards records, faults and requests, and wakes waiters in
        # other threads when a request arrives.
        self._cond = threading.Condition()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._released: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (random, chosen at start)."""
        if self._port is None:
            raise RuntimeError("the fake upstream is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint serving the records."""
        return self.base_url + self.path

    # -- scripting and inspection ------------------------------------------------

    @property
    def records(self) -> list[Mapping[str, Any]]:
        """A copy of the served records."""
        with self._cond:
            return list(self._records)

    @records.setter
    def records(self, records: Iterable[Mapping[str, Any]]) -> None:
        with self._cond:
            self._records = list(records)

    def enqueue(self, *faults: Fault) -> None:
        """Answer the next requests with these faults, in order, then normally."""
        with self._cond:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        """Faults not used yet."""
        with self._cond:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._cond:
            return list(self._requests)

    def clear(self) -> None:
        """Forget recorded requests and pending faults."""
        with self._cond:
            self._requests.clear()
            self._faults.clear()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived (thread mode only: in the
        server's own loop this would block the server).

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} of {count} requests after {timeout}s")
            return list(self._requests)

    # -- lifecycle in the caller's loop --------------------------------------------

    async def astart(self) -> FakeUpstream:
        """Start listening on 127.0.0.1, on a random port, in the running loop."""
        if self._runner is not None:
            raise RuntimeError("the fake upstream is already started")
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout: stalls end when released, nothing else lingers.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self

    async def astop(self) -> None:
        """Release stalled requests, close connections and stop listening."""
        if self._released is not None:
            self._released.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # -- lifecycle in a background thread --------------------------------------------

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        """Run the server in a thread with its own event loop; returns once it listens."""
        if self._thread is not None:
            raise RuntimeError("the fake upstream is already started")
        ready = threading.Event()
        failures: list[BaseException] = []
        thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_in_thread(ready, failures)),
            name="fake-upstream",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the fake upstream did not start")
        if failures:
            thread.join(timeout)
            self._thread = None
            raise failures[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread started by :meth:`start` (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop_requested = self._loop, self._stop_requested
        if loop is not None and stop_requested is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("the fake upstream thread did not stop")

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve_in_thread(self, ready: threading.Event, failures: list[BaseException]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            await self.astart()
        except BaseException as exc:  # handed to the starting thread
            failures.append(exc)
            ready.set()
            return
        ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            await self.astop()

    # -- serving -------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._cond:
            fault = self._faults.popleft() if self._faults else None
            self._requests.append(
                RecordedRequest(
                    at=time.monotonic(),
                    method=request.method,
                    path=request.path,
                    query={key: request.query.getone(key) for key in request.query},
                    headers=CIMultiDict(request.headers),
                    fault=fault,
                )
            )
            self._cond.notify_all()
            records = self._records

        if fault is not None:
            if fault.kind == "status":
                headers = dict(fault.headers)
                if fault.retry_after_date_in is not None:
                    when = datetime.now(UTC) + timedelta(seconds=fault.retry_after_date_in)
                    headers["Retry-After"] = email.utils.format_datetime(when, usegmt=True)
                return web.Response(
                    status=fault.status, body=fault.body, headers=headers, content_type=_JSON
                )
            if fault.kind in ("html", "raw"):
                return web.Response(
                    status=fault.status, body=fault.body, content_type=fault.content_type
                )
            if fault.kind == "stall":
                await self._stall(fault.seconds)
                if request.transport is None or request.transport.is_closing():
                    # The client gave up (its timeout); nobody reads an answer.
                    return web.Response(status=499)

        if self.require_auth is not None and request.headers.get("Authorization") != (
            self.require_auth
        ):
            return web.json_response({"error": "invalid api key"}, status=401)
        if request.path != self.path:
            return web.json_response({"error": "not found"}, status=404)
        try:
            page = (
                _paginate(records, request.query, self.default_per_page)
                if self.paginate
                else records
            )
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        body = msgspec.json.encode({"data": page} if self.envelope else page)

        if fault is not None and fault.kind == "truncated":
            return web.Response(body=body[: len(body) // 2], content_type=_JSON)
        if fault is not None and fault.kind == "cut":
            return await self._cut(request, body)
        return web.Response(body=body, content_type=_JSON)

    async def _stall(self, seconds: float) -> None:
        assert self._released is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), seconds)

    async def _cut(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            # Closing mid-body makes the client see fewer bytes than announced.
            request.transport.close()
        return response


def _paginate(
    records: Sequence[Mapping[str, Any]], query: Mapping[str, str], default_per_page: int
) -> Sequence[Mapping[str, Any]]:
    """The slice named by ``page`` (1-based) and ``per_page``; everything without them."""
    if "page" not in query and "per_page" not in query:
        return records
    try:
        page = int(query.get("page", "1"))
        per_page = int(query.get("per_page", str(default_per_page)))
    except ValueError:
        raise ValueError("page and per_page must be integers") from None
    if page < 1 or per_page < 1:
        raise ValueError("page and per_page must be >= 1")
    return records[(page - 1) * per_page : page * per_page]


def make_tickers(
    n: int,
    start: datetime = datetime(2025, 6, 25, 10, 0, 0, tzinfo=UTC),
    *,
    step: timedelta = timedelta(seconds=1),
) -> list[dict[str, Any]]:
    """``n`` CoinPaprika ``/v1/tickers`` items, ticker ``i`` updated at ``start + i*step``.

    Names (``Coin 0`` ...), ids and prices are deterministic, so tests can predict
    every field.
    """
    tickers: list[dict[str, Any]] = []
    for i in range(n):
        price = round(50_000.0 / (i + 1), 6)
        supply = 1_000_000 * (i + 1)
        updated = (start + i * step).astimezone(UTC)
        tickers.append(
            {
                "id": f"c{i}-coin-{i}",
                "name": f"Coin {i}",
                "symbol": f"C{i}",
                "rank": i + 1,
                "circulating_supply": supply,
                "total_supply": supply,
                "max_supply": 0,
                "beta_value": 1.0,
                "first_data_at": "2013-04-28T00:00:00Z",
                "last_updated": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "quotes": {
                    "USD": {
                        "price": price,
                        "volume_24h": round(price * 1_000, 2),
                        "market_cap": round(price * supply, 2),
                        "percent_change_24h": round((i % 7) - 3.0, 2),
                    }
                },
            }
        )
    return tickers
