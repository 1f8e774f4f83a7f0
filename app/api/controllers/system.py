"""Service endpoints: ``/``, ``/health`` and ``/metrics``."""

from __future__ import annotations

import typing

from litestar import Controller, MediaType, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from app.api.dependencies import ServiceDep
from app.api.schemas import Health, Root
from observability.metrics import exposition
from pipelines.drift import EventKind

#: Every kind of schema drift event: each is exported from the first scrape.
DRIFT_KINDS = typing.get_args(EventKind)

#: The text exposition format 0.0.4, which every Prometheus scraper reads
#: (Litestar appends ``; charset=utf-8``).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


class SystemController(Controller):
    tags = ("system",)

    @get("/", operation_id="root", summary="The service is running")
    async def root(self, service: ServiceDep) -> Root:
        """Answers whenever the process is up, whatever the state of the database."""
        return Root(
            status="running",
            service="kasparro",
            version=service.version,
            docs="/schema",
            health="/health",
        )

    @get(
        "/health",
        operation_id="health",
        summary="Database reachability and ingestion state",
        responses={
            HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
                data_container=Health, description="The database does not answer"
            )
        },
    )
    async def health(self, service: ServiceDep) -> Response[Health]:
        """200 when the database answers within a second, else 503 ``degraded``.

        ``last_etl`` is the newest run's status (``running`` while a run of any
        replica goes on, ``never`` before the first one): an attempt that could
        take no source is no run and leaves it as it was.
        """
        check = await service.check_database()
        loop = service.loop
        # When the database cannot say, what this process last saw.
        last = (check.last_status if check.ok else loop.last_status) or "never"
        body = Health(
            status="ok" if check.ok else "degraded",
            db="ok" if check.ok else "down",
            last_etl=last,
            etl_loop=loop.state,
            etl_loop_error=loop.last_error,
            db_latency_ms=check.latency_ms,
        )
        return Response(body, status_code=HTTP_200_OK if check.ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics",
        media_type=MediaType.TEXT,
    )
    async def metrics(self, service: ServiceDep) -> Response[bytes]:
        """Prometheus text exposition format: this process's metrics, and the etl_*
        figures read from the database (``etl_metrics_db_up 0`` when it does not answer)."""
        totals = await service.metric_totals()
        body = exposition(service.metrics, totals, service.source_names, DRIFT_KINDS)
        return Response(body, media_type=METRICS_CONTENT_TYPE)
