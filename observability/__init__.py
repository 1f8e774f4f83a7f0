"""Structured logs and Prometheus metrics.

structlog is imported here, first, without ``rich``: structlog imports rich, when
it is installed (Litestar depends on it), only to draw console tracebacks, and
rich with what it pulls in is a large share of a short command's start-up (a
no-op ``etl run``, the service's run child, a parse process). The
console renderer then prints plain tracebacks; rich itself stays importable for
everything else. The packages that log import this one before structlog.
"""

import sys

if "structlog" not in sys.modules and "rich" not in sys.modules:
    # A None entry makes ``import rich`` fail as if it were not installed.
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
