"""structlog set-up: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

import msgspec
import structlog

# Built once: one access line per request makes the renderer a hot path. Values
# msgspec does not know (exceptions, paths) are written as their str().
_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(event: Any, **_: Any) -> str:
    return _encoder.encode(event).decode()


class StatusLine:
    """A line a terminal shows and rewrites in place (a run's progress).

    Whatever else is written to the same stream (a log line above all) ends it
    first, with a newline, so no line is ever glued to the end of the progress.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._open = False
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        """Replace the line's text (carriage return, text, erase to the end)."""
        with self._lock:
            self.stream.write(f"\r{text}\033[K")
            self.stream.flush()
            self._open = True

    def end(self) -> None:
        """End the line (a newline) if it is showing; the next write starts a new one."""
        with self._lock:
            if self._open:
                self.stream.write("\n")
                self.stream.flush()
                self._open = False


_status_lines: list[StatusLine] = []


@contextlib.contextmanager
def status_line(stream: TextIO) -> Iterator[StatusLine]:
    """A :class:`StatusLine` on ``stream`` while the block runs, ended before every
    log line this process writes meanwhile, and at the end of the block."""
    line = StatusLine(stream)
    _status_lines.append(line)
    try:
        yield line
    finally:
        _status_lines.remove(line)
        line.end()


class _EndingStatus:
    """A text stream that ends every status line before it writes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        for line in _status_lines:
            line.end()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def configure_logging(
    log_format: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's root logger once per process.

    Every line carries ``timestamp`` (ISO 8601 UTC), ``level`` and ``event``, plus
    whatever is bound in context variables (``request_id``, ``run_id``, ``source``).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        renderer: Any = structlog.processors.JSONRenderer(serializer=_dumps)
        tail: list[Any] = [
            # Tracebacks as data, without local variables: frames hold settings
            # and source configs, and an upstream key must never reach a log.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer()
        tail = []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # structlog asks for a TextIO; it only ever calls write and flush.
        logger_factory=structlog.PrintLoggerFactory(
            file=_EndingStatus(stream or sys.stdout)  # type: ignore[arg-type]
        ),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn, alembic) go to
    # stderr at warning level and above so they do not mix into the JSON stream.
    logging.basicConfig(
        level=max(numeric, logging.WARNING),
        stream=_EndingStatus(sys.stderr),
        force=True,
    )
