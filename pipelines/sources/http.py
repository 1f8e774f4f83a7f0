"""The ``http`` source: JSON records from a REST endpoint.

One GET, or ``?page=N&per_page=M`` until a short page. Requests go through a
token bucket; 408, 429, 5xx, connection errors, timeouts and bodies cut short
are retried with exponential backoff and full jitter (``Retry-After`` wins);
401/403 and other 4xx fail at once.

Every run reads the whole collection and hands every record on: raw rows are
unique per content hash, so a record seen before is counted as a duplicate and
stored once. Nothing is skipped for its timestamp: an upstream stamps each
record on its own, so a coin's new observation (or a coin new to the list) can
be older than the newest timestamp of the previous fetch.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final

import aiohttp
import msgspec
import structlog
from aiolimiter import AsyncLimiter
from yarl import URL

from config.errors import SourceError
from config.sources import SourceConfig
from pipelines.records import Chunk, make_record
from pipelines.sources.files import loads_lenient
from pipelines.sources.stored import StoredLookup, mark_stored

log = structlog.get_logger(__name__)

#: First backoff ceiling; attempt ``n`` (0-based) sleeps ``uniform(0, base * 2**n)``.
#: Read at call time so tests can make it small.
BACKOFF_BASE_SECONDS: float = 0.5
#: Largest computed backoff.
BACKOFF_CAP_SECONDS: float = 30.0
#: Largest wait a ``Retry-After`` header can impose; a bogus header must not stall a run.
RETRY_AFTER_CAP_SECONDS: float = 300.0
#: Guard against an upstream whose pages never end (e.g. one that ignores ``page``).
MAX_PAGES: int = 10_000

USER_AGENT: Final = "kasparro/0.1"
# Besides these, every 5xx is transient.
_TRANSIENT_STATUSES: Final = frozenset({408, 429})
_REFUSED_STATUSES: Final = frozenset({401, 403})
_MESSAGE_LIMIT: Final = 300


class _Envelope(msgspec.Struct):
    """``{"data": [...]}``: the other body shape accepted besides a bare array."""

    data: list[dict[str, Any]]


# Built once, not per page. An array and an object-like Struct may
# share a msgspec union, so one decode both parses and checks the shape.
_page_decoder: msgspec.json.Decoder[list[dict[str, Any]] | _Envelope] = msgspec.json.Decoder(
    list[dict[str, Any]] | _Envelope
)


async def read_http(
    source: SourceConfig,
    cursor: Mapping[str, Any] | None,
    batch_size: int,
    *,
    session: aiohttp.ClientSession | None = None,
    stored: StoredLookup | None = None,
) -> AsyncGenerator[Chunk, None]:
    """Read ``source.location`` and yield its records in chunks.

    Args:
        source: the declared source (``kind = "http"``).
        cursor: the committed checkpoint; unused, because every run reads the
            whole collection (a checkpoint of an older version, such as
            ``{"high_water": ...}``, is ignored and replaced by ``{}``).
        batch_size: most records per chunk (a page larger than this is split).
        session: an open session to use; when ``None`` one is created and closed here.
        stored: tells which records raw already holds; each chunk carries those
            in its ``stored``, so they are not prepared again.

    Yields:
        Every record received, one chunk per page (split by ``batch_size``),
        then a final empty chunk whose ``meta`` holds counters.

    Raises:
        SourceError: the upstream refused the request, answered a permanent error,
            kept failing after ``max_retries`` retries, or sent a body that is not
            a JSON array of objects (nor ``{"data": [...]}``). One line, no secrets.
        ValueError: ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    own_session = session is None
    client = session if session is not None else aiohttp.ClientSession()
    try:
        fetcher = _Fetcher(source, client)
        paginated = source.page_size > 0
        base_url = URL(source.location)
        received = pages = 0
        previous_body: bytes | None = None
        page = 1
        while True:
            url = (
                base_url.update_query(page=page, per_page=source.page_size)
                if paginated
                else base_url
            )
            where = f"{_display(url)} (page {page})" if paginated else _display(url)
            body, content_type = await fetcher.fetch(url, where)
            if paginated and body == previous_body:
                # The upstream ignores ``page`` but honours ``per_page``: without this
                # the loop would ask for the same page forever.
                log.warning("http_pagination_ignored", source=source.name, page=page)
                break
            objects = _decode(source, body, content_type, where)
            pages += 1
            received += len(objects)
            for start in range(0, len(objects), batch_size):
                chunk = Chunk(
                    [make_record(obj) for obj in objects[start : start + batch_size]],
                    cursor={},
                    meta={"page": page},
                )
                yield await mark_stored(chunk, stored)

            if not paginated or len(objects) < source.page_size:
                break
            if len(objects) > source.page_size:
                # More than asked for: the upstream does not paginate, so this page was
                # the whole collection.
                log.warning(
                    "http_pagination_ignored",
                    source=source.name,
                    page=page,
                    per_page=source.page_size,
                    received=len(objects),
                )
                break
            if page >= MAX_PAGES:
                raise SourceError(
                    f"{source.name}: more than {MAX_PAGES} pages from {_display(base_url)}"
                )
            previous_body = body
            page += 1

        yield Chunk(
            [],
            cursor={},
            final=True,
            meta={
                "requests": fetcher.requests,
                "retries": fetcher.retries,
                "pages": pages,
                "received": received,
            },
        )
    finally:
        if own_session:
            await client.close()


class _Fetcher:
    """GETs with rate limit, retries and the source's headers; counts what it did."""

    __slots__ = (
        "_attempts",
        "_headers",
        "_limiter",
        "_session",
        "_source",
        "_timeout",
        "requests",
        "retries",
    )

    def __init__(self, source: SourceConfig, session: aiohttp.ClientSession) -> None:
        self._source = source
        self._session = session
        self._attempts = source.max_retries + 1
        self._timeout = aiohttp.ClientTimeout(total=source.timeout_seconds)
        # Capacity 1 spaces requests evenly (1/rate apart), so no 1-second window
        # ever holds more than rate + 1 of them; a larger bucket would allow bursts.
        # Created here because aiolimiter binds to the loop that first uses it.
        self._limiter = (
            AsyncLimiter(1, 1.0 / source.rate_limit_per_second)
            if source.rate_limit_per_second > 0
            else None
        )
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        headers.update(source.headers)
        if source.auth_key:
            # CoinPaprika's paid API takes the raw key, without a "Bearer" prefix.
            headers["Authorization"] = source.auth_key
        self._headers = headers
        self.requests = 0
        self.retries = 0

    async def fetch(self, url: URL, where: str) -> tuple[bytes, str]:
        """The body and content type of a 2xx answer to ``GET url``.

        Args:
            url: what to get.
            where: ``url`` as shown in messages (no query string, no credentials).

        Raises:
            SourceError: a permanent error, or transient errors beyond the retry budget.
        """
        name = self._source.name
        for attempt in range(self._attempts):
            # Retries count against the rate limit too: the upstream sees every attempt.
            if self._limiter is not None:
                await self._limiter.acquire()
            self.requests += 1
            status: int | None = None
            retry_after: float | None = None
            problem = ""
            try:
                async with self._session.get(
                    url, headers=self._headers, timeout=self._timeout
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        return await response.read(), response.content_type
                    reason = _status_text(status, response.reason)
                    if status in _REFUSED_STATUSES:
                        raise SourceError(
                            f"{name}: upstream refused the request: {reason} ({self._hint()})"
                        )
                    if status not in _TRANSIENT_STATUSES and status < 500:
                        raise SourceError(f"{name}: {reason} from {where}")
                    problem = reason
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                # Before ClientConnectionError: aiohttp's timeouts subclass both.
                problem = f"timed out after {self._source.timeout_seconds:g} s"
            except aiohttp.ClientPayloadError as exc:
                problem = f"response body cut short ({_one_line(exc)})"
            except aiohttp.ClientConnectionError as exc:
                problem = f"{type(exc).__name__}: {_one_line(exc)}".rstrip(": ")
            except aiohttp.ClientError as exc:
                # Invalid URL, too many redirects, a response that is not HTTP: retrying
                # would meet the same answer.
                raise SourceError(f"{name}: request to {where} failed: {_one_line(exc)}") from None

            if attempt + 1 >= self._attempts:
                noun = "attempt" if self._attempts == 1 else "attempts"
                raise SourceError(f"{name}: gave up after {self._attempts} {noun}: {problem}")
            if retry_after is not None:
                delay = retry_after
            else:
                # Full jitter (AWS architecture blog): spreads retries of many clients.
                ceiling = BACKOFF_BASE_SECONDS * 2 ** min(attempt, 32)
                delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, ceiling))
            self.retries += 1
            log.warning(
                "http_retry",
                source=name,
                url=where,
                status=status,
                error=None if status is not None else problem,
                attempt=attempt + 1,
                max_attempts=self._attempts,
                delay=round(delay, 3),
                retry_after=retry_after is not None,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _hint(self) -> str:
        if self._source.auth_key is not None or self._source.name == "api":
            return "check API_SOURCE_KEY"
        return "check the source's headers in SOURCES_FILE"


def _decode(
    source: SourceConfig, body: bytes, content_type: str, where: str
) -> list[dict[str, Any]]:
    """The records of one page, or SourceError when the body has another shape."""
    try:
        decoded = _page_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # ValidationError is a DecodeError too: a wrong shape. A body that strict
        # JSON refuses may still be real records (NaN, 1e999, Latin-1 bytes): a
        # bad value must reject one record, not the page.
        lenient = _lenient_page(body)
        if lenient is not None:
            return lenient
        reason = _one_line(exc)
        if content_type and "json" not in content_type:
            # An HTML error page served with 200 is the usual culprit; say so.
            reason = f"{reason} (content-type {content_type})"
        raise SourceError(f"{source.name}: malformed JSON from {where}: {reason}") from None
    return decoded.data if isinstance(decoded, _Envelope) else decoded


def _lenient_page(body: bytes) -> list[dict[str, Any]] | None:
    try:
        document = loads_lenient(body)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if isinstance(document, list) and all(isinstance(item, dict) for item in document):
        return document
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" zones parse naive; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    else:
        if not seconds >= 0:  # negative or NaN: not a valid delay
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


def _status_text(status: int, reason: str | None) -> str:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return f"HTTP {status} {reason}".rstrip()


def _display(url: URL) -> str:
    """``url`` for messages and logs: without query string or credentials, which may
    carry secrets (``?api_key=...``)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3] + "..."
    return text
