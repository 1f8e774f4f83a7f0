"""The event hub's fan-out, without a database: bounded queues, drops, the end."""

from __future__ import annotations

import json
import uuid
from typing import Any

from app.api.controllers.events import CONNECTED, KEEP_ALIVE, event_stream
from app.service.events import DROPPED, QUEUE_EVENTS, STOPPING, EventHub, encode


async def _no_connection() -> Any:
    raise OSError("no database in a unit test")


async def _no_run(_run_id: uuid.UUID) -> dict[str, Any] | None:
    return None


async def _no_seq() -> int:
    return 0


def _hub() -> EventHub:
    return EventHub(_no_connection, _no_run, _no_seq)


async def test_a_subscriber_that_falls_behind_is_dropped_and_the_others_get_everything() -> None:
    hub = _hub()
    with hub.subscribe() as slow, hub.subscribe() as quick:
        received = []
        for n in range(QUEUE_EVENTS + 5):
            hub.publish(encode("unified_changed", {"after": n, "seq": n + 1}))
            received.append(quick.queue.get_nowait())
        assert len(received) == QUEUE_EVENTS + 5
        assert slow not in hub.subscribers
        assert quick in hub.subscribers
        assert hub.dropped == 1
        # The dropped stream gets its last words at once, not the backlog.
        assert slow.queue.qsize() == 1
        assert slow.queue.get_nowait() == DROPPED
    assert hub.subscribers == set()


async def test_a_burst_of_changes_reaches_subscribers_as_one_range_in_order_with_runs() -> None:
    hub = _hub()
    for note in (
        {"event": "unified_changed", "after": 10, "seq": 20},
        {"event": "unified_changed", "after": 20, "seq": 35},
        {"event": "run_finished", "id": "x"},
        {"event": "unified_changed", "after": 35, "seq": 40},
    ):
        hub._notified(None, 1, "kasparro_events", json.dumps(note))
    hub._notified(None, 1, "kasparro_events", "not json")
    assert list(hub._notes) == [
        {"event": "unified_changed", "after": 10, "seq": 35},
        {"event": "run_finished", "id": "x"},
        {"event": "unified_changed", "after": 35, "seq": 40},
    ]


async def test_ending_the_streams_ends_every_subscriber_and_any_that_comes_later() -> None:
    hub = _hub()
    with hub.subscribe() as first:
        hub.publish(b"event: x\ndata: {}\n\n")
        hub.end_streams()
        assert first.queue.get_nowait() == STOPPING
    with hub.subscribe() as late:
        assert late.queue.get_nowait() == STOPPING
        assert late not in hub.subscribers


async def test_a_stream_says_it_is_connected_keeps_alive_and_ends_with_its_reason() -> None:
    hub = _hub()
    stream = event_stream(hub, keepalive_seconds=0.01)
    assert await anext(stream) == CONNECTED
    assert len(hub.subscribers) == 1
    assert await anext(stream) == KEEP_ALIVE
    message = encode("run_started", {"id": "r"})
    hub.publish(message)
    assert await anext(stream) == message
    hub.end_streams()
    assert await anext(stream) == b": the server is stopping\n\n"
    assert [chunk async for chunk in stream] == []
    assert hub.subscribers == set()
