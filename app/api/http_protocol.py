"""uvicorn's HTTP/1.1 protocol with bounds on what one client may hold.

uvicorn's protocol buffers a request's head, however large, before the
application sees it, and waits forever for a connection's first request: a few
clients sending huge headers, or nothing at all, hold memory and sockets. This
subclass bounds the head of each request while it is read, in bytes and in
time. The exact header limits (``app.api.middleware``) are still checked once the
head is complete; the bound here only keeps a head from growing past them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.middleware import MAX_HEADER_COUNT

MAX_HEAD_BYTES = 32 * 1024
"""Request line and headers as received: the header limits of the middleware
(16 KiB) plus the longest URL the API takes, with room to spare."""

LINGER_SECONDS = 1.0
"""How long a refused connection's further bytes are read and dropped before it
is closed: closing at once, with the client's bytes still unread, would reset
the connection, and the client could lose the 431 before reading it."""

_TOO_LARGE_BODY = b'{"status_code":431,"detail":"Request Header Fields Too Large"}'


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools protocol that refuses a head over :data:`MAX_HEAD_BYTES` or
    :data:`~app.api.middleware.MAX_HEADER_COUNT` headers with 431 as soon as it
    gets there, and closes a connection whose request head is not complete
    ``head_timeout`` seconds after its first byte (or after the connection
    opened, for the first request)."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    @classmethod
    def with_timeout(cls, head_timeout: float) -> type[BoundedHttpProtocol]:
        """The protocol class uvicorn instantiates, with this head timeout."""
        return type(cls.__name__, (cls,), {"head_timeout": head_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped unread, held nowhere
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first byte of a request on a kept-alive connection
                self._arm_head_timer()
        super().data_received(data)
        if (
            self._in_head
            and (self._head_bytes > MAX_HEAD_BYTES or self._head_count > MAX_HEADER_COUNT)
            and not self.transport.is_closing()
        ):
            self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        self._disarm_head_timer()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"x-request-id: %s\r\n"
            b"connection: close\r\n\r\n"
        ) % (len(_TOO_LARGE_BODY), str(uuid.uuid4()).encode("ascii"))
        self.transport.write(head + _TOO_LARGE_BODY)
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Closed at the end of the linger, or at once when the client half-closes
        # (the protocol's eof_received leaves the transport to close itself).
        self._head_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
