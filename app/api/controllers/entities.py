"""Identity: ``/entities/{name}``, a unified row with every source record linked to it."""

from __future__ import annotations

from litestar import Controller, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

from app.api.dependencies import ServiceDep
from app.api.schemas import Entity, EntityMember, error_responses
from app.api.security import SECURITY_SCHEME, api_key_guard
from persistence import links
from persistence.reads import READ_TIMEOUT_SECONDS
from pipelines.transform import canonical_name


class EntitiesController(Controller):
    tags = ("data",)
    guards = (api_key_guard,)
    security = ({SECURITY_SCHEME: []},)

    @get(
        "/entities/{name:str}",
        operation_id="getEntity",
        summary="A unified row and the source records linked to it",
        responses=error_responses(401, 404, 503),
    )
    async def get_entity(self, service: ServiceDep, name: FromPath[str]) -> Entity:
        """The row named ``name`` (normalised like canonical names), with each
        (source, source_key) linked to it, the rule that linked it and its
        confidence. 404 when no row has this name."""
        wanted = canonical_name(name) if "\x00" not in name else ""
        async with service.reading() as pool:
            found = (
                await links.entity(pool, wanted, limit_seconds=READ_TIMEOUT_SECONDS)
                if wanted
                else None
            )
        if found is None:
            raise NotFoundException(detail="Row not found")
        row = found.row or {}
        return Entity(
            name=found.name,
            members=[
                EntityMember(
                    source=m.source,
                    source_key=m.source_key,
                    names_seen=m.names_seen,
                    rule=m.rule,
                    confidence=m.confidence,
                )
                for m in found.members
            ],
            value=row.get("value"),
            source=row.get("source"),
            observed_at=row.get("observed_at"),
            ingested_at=row.get("ingested_at"),
        )
