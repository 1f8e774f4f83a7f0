"""Response bodies of the HTTP API, as msgspec Structs.

Timestamps are aware UTC datetimes: msgspec writes them as ISO 8601 with ``Z``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import msgspec

from persistence.runs import Run


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error response."""

    status_code: int
    detail: str
    extra: list[dict[str, Any]] | None = None


class Root(msgspec.Struct):
    status: str
    service: str
    version: str
    docs: str
    health: str


class Health(msgspec.Struct):
    status: str
    """``ok``, or ``degraded`` (HTTP 503) when the database does not answer."""
    db: str
    """``ok`` or ``down``."""
    last_etl: str
    """``success``, ``partial``, ``failed``, ``running``, ``never``; ``unknown`` while the
    database is down and this process has not finished a run."""
    etl_loop: str
    """``disabled``, ``scheduled``, ``running``, ``finished``, ``crashed`` or ``stopping``."""
    etl_loop_error: str | None
    db_latency_ms: float | None


class DataItem(msgspec.Struct):
    """One row of ``unified_data``. The database renders a page's items itself
    (``persistence.reads.ITEM_JSON``); this Struct documents them."""

    name: str
    value: float
    source: str
    observed_at: datetime
    ingested_at: datetime


def rendered_items(items: str) -> list[DataItem]:
    """A JSON array of items rendered by the database, in the place of a list of
    ``DataItem``: msgspec writes a ``Raw`` verbatim, so the items are neither
    decoded nor encoded again."""
    return cast("list[DataItem]", msgspec.Raw(items))


class Pagination(msgspec.Struct):
    limit: int
    offset: int
    total: int
    next_cursor: str | None


class Meta(msgspec.Struct):
    request_id: str
    api_latency_ms: float


class DataPage(msgspec.Struct):
    data: list[DataItem]
    pagination: Pagination
    meta: Meta


class ChangeItem(msgspec.Struct):
    """One change of ``unified_data``: the row's state after it, or a tombstone
    (``deleted``, with no state) for a row that left the table. Rendered by the
    database (``persistence.changes.CHANGE_JSON``); this Struct documents it."""

    seq: int
    """The change's number: numbers grow in commit order."""
    name: str
    value: float | None
    source: str | None
    observed_at: datetime | None
    ingested_at: datetime | None
    deleted: bool
    """The row left the table (``etl reprocess`` dropped it, or it was deleted)."""


class ChangePage(msgspec.Struct):
    data: list[ChangeItem]
    next_after: int
    """Pass as ``after`` to read the changes that follow this page."""


class RunStarted(msgspec.Struct):
    """``POST /runs``: the run was started in the background."""

    id: str
    status: str
    """Always ``running``."""


class SourceStats(msgspec.Struct):
    last_success_at: datetime | None
    last_failure_at: datetime | None
    raw_records: int
    checkpoint: dict[str, Any] | None
    last_error: str | None


class Stats(msgspec.Struct):
    last_run_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_status: str
    """Status of the newest run, or ``never``."""
    last_duration_seconds: float | None
    runs_total: int
    records_processed_total: int
    unified_records: int
    sources: dict[str, SourceStats]


class RunList(msgspec.Struct):
    data: list[Run]


class Rejection(msgspec.Struct):
    id: int
    run_id: str
    source: str
    raw_id: int
    field: str
    reason: str
    payload: Any
    """The raw record exactly as stored."""
    created_at: datetime
    raw_table: str


class RejectionPagination(msgspec.Struct):
    limit: int
    next_after: int | None
    """Pass as ``after`` to read the next page; null on the last page."""


class RejectionList(msgspec.Struct):
    data: list[Rejection]
    pagination: RejectionPagination


class Counts(msgspec.Struct):
    fetched: int
    raw_inserted: int
    duplicates: int
    rejected: int
    unified_upserted: int
    duration_seconds: float | None


class RunSummary(msgspec.Struct):
    id: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_seconds: float | None


class SourceComparison(msgspec.Struct):
    a_status: str | None
    b_status: str | None
    a: Counts | None
    b: Counts | None
    delta: Counts
    """``b - a`` for every count and the duration (a missing side counts as zero)."""
    rejection_rate_b: float | None


class Anomaly(msgspec.Struct):
    rule: str
    """``volume_change``, ``rejection_rate``, ``slow_run``, ``new_drift`` or ``source_failed``."""
    source: str | None
    """The source concerned; null for a rule about the whole run."""
    detail: str
    value: float | None
    threshold: float | None


class Comparison(msgspec.Struct):
    a: RunSummary
    b: RunSummary
    duration_delta_seconds: float | None
    median_duration_seconds: float | None
    """Median duration of up to 10 finished runs started before ``b``."""
    sources: dict[str, SourceComparison]
    anomalies: list[Anomaly]


class EntityMember(msgspec.Struct):
    """One source's record linked to a unified row."""

    source: str
    source_key: str
    """The record's id in its source, or its canonical name when the source has no ids."""
    names_seen: list[str]
    """Every canonical name this key was seen under, oldest first."""
    rule: str
    """What linked it: ``new`` (it started the row), ``name``, ``id``, ``symbol``,
    ``value`` or ``manual`` (the identity file)."""
    confidence: float


class Entity(msgspec.Struct):
    """A unified row and every source record linked to it."""

    name: str
    members: list[EntityMember]
    value: float | None
    source: str | None
    observed_at: datetime | None
    ingested_at: datetime | None


def error_responses(*codes: int) -> dict[int, Any]:
    """OpenAPI entries for the error statuses a handler can answer with."""
    from litestar.openapi.datastructures import ResponseSpec

    descriptions = {
        401: "Missing or wrong x-api-key",
        404: "No such run or row",
        409: "A run of this process is already in progress",
        503: "The database does not answer",
    }
    return {
        code: ResponseSpec(data_container=ErrorBody, description=descriptions[code])
        for code in codes
    }
