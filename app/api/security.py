"""The ``x-api-key`` guard of the protected endpoints."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

API_KEY_HEADER = "x-api-key"
SECURITY_SCHEME = "apiKey"
"""Name of the scheme in the OpenAPI document."""


def key_matches(provided: str, keys: Iterable[str]) -> bool:
    """Whether ``provided``, trimmed of spaces and tabs at both ends, equals one
    of ``keys`` exactly, in time independent of where they differ.

    HTTP does not count whitespace around a field value as part of it, and the
    HTTP parsers disagree on whether they strip it (one drops it in front
    only); trimming both ends here makes ``" key"``, ``"key "`` and ``"key"``
    the same everywhere. The configured keys are trimmed when read. Every key
    is compared (no early exit), so timing does not tell which key or how many
    keys are configured either.
    """
    # Header values arrive decoded as latin-1; compare the bytes that were sent.
    candidate = provided.strip(" \t").encode("latin-1")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode("utf-8"))
    return matched


async def api_key_guard(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Litestar guard: 401 with detail ``Unauthorized`` and nothing else.

    A coroutine, though it never waits: Litestar runs a plain function guard in a
    worker thread, and that hop cost `/data` a tenth of its rate.
    """
    provided = connection.headers.get(API_KEY_HEADER)
    keys: tuple[str, ...] = connection.app.state.service.settings.api_keys
    if provided is None or not key_matches(provided, keys):
        raise NotAuthorizedException(detail="Unauthorized")
