"""Processes and plumbing shared by the fault scenarios.

- ``serve``: starts ``python -m app.cli serve`` processes, reads their JSON log
  lines in a thread, and kills whatever is still running at the end of the test.
- ``pg_proxy``: a TCP proxy in front of the test's PostgreSQL that the test can
  cut (every connection dropped, new ones refused) and restore.
- The terminal summary repeats every audit, so CI output shows them even when
  pytest captures stdout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.faults.audit import REPORTS
from tests.helpers import REPO_ROOT, kasparro_command


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTS:
        return
    terminalreporter.section("fault scenarios: audits and notes")
    for _, lines in REPORTS:
        for line in lines:
            terminalreporter.write_line(line)


class ServeProcess:
    """One ``kasparro serve`` on a random port; its stdout is parsed as JSON lines."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.started = time.monotonic()
        self._log = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            kasparro_command("serve", "--host", "127.0.0.1", "--port", "0"),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            with self._cond:
                self.lines.append(line)
                if isinstance(parsed, dict):
                    self.events.append(parsed)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_event(self, event: str, timeout: float, since: int = 0) -> dict[str, Any]:
        """The first ``event`` at index ``since`` or later in :attr:`events`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.events[since:]:
                    if item.get("event") == event:
                        return item
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    tail = "".join(self.lines[-20:])
                    raise AssertionError(
                        f"no {event!r} event (eof={self._eof}); last lines:\n{tail}"
                    )
                self._cond.wait(remaining)

    def listening(self, timeout: float = 30.0) -> str:
        """The base URL, once the server accepts connections.

        ``server_listening`` is logged when the socket is bound, which is before
        uvicorn calls ``listen()`` (after the lifespan start-up): connections are
        refused for a moment, so wait for the first answer.
        """
        started = time.monotonic()
        self.url = str(self.wait_for_event("server_listening", timeout)["url"])
        self.poll("/", lambda r: r.status_code == 200, timeout - (time.monotonic() - started))
        return self.url

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0, **kwargs)

    def poll(self, path: str, until: Callable[[httpx.Response], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.get(path)
                if until(last):
                    return last
            except httpx.TransportError as exc:
                last = exc
            assert time.monotonic() < deadline, f"{path} never satisfied the condition: {last!r}"
            time.sleep(0.05)

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        took = time.monotonic() - sent
        self._reader.join(timeout=5)
        return code, took

    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], ServeProcess]]:
    started: list[ServeProcess] = []

    def start(env: dict[str, str]) -> ServeProcess:
        served = ServeProcess(env, tmp_path / f"serve-{len(started)}.log")
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


class PgProxy:
    """Forwards TCP connections on 127.0.0.1 to PostgreSQL (TCP or unix socket).

    ``cut()`` aborts every connection in flight and refuses new ones, as a lost
    network or a database restart would; ``restore()`` forwards again. It runs
    its own event loop in a thread, so it keeps working while the test blocks.
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
        self.refusing = False
        self.connections = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
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

    def cut(self) -> int:
        """Drop every connection and refuse new ones; how many were dropped."""

        async def apply() -> int:
            self.refusing = True
            dropped = len(self._links)
            for writer in list(self._links):
                writer.transport.abort()
            self._links.clear()
            return dropped

        dropped: int = self._call(apply())
        return dropped

    def restore(self) -> None:
        async def apply() -> None:
            self.refusing = False

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
        if self.refusing:
            writer.transport.abort()
            return
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._links.update((writer, up_writer))
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


@pytest.fixture
def pg_proxy(database_url: str) -> Iterator[PgProxy]:
    proxy = PgProxy(database_url).start()
    try:
        yield proxy
    finally:
        proxy.close()


# -- input files ----------------------------------------------------------------------

CSV_FIELDS = ("name", "value", "updated_at")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def csv_records(count: int, *, start: int = 0, total: int | None = None) -> list[dict[str, str]]:
    """Rows ``start .. start+count`` of a deterministic CSV with real-world quirks.

    A third of the names come back later in another spelling (upper case, stray
    and inner whitespace), and timestamps are a permutation of the row numbers,
    so for about half of those names the later row is the older one: the winner
    does not follow file order. Every 10007th row has a value that is not a
    number (a rejection).
    """
    total = total if total is not None else start + count
    names = max(1, (2 * total) // 3)
    rows: list[dict[str, str]] = []
    for i in range(start, start + count):
        k = i % names
        name = f"coin {k}" if i < names else f"  COIN   {k} "
        value = "n/a" if i % 10007 == 10006 else f"{i % 997}.{i % 89}"
        moment = _EPOCH + timedelta(seconds=(i * 7919) % (total * 7 + 1))
        rows.append(
            {"name": name, "value": value, "updated_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
    return rows


def csv_text(rows: list[dict[str, str]], *, header: bool) -> str:
    lines = [",".join(CSV_FIELDS) + "\n"] if header else []
    lines.extend(f"{r['name']},{r['value']},{r['updated_at']}\n" for r in rows)
    return "".join(lines)
