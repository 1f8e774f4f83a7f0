"""Live events: ``/events``, Server-Sent Events on every replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from app.api.schemas import error_responses
from app.api.security import SECURITY_SCHEME, api_key_guard
from app.service.events import EventHub, StreamEnd

EVENT_STREAM = "text/event-stream"
CONNECTED = b"retry: 2000\n: connected\n\n"
"""The first bytes of a stream, sent once it is subscribed (and the reconnect delay)."""
KEEP_ALIVE = b": keep-alive\n\n"


async def event_stream(hub: EventHub, keepalive_seconds: float) -> AsyncIterator[bytes]:
    """A subscriber's events as they come, with a comment whenever none came for a while."""
    with hub.subscribe() as subscription:
        yield CONNECTED
        while True:
            try:
                async with asyncio.timeout(keepalive_seconds):
                    message = await subscription.queue.get()
            except TimeoutError:
                yield KEEP_ALIVE
                continue
            if isinstance(message, StreamEnd):
                yield b": " + message.comment.encode() + b"\n\n"
                return
            yield message


class EventsController(Controller):
    tags = ("events",)
    guards = (api_key_guard,)
    security = ({SECURITY_SCHEME: []},)

    @get(
        "/events",
        operation_id="events",
        summary="Server-Sent Events: runs starting and finishing, unified data changing",
        media_type=EVENT_STREAM,
        responses={
            **error_responses(401),
            200: ResponseSpec(
                data_container=str,
                media_type=EVENT_STREAM,
                description="The stream; it stays open until the client or the server leaves",
            ),
        },
    )
    async def events(self, request: Request[Any, Any, Any]) -> Stream:
        """``run_started`` and ``run_finished`` carry the run object, ``unified_changed``
        a range ``{"after", "seq"}`` of change numbers (read them with
        ``/changes?after=``), whichever replica or ``etl run`` made them. A comment
        line is sent when nothing happened for a while; a subscriber that reads too
        slowly is dropped (the stream ends) and catches up with ``/changes``."""
        hub: EventHub = request.app.state.events
        keepalive: float = request.app.state.service.settings.events_keepalive_seconds
        return Stream(
            event_stream(hub, keepalive),
            media_type=EVENT_STREAM,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
