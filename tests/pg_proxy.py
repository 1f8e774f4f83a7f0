"""A TCP proxy in front of the test's PostgreSQL that a test can cut and restore.

It runs its own event loop in a thread, so it keeps forwarding while the test
blocks (a test client's request, a ``subprocess`` wait).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class PgProxy:
    """Forwards TCP connections on 127.0.0.1 to PostgreSQL (TCP or unix socket).

    ``cut(mode)`` aborts every connection in flight, as a lost network or a
    database restart would, and then treats new ones by ``mode``: ``refuse``
    (closed at once) or ``hang`` (accepted and never answered). ``restore()``
    forwards again.
    """

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        port = int(query.pop("port", 0) or parts.port or 5432)
        host = query.pop("host", None) or parts.hostname or "127.0.0.1"
        # A host that is a directory names the unix socket of a local server.
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._tcp = (host, port)
        self._parts = parts._replace(query=urlencode(query))
        self.mode = "forward"
        self.connections = 0
        """Connections forwarded to the server so far."""
        self._links: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The database URL through the proxy."""
        user = self._parts.username or ""
        password = f":{self._parts.password}" if self._parts.password else ""
        netloc = f"{user}{password}@127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> PgProxy:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    def cut(self, mode: str = "refuse") -> int:
        """Drop every connection, then treat new ones by ``mode``; how many were dropped."""
        if mode not in ("forward", "refuse", "hang"):
            raise ValueError(f"unknown proxy mode {mode!r}")

        async def apply() -> int:
            self.mode = mode
            dropped = len(self._links)
            for writer in list(self._links):
                writer.transport.abort()
            self._links.clear()
            return dropped

        dropped: int = self._call(apply())
        return dropped

    def restore(self) -> None:
        """Forward new connections again (those in flight stay as they are)."""

        async def apply() -> None:
            self.mode = "forward"

        self._call(apply())

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
        self.connections += 1
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
