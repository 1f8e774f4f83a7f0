"""The unified data: ``/data`` (keyset or offset pages) and ``/stats``."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.datastructures import ResponseHeader
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import QueryParameter
from litestar.status_codes import HTTP_304_NOT_MODIFIED

from app.api import etag
from app.api.dependencies import ServiceDep
from app.api.pagination import (
    CURSOR_PATTERN,
    MAX_CURSOR_LENGTH,
    CursorError,
    decode_cursor,
    encode_cursor,
)
from app.api.schemas import (
    DataPage,
    Meta,
    Pagination,
    SourceStats,
    Stats,
    error_responses,
    rendered_items,
)
from app.api.security import SECURITY_SCHEME, api_key_guard
from persistence import reads
from pipelines.transform import canonical_name

TEXT_MAX = 1000
"""Longer text filters are refused (400): no stored name or source is that long."""
NO_NUL = r"^[^\x00]*$"
"""PostgreSQL text cannot hold U+0000; such a filter is refused (400), never a 500."""
MAX_OFFSET = 2**31 - 1
"""Deeper offsets are refused (400); cursors page through any depth at constant cost."""


PUBLIC_CHECKPOINT_KEYS = ("offset", "high_water")
"""What ``/stats`` shows of a checkpoint: how far a file was read (bytes) and the
newest timestamp seen. The rest (the file's head signature, the read mode) is
the reader's business, and ``/stats`` needs no key."""
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/:,;'\"()]+/)*([^\s/:,;'\"()]+)")


def public_checkpoint(cursor: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a stored checkpoint that ``/stats`` shows."""
    if cursor is None:
        return None
    return {key: cursor[key] for key in PUBLIC_CHECKPOINT_KEYS if key in cursor}


def public_error(error: str | None) -> str | None:
    """A source's last error without the server's directories: an absolute path
    is shown by its file name (URLs are left alone)."""
    return None if error is None else _ABSOLUTE_PATH.sub(r"\1", error)


def _bad_parameter(key: str, message: str) -> ValidationException:
    return ValidationException(
        detail=f"Invalid parameter: {key}",
        extra=[{"message": message, "key": key, "source": "query"}],
    )


def _not_modified(tag: str) -> Response[Any]:
    return Response(None, status_code=HTTP_304_NOT_MODIFIED, headers={"etag": tag})


class DataController(Controller):
    tags = ("data",)

    @get(
        "/data",
        operation_id="listData",
        summary="Unified records, ordered by name",
        guards=[api_key_guard],
        security=[{SECURITY_SCHEME: []}],
        response_headers=[
            ResponseHeader(
                name="etag",
                description="Changes whenever the page's rows can have changed",
                documentation_only=True,
            )
        ],
        responses={
            **error_responses(401, 503),
            HTTP_304_NOT_MODIFIED: ResponseSpec(
                data_container=None, description="If-None-Match names the current ETag"
            ),
        },
    )
    async def list_data(
        self,
        request: Request,  # type: ignore[type-arg]
        service: ServiceDep,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size.")] = 100,
        offset: Annotated[
            int, QueryParameter(ge=0, le=MAX_OFFSET, description="Rows to skip (0 with a cursor).")
        ] = 0,
        source: Annotated[
            str | None,
            QueryParameter(
                description="Keep rows won by this source.",
                max_length=TEXT_MAX,
                pattern=NO_NUL,
            ),
        ] = None,
        name: Annotated[
            str | None,
            QueryParameter(
                description="Canonical name; normalised like stored names.",
                max_length=TEXT_MAX,
                pattern=NO_NUL,
            ),
        ] = None,
        cursor: Annotated[
            str | None,
            QueryParameter(
                description="Opaque, from a previous next_cursor.",
                min_length=1,
                max_length=MAX_CURSOR_LENGTH,
                pattern=CURSOR_PATTERN,
            ),
        ] = None,
    ) -> Response[DataPage]:
        """A page of ``unified_data``; follow ``next_cursor`` to read every row once.

        The ``ETag`` changes whenever the page's rows can have changed; send it back
        in ``If-None-Match`` to get 304 and no body while they have not."""
        after: str | None = None
        if cursor is not None:
            if offset:
                raise _bad_parameter("cursor", "a cursor cannot be combined with offset > 0")
            try:
                after = decode_cursor(cursor)
            except CursorError:
                raise _bad_parameter("cursor", "malformed cursor") from None
        wanted = canonical_name(name) if name is not None else None
        query = (source, wanted, after, limit, offset)
        conditional = request.headers.get("if-none-match")
        known: int | None = None
        async with service.reading() as pool:
            if conditional is not None:
                known = await reads.data_version(pool)
                tag = etag.data_etag(known, query, service.version)
                if etag.matches(conditional, tag):
                    return _not_modified(tag)
            page = await service.data_pages.page(
                pool,
                source=source,
                name=wanted,
                after=after,
                limit=limit,
                offset=offset,
                version=known,
            )
        next_cursor = (
            encode_cursor(page.last_name) if page.more and page.last_name is not None else None
        )
        started: float = request.state.started
        body = DataPage(
            data=rendered_items(page.items),
            pagination=Pagination(
                limit=limit, offset=offset, total=page.total, next_cursor=next_cursor
            ),
            meta=Meta(
                request_id=request.state.request_id,
                api_latency_ms=round((time.perf_counter() - started) * 1000, 3),
            ),
        )
        return Response(
            body, headers={"etag": etag.data_etag(page.version, query, service.version)}
        )

    @get(
        "/stats",
        operation_id="stats",
        summary="Run totals and per-source state",
        responses=error_responses(503),
    )
    async def stats(self, service: ServiceDep) -> Stats:
        """Totals over every run, and each declared source's last outcome and checkpoint."""
        async with service.reading() as pool, pool.acquire() as conn:
            found = await reads.stats(conn, service.source_names)
        return Stats(
            last_run_at=found.last_run_at,
            last_success_at=found.last_success_at,
            last_failure_at=found.last_failure_at,
            last_status=found.last_status or "never",
            last_duration_seconds=(
                None
                if found.last_duration_seconds is None
                else round(found.last_duration_seconds, 3)
            ),
            runs_total=found.runs_total,
            records_processed_total=found.records_processed_total,
            unified_records=found.unified_records,
            sources={
                name: SourceStats(
                    last_success_at=s.last_success_at,
                    last_failure_at=s.last_failure_at,
                    raw_records=s.raw_records,
                    checkpoint=public_checkpoint(s.checkpoint),
                    last_error=public_error(s.last_error),
                )
                for name, s in found.sources.items()
            },
        )
