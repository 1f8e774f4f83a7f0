"""Exception handlers: every error is a JSON body with ``status_code`` and ``detail``."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap

from app.api.schemas import ErrorBody

log = structlog.get_logger("kasparro.http")

# What a lost or unreachable database raises through asyncpg.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)

# What the database refuses in the values it is given: text it cannot hold
# (U+0000), a number out of its type's range, a malformed literal. Both the
# server's errors (SQLSTATE class 22) and asyncpg's own, raised while it
# encodes an argument.
DATA_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.exceptions._base.DataError,
)


def _json(body: ErrorBody, headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    return Response(
        content=body, status_code=body.status_code, media_type=MediaType.JSON, headers=headers
    )


_MISSING = re.compile(r"Missing required (\w+) parameter '([^']+)'")


def validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    """400 naming each offending parameter in ``detail`` and, with the reason, in ``extra``."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    missing = _MISSING.match(exc.detail or "")
    if missing and not extra:
        # Litestar's own message repeats the request's URL; name the parameter only.
        extra = [{"message": "required", "key": missing[2], "source": missing[1]}]
    keys = [str(e["key"]) for e in extra if isinstance(e, dict) and e.get("key")]
    if keys:
        detail = "Invalid parameter: " + ", ".join(dict.fromkeys(keys))
    else:
        detail = exc.detail if exc.detail else "Bad Request"
    items = [e for e in extra if isinstance(e, dict)]
    return _json(ErrorBody(status_code=exc.status_code, detail=detail, extra=items or None))


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """Client errors keep their detail; server errors say nothing about internals."""
    if exc.status_code >= HTTP_500_INTERNAL_SERVER_ERROR:
        log.error("http_server_error", status=exc.status_code, exc_info=exc)
        detail = "Internal Server Error"
    else:
        detail = exc.detail
    extra = exc.extra if isinstance(exc.extra, list) and exc.status_code < 500 else None
    return _json(ErrorBody(status_code=exc.status_code, detail=detail, extra=extra), exc.headers)


def database_unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """503 while the database cannot be reached; the next request may succeed."""
    log.warning("database_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
    return _json(ErrorBody(status_code=HTTP_503_SERVICE_UNAVAILABLE, detail="Database unavailable"))


def data_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """400: a value of the request that the database cannot take (never a 500)."""
    log.info(
        "database_refused_value",
        error_type=type(exc).__name__,
        sqlstate=getattr(exc, "sqlstate", None),
    )
    return _json(ErrorBody(status_code=HTTP_400_BAD_REQUEST, detail="Invalid parameter value"))


def internal_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """500 for anything unexpected; the traceback goes to the log only."""
    log.error("unhandled_error", error_type=type(exc).__name__, exc_info=exc)
    return _json(
        ErrorBody(status_code=HTTP_500_INTERNAL_SERVER_ERROR, detail="Internal Server Error")
    )


def exception_handlers() -> ExceptionHandlersMap:
    handlers: ExceptionHandlersMap = {
        ValidationException: validation_error,
        HTTPException: http_error,
        Exception: internal_error,
    }
    for error in DATABASE_UNAVAILABLE:
        handlers[error] = database_unavailable
    for error in DATA_ERRORS:
        handlers[error] = data_error
    return handlers
