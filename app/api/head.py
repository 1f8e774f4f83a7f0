"""``HEAD`` on every ``GET`` endpoint: the GET handler answers, and the body stays home.

An ASGI wrapper rather than a second method on each handler, so that every GET
route answers HEAD, Litestar's own ``/schema`` pages and routes added later
included. The response keeps the GET's status and headers (``content-length``
and ``etag`` too, as RFC 9110 asks); it ends right after its headers, so a
stream (``/events``) ends at once instead of running on unread.
"""

from __future__ import annotations

from typing import cast

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send


class HeadAsGet:
    """Serves ``HEAD`` requests with the matching ``GET`` handler, without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def send_headers_only(message: Message) -> None:
            nonlocal ended
            if ended:
                return
            if message["type"] == "http.response.start":
                ended = True
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        # A copy: the server and the wrappers outside (the access log, the metrics)
        # must go on seeing HEAD. They learn the matched route from the copy.
        as_get = cast("HTTPScope", {**scope, "method": "GET"})
        try:
            await self.app(as_get, receive, send_headers_only)
        finally:
            if "path_template" in as_get:
                scope["path_template"] = as_get["path_template"]
