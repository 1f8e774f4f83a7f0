"""Per-request context: request id, access log line, HTTP metrics.

This wraps the whole application rather than being a Litestar middleware:
Litestar runs middleware only once a route has matched, and the 404 and 405
answers of the router must carry ``x-request-id`` and be counted too.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from observability.metrics import Metrics

log = structlog.get_logger("kasparro.http")

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
UNMATCHED_ROUTE = "<unmatched>"
MAX_HEADER_BYTES = 16 * 1024
"""Requests whose headers total more are refused with 431; no endpoint of this
API needs more than a few hundred bytes. The server's protocol
(:mod:`app.api.http_protocol`) keeps a head from growing far past this while it is
read; this is the exact check, for any ASGI server."""
MAX_HEADER_COUNT = 100
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def sane_request_id(value: bytes | None) -> str | None:
    """The client's request id when it is 1..128 visible ASCII characters, else ``None``."""
    if not value or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    if all(0x21 <= b <= 0x7E for b in value):
        return value.decode("ascii")
    return None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _headers_too_large(scope: Scope) -> bool:
    count = size = 0
    for key, value in scope.get("headers", ()):
        count += 1
        size += len(key) + len(value)
    return count > MAX_HEADER_COUNT or size > MAX_HEADER_BYTES


async def _refuse_headers(send: Send) -> None:
    body = b'{"status_code":431,"detail":"Request Header Fields Too Large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestContext:
    """ASGI wrapper adding the request id, the access log line and HTTP metrics.

    The request id and the start time are left in the request state
    (``request.state.request_id``, ``request.state.started``) for handlers.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = sane_request_id(_header(scope, REQUEST_ID_HEADER.encode())) or str(
            uuid.uuid4()
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        header = (REQUEST_ID_HEADER.encode(), request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != header[0]]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                if _headers_too_large(scope):
                    await _refuse_headers(send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
            finally:
                self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        # The route template, never the raw path: label values must stay bounded.
        route = scope.get("path_template") or UNMATCHED_ROUTE
        method = scope.get("method", "")
        method_label = method if method in _METHODS else "OTHER"
        self.metrics.http_requests.labels(
            method=method_label, route=route, status=str(status)
        ).inc()
        self.metrics.http_latency.labels(method=method_label, route=route).observe(elapsed)
        log.info(
            "http_request",
            method=method_label,
            route=route,
            path=scope.get("path", ""),
            status=status,
            duration_ms=round(elapsed * 1000, 3),
        )
