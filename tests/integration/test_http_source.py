"""The HTTP source against a real local upstream (tests/fakes/upstream.py).

No database: these tests drive ``read_http`` directly and check what the fake saw.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import msgspec
import pytest
from structlog.testing import capture_logs

from config.errors import SourceError
from config.sources import FieldMapping, SourceConfig
from pipelines.records import Chunk
from pipelines.sources import http
from pipelines.sources.http import read_http
from tests.fakes.upstream import FakeUpstream, Fault, RecordedRequest, make_tickers

MAPPING = FieldMapping(name="name", value="quotes.USD.price", observed_at="last_updated", id="id")
TICKERS = make_tickers(10)  # last_updated 2025-06-25T10:00:00Z .. 10:00:09Z


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Computed backoff in milliseconds; Retry-After still means what it says."""
    monkeypatch.setattr(http, "BACKOFF_BASE_SECONDS", 0.01)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(TICKERS) as upstream:
        yield upstream


def make_source(location: str, **options: Any) -> SourceConfig:
    settings: dict[str, Any] = {
        "rate_limit_per_second": 0.0,
        "max_retries": 3,
        "timeout_seconds": 5.0,
    }
    settings.update(options)
    return SourceConfig(name="api", kind="http", location=location, mapping=MAPPING, **settings)


async def read_all(
    source: SourceConfig,
    cursor: Mapping[str, Any] | None = None,
    batch_size: int = 1000,
    session: aiohttp.ClientSession | None = None,
) -> list[Chunk]:
    async with aclosing(read_http(source, cursor, batch_size, session=session)) as chunks:
        return [chunk async for chunk in chunks]


def payloads(chunks: list[Chunk]) -> list[Any]:
    return [record.payload for chunk in chunks for record in chunk.records]


def gaps(requests: list[RecordedRequest]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- 1. transient statuses ----------------------------------------------------------


async def test_503_twice_then_200_succeeds_after_exactly_three_requests(
    fake: FakeUpstream,
) -> None:
    fake.enqueue(Fault.http(503), Fault.http(503))

    chunks = await read_all(make_source(fake.url))

    assert len(fake.requests) == 3
    assert payloads(chunks) == TICKERS
    final = chunks[-1]
    assert final.final
    assert final.records == []
    assert final.meta["requests"] == 3
    assert final.meta["retries"] == 2
    assert all(not chunk.final for chunk in chunks[:-1])


async def test_408_and_500_are_retried_too(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.http(408), Fault.http(500), Fault.http(429))

    chunks = await read_all(make_source(fake.url))

    assert len(fake.requests) == 4
    assert payloads(chunks) == TICKERS


# -- 2. Retry-After -------------------------------------------------------------------


async def test_retry_after_seconds_delays_the_next_request(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.http(429, retry_after=2))

    chunks = await read_all(make_source(fake.url))

    requests = fake.requests
    assert len(requests) == 2
    # The computed backoff is ~10 ms here; only the header can explain 2 s.
    assert 2.0 <= gaps(requests)[0] < 4.0
    assert payloads(chunks) == TICKERS


async def test_retry_after_http_date_delays_the_next_request(fake: FakeUpstream) -> None:
    # An HTTP date has whole seconds: "now + 3 s" truncated is more than 2 s away.
    fake.enqueue(Fault.http(429, retry_after_date_in=3.0))

    await read_all(make_source(fake.url))

    requests = fake.requests
    assert len(requests) == 2
    assert 1.9 <= gaps(requests)[0] < 4.0


async def test_retry_after_is_capped(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_AFTER_CAP_SECONDS", 0.3)
    fake.enqueue(Fault.http(503, retry_after=86_400))

    await read_all(make_source(fake.url))

    assert 0.3 <= gaps(fake.requests)[0] < 2.0


# -- 3. refused -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(401, "Unauthorized"), (403, "Forbidden")])
async def test_refused_fails_at_once_naming_the_status(
    fake: FakeUpstream, status: int, reason: str
) -> None:
    fake.enqueue(Fault.http(status))

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(fake.url, auth_key="sk-do-not-leak"))

    message = str(caught.value)
    assert len(fake.requests) == 1
    assert f"HTTP {status} {reason}" in message
    assert "API_SOURCE_KEY" in message
    assert "sk-do-not-leak" not in message
    assert "\n" not in message


# -- 4. malformed bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (Fault.truncated_json(), "truncated"),
        (Fault.html_200(), "text/html"),
        (Fault.raw(b'{"error": "rate limited"}'), "data"),
        (Fault.raw(b'[{"id": "a"}, 42]'), "object"),
        (Fault.raw(b""), "truncated"),
    ],
    ids=["truncated", "html-200", "object-without-list", "non-object-item", "empty"],
)
async def test_malformed_body_fails_without_retry(
    fake: FakeUpstream, fault: Fault, detail: str
) -> None:
    # A body whose HTTP framing is complete is what the upstream meant to send:
    # asking again would get the same, so it is permanent.
    fake.enqueue(fault)

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(fake.url))

    message = str(caught.value)
    assert message.startswith(f"api: malformed JSON from {fake.url}: ")
    assert detail in message
    assert "\n" not in message
    assert len(fake.requests) == 1


async def test_malformed_page_is_named_in_the_message(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.ok(), Fault.html_200())

    with pytest.raises(SourceError, match=r"malformed JSON from .*/v1/tickers \(page 2\)"):
        await read_all(make_source(fake.url, page_size=4))

    assert [r.query["page"] for r in fake.requests] == ["1", "2"]


async def test_body_cut_mid_stream_is_transient(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.cut_mid_stream())

    chunks = await read_all(make_source(fake.url))

    assert len(fake.requests) == 2
    assert payloads(chunks) == TICKERS


async def test_body_cut_every_time_gives_up(fake: FakeUpstream) -> None:
    fake.enqueue(*[Fault.cut_mid_stream()] * 3)

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(fake.url, max_retries=2))

    message = str(caught.value)
    assert message.startswith("api: gave up after 3 attempts: response body cut short")
    assert "\n" not in message
    assert len(fake.requests) == 3


async def test_data_envelope_is_accepted() -> None:
    async with FakeUpstream(TICKERS, envelope=True) as upstream:
        chunks = await read_all(make_source(upstream.url))
    assert payloads(chunks) == TICKERS


# -- 5. rate limit and pagination ---------------------------------------------------------


async def test_rate_limit_holds_over_sixteen_pages_in_order() -> None:
    per_page = 5
    tickers = make_tickers(16 * per_page - 2)  # 15 full pages and a short one
    async with FakeUpstream(tickers) as upstream:
        chunks = await read_all(
            make_source(upstream.url, rate_limit_per_second=4.0, page_size=per_page)
        )
        requests = upstream.requests

    assert payloads(chunks) == tickers
    assert [int(r.query["page"]) for r in requests] == list(range(1, 17))
    assert {r.query["per_page"] for r in requests} == {str(per_page)}
    times = [r.at for r in requests]
    busiest = max(sum(1 for t in times if start <= t <= start + 1.0) for start in times)
    assert busiest <= 5  # rate + 1
    # Evenly spaced, not bursts: a bucket of capacity 4 would pass 4 at once.
    assert min(gaps(requests)) >= 0.2


async def test_retries_are_rate_limited_too(fake: FakeUpstream) -> None:
    fake.enqueue(*[Fault.http(503)] * 4)

    await read_all(make_source(fake.url, rate_limit_per_second=5.0, max_retries=4))

    assert len(fake.requests) == 5
    assert min(gaps(fake.requests)) >= 0.18  # 1/5 s, less scheduling noise


async def test_pagination_keeps_the_query_and_stops_on_an_empty_page(
    fake: FakeUpstream,
) -> None:
    chunks = await read_all(make_source(fake.url + "?quote=USD", page_size=5))

    assert payloads(chunks) == TICKERS
    assert [dict(r.query) for r in fake.requests] == [
        {"quote": "USD", "page": str(page), "per_page": "5"} for page in (1, 2, 3)
    ]
    assert chunks[-1].meta["pages"] == 3


async def test_a_failing_page_hands_on_the_pages_before_it() -> None:
    # Page 3 fails for good: what pages 1 and 2 brought is yielded before the error,
    # so the runner commits it (a source failing after some batches keeps them).
    tickers = make_tickers(20)
    async with FakeUpstream(tickers) as upstream:
        upstream.enqueue(Fault.ok(), Fault.ok(), *[Fault.http(503)] * 3)
        received: list[Chunk] = []

        async def read() -> None:
            source = make_source(upstream.url, page_size=4, max_retries=2)
            async with aclosing(read_http(source, None, 1000)) as stream:
                async for chunk in stream:
                    received.append(chunk)

        with pytest.raises(SourceError, match="gave up after 3 attempts"):
            await read()

    assert payloads(received) == tickers[:8]
    assert not any(chunk.final for chunk in received)


async def test_an_upstream_ignoring_pagination_is_read_once() -> None:
    async with FakeUpstream(TICKERS, paginate=False) as upstream:
        chunks = await read_all(make_source(upstream.url, page_size=4))
        requests = upstream.requests
    assert len(requests) == 1
    assert payloads(chunks) == TICKERS


async def test_one_get_without_page_size(fake: FakeUpstream) -> None:
    await read_all(make_source(fake.url))
    assert [dict(r.query) for r in fake.requests] == [{}]


# -- 6. every record, every run ------------------------------------------------------------

UNDATED = [
    {"id": "x-undated", "name": "Undated", "quotes": {"USD": {"price": 1.0}}},
    {"id": "x-garbage", "name": "Garbage", "last_updated": "soon", "quotes": {"USD": {"price": 2}}},
]


@pytest.mark.parametrize(
    "cursor",
    [None, {}, {"high_water": "2025-06-25T10:00:05Z"}, {"high_water": "not a time"}],
    ids=["none", "empty", "old-mark", "corrupt-mark"],
)
async def test_every_record_is_emitted_whatever_the_checkpoint(
    cursor: Mapping[str, Any] | None,
) -> None:
    async with FakeUpstream([*UNDATED, *TICKERS]) as upstream:
        chunks = await read_all(make_source(upstream.url, page_size=4), cursor=cursor, batch_size=2)

    assert payloads(chunks) == [*UNDATED, *TICKERS]
    *pages, final = chunks
    assert all(chunk.cursor == {} and not chunk.final for chunk in pages)
    assert all(len(chunk.records) <= 2 for chunk in pages)
    assert final.final
    assert final.records == []
    # The checkpoint written after the run holds nothing: a mark of an older
    # version is dropped.
    assert final.cursor == {}
    assert final.meta["received"] == len(UNDATED) + len(TICKERS)


async def test_records_are_canonical_raw_records(fake: FakeUpstream) -> None:
    chunks = await read_all(make_source(fake.url), batch_size=3)

    assert [len(chunk.records) for chunk in chunks] == [3, 3, 3, 1, 0]
    record = chunks[0].records[0]
    assert msgspec.json.decode(record.data) == TICKERS[0]
    assert len(record.content_hash) == 16


# -- 7. headers ---------------------------------------------------------------------------


async def test_authorization_is_sent_raw_when_a_key_is_set(fake: FakeUpstream) -> None:
    source = make_source(fake.url, auth_key="sk-live-123", headers={"X-Extra": "1"})
    fake.enqueue(Fault.http(503))

    with capture_logs() as logs:
        await read_all(source)

    for request in fake.requests:  # the retry carries it too
        assert request.headers["Authorization"] == "sk-live-123"
        assert request.headers["Accept"] == "application/json"
        assert request.headers["User-Agent"] == "kasparro/0.1"
        assert request.headers["X-Extra"] == "1"
    retries = [entry for entry in logs if entry["event"] == "http_retry"]
    assert len(retries) == 1
    assert retries[0]["status"] == 503
    assert retries[0]["attempt"] == 1
    assert retries[0]["log_level"] == "warning"
    assert "sk-live-123" not in repr(logs)


async def test_no_authorization_without_a_key(fake: FakeUpstream) -> None:
    await read_all(make_source(fake.url))
    assert "Authorization" not in fake.requests[0].headers


async def test_a_given_session_is_used_and_left_open(fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        chunks = await read_all(make_source(fake.url), session=session)
        assert not session.closed
    assert payloads(chunks) == TICKERS


# -- 8. giving up, permanent errors ---------------------------------------------------------


async def test_exhausted_retries_say_how_many_attempts(fake: FakeUpstream) -> None:
    fake.enqueue(*[Fault.http(503)] * 3)

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(fake.url, max_retries=2))

    assert str(caught.value) == "api: gave up after 3 attempts: HTTP 503 Service Unavailable"
    assert len(fake.requests) == 3


async def test_404_is_not_retried_and_hides_the_query(fake: FakeUpstream) -> None:
    location = f"{fake.base_url}/v1/missing?api_key=secret-in-url"

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(location))

    assert str(caught.value) == f"api: HTTP 404 Not Found from {fake.base_url}/v1/missing"
    assert len(fake.requests) == 1


async def test_connection_refused_is_retried_then_reported_on_one_line() -> None:
    source = make_source(f"http://127.0.0.1:{closed_port()}/v1/tickers", max_retries=1)

    with pytest.raises(SourceError) as caught:
        await read_all(source)

    message = str(caught.value)
    assert message.startswith("api: gave up after 2 attempts: ClientConnectorError")
    assert "\n" not in message


async def test_a_stall_longer_than_the_timeout_is_retried(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.stall(10))

    chunks = await read_all(make_source(fake.url, timeout_seconds=0.3))

    assert len(fake.requests) == 2
    assert payloads(chunks) == TICKERS


async def test_stalling_every_time_reports_the_timeout(fake: FakeUpstream) -> None:
    fake.enqueue(Fault.stall(10), Fault.stall(10))

    with pytest.raises(SourceError) as caught:
        await read_all(make_source(fake.url, timeout_seconds=0.3, max_retries=1))

    assert str(caught.value) == "api: gave up after 2 attempts: timed out after 0.3 s"


# -- the fake in a background thread (as the subprocess tests use it) -------------------------


async def test_fake_runs_in_a_thread_too() -> None:
    upstream = FakeUpstream(TICKERS, require_auth="k1").start()
    try:
        chunks = await read_all(make_source(upstream.url, auth_key="k1"))
        with pytest.raises(SourceError, match="HTTP 401"):
            await read_all(make_source(upstream.url))
        assert len(upstream.wait_for_requests(2, timeout=1.0)) == 2
    finally:
        upstream.stop()
    assert payloads(chunks) == TICKERS


async def test_a_bad_number_rejects_one_record_not_the_page(fake: FakeUpstream) -> None:
    # NaN and 1e999 are not strict JSON, but the rest of the page is good records:
    # the page is read leniently and the odd values reach raw as the text received.
    body = (
        b'[{"id": "a", "name": "A", "quotes": {"USD": {"price": NaN}}},'
        b' {"id": "b", "name": "B", "quotes": {"USD": {"price": 1e999}}},'
        b' {"id": "c", "name": "C", "quotes": {"USD": {"price": 3.5}}}]'
    )
    fake.enqueue(Fault.raw(body))

    chunks = await read_all(make_source(fake.url))

    prices = [p["quotes"]["USD"]["price"] for p in payloads(chunks)]
    assert prices == ["NaN", "1e999", 3.5]
    assert len(fake.requests) == 1
