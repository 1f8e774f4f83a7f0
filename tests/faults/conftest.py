"""Processes and plumbing shared by the fault scenarios.

- ``serve``: starts ``python -m app.cli serve`` processes, reads their JSON log
  lines in a thread, and kills whatever is still running at the end of the test.
- ``pg_proxy``: a TCP proxy in front of the test's PostgreSQL that the test can
  cut (every connection dropped, new ones refused) and restore.
- The terminal summary repeats every audit, so CI output shows them even when
  pytest captures stdout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.audit import REPORTS
from tests.helpers import REPO_ROOT, kasparro_command
from tests.pg_proxy import PgProxy


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
