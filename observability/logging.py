"""structlog set-up: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog

# Built once: one access line per request makes the renderer a hot path. Values
# msgspec does not know (exceptions, paths) are written as their str().
_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(event: Any, **_: Any) -> str:
    return _encoder.encode(event).decode()


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
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn, alembic) go to
    # stderr at warning level and above so they do not mix into the JSON stream.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
