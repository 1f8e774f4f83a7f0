"""Data quality: ``/rejections``, the records that failed validation and why."""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, get
from litestar.params import QueryParameter

from app.api.controllers.data import NO_NUL, TEXT_MAX
from app.api.dependencies import ServiceDep
from app.api.pagination import MAX_ID
from app.api.schemas import Rejection, RejectionList, RejectionPagination, error_responses
from app.api.security import SECURITY_SCHEME, api_key_guard
from persistence import reads


class QualityController(Controller):
    tags = ("quality",)
    guards = (api_key_guard,)
    security = ({SECURITY_SCHEME: []},)

    @get(
        "/rejections",
        operation_id="listRejections",
        summary="Rejected records and why",
        responses=error_responses(401, 503),
    )
    async def list_rejections(
        self,
        service: ServiceDep,
        run_id: Annotated[uuid.UUID | None, QueryParameter(description="Only this run.")] = None,
        source: Annotated[
            str | None,
            QueryParameter(description="Only this source.", max_length=TEXT_MAX, pattern=NO_NUL),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size.")] = 100,
        after: Annotated[
            int, QueryParameter(ge=0, le=MAX_ID, description="Rejection id to continue after.")
        ] = 0,
    ) -> RejectionList:
        """Each rejection with the field, the reason and the raw record as stored."""
        async with service.reading() as pool:
            found = await reads.list_rejections(
                pool, run_id=run_id, source=source, after_id=after, limit=limit + 1
            )
        shown = found[:limit]
        return RejectionList(
            data=[
                Rejection(
                    id=r.id,
                    run_id=str(r.run_id),
                    source=r.source,
                    raw_id=r.raw_id,
                    field=r.field,
                    reason=r.reason,
                    payload=r.payload,
                    created_at=r.created_at,
                    raw_table=r.raw_table,
                )
                for r in shown
            ],
            pagination=RejectionPagination(
                limit=limit, next_after=shown[-1].id if len(found) > limit else None
            ),
        )
