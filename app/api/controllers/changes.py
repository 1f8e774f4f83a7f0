"""The change feed: ``/changes``, every change of the unified table once, in commit order."""

from __future__ import annotations

from typing import Annotated, cast

import msgspec
from litestar import Controller, get
from litestar.params import QueryParameter

from app.api.dependencies import ServiceDep
from app.api.schemas import ChangeItem, ChangePage, error_responses
from app.api.security import SECURITY_SCHEME, api_key_guard
from persistence import changes

MAX_SEQ = 2**63 - 1


class ChangesController(Controller):
    tags = ("data",)
    guards = (api_key_guard,)
    security = ({SECURITY_SCHEME: []},)

    @get(
        "/changes",
        operation_id="listChanges",
        summary="Changes of the unified table after a sequence number, oldest first",
        responses=error_responses(401, 503),
    )
    async def list_changes(
        self,
        service: ServiceDep,
        after: Annotated[
            int,
            QueryParameter(ge=0, le=MAX_SEQ, description="The last seq seen; 0 for the start."),
        ] = 0,
        limit: Annotated[
            int, QueryParameter(ge=1, le=changes.MAX_LIMIT, description="Page size.")
        ] = 100,
    ) -> ChangePage:
        """Rows changed after ``after``, each once with its latest state, and tombstones
        (``deleted``) for rows that left the table. Store ``next_after`` and pass it as
        ``after`` next time: every later change shows exactly once. A page shorter
        than ``limit`` means the reader has caught up."""
        async with service.reading() as pool:
            page = await changes.changes_page(pool, after=after, limit=limit)
        return ChangePage(
            data=cast("list[ChangeItem]", msgspec.Raw(page.items)), next_after=page.next_after
        )
