"""Run records: ``/runs``, ``/runs/{id}`` and ``/compare-runs``."""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_202_ACCEPTED

from app.api.compare import MEDIAN_WINDOW, compare_runs
from app.api.controllers import on_demand
from app.api.dependencies import ServiceDep
from app.api.schemas import Comparison, RunList, RunStarted, error_responses
from app.api.security import SECURITY_SCHEME, api_key_guard
from persistence import reads, runs
from persistence.runs import Run


class RunsController(Controller):
    tags = ("runs",)
    guards = (api_key_guard,)
    security = ({SECURITY_SCHEME: []},)

    @get(
        "/runs",
        operation_id="listRuns",
        summary="Runs, newest first",
        responses=error_responses(401, 503),
    )
    async def list_runs(
        self,
        service: ServiceDep,
        limit: Annotated[int, QueryParameter(ge=1, le=100, description="How many runs.")] = 20,
    ) -> RunList:
        async with service.reading() as pool:
            found = await runs.list_runs(pool, limit)
        return RunList(data=found)

    @post(
        "/runs",
        operation_id="startRun",
        summary="Start a run now",
        status_code=HTTP_202_ACCEPTED,
        responses=on_demand.responses(),
    )
    async def start_run(
        self, service: ServiceDep, data: JSONBody[on_demand.RunRequest | None] = None
    ) -> Response[RunStarted]:
        """Starts a run (trigger ``api``) in the background and answers at once with its
        id; follow it with ``GET /runs/{id}`` or ``GET /events``. 409 while a run of
        this process is going. Sources held by a run elsewhere (another replica, a
        CronJob) are left out of it, as in every run; when that is all of them,
        nothing is recorded."""
        return on_demand.start_run(service, data)

    @get(
        "/runs/{run_id:uuid}",
        operation_id="getRun",
        summary="One run",
        responses=error_responses(401, 404, 503),
    )
    async def get_run(self, service: ServiceDep, run_id: FromPath[uuid.UUID]) -> Run:
        """404 when no run has this id (a malformed id is 404 too)."""
        async with service.reading() as pool:
            found = await runs.get_run(pool, run_id)
        if found is None:
            raise NotFoundException(detail="Run not found")
        return found

    @get(
        "/compare-runs",
        operation_id="compareRuns",
        summary="Deltas between two runs and the anomalies of b",
        responses=error_responses(401, 404, 503),
    )
    async def compare(
        self,
        service: ServiceDep,
        a: Annotated[uuid.UUID, QueryParameter(description="The reference run.")],
        b: Annotated[uuid.UUID, QueryParameter(description="The run under inspection.")],
    ) -> Comparison:
        """Per-source deltas ``b - a`` and flagged anomalies, each naming its rule.

        Rules: ``volume_change`` (fetched changed by more than 50%),
        ``rejection_rate`` (more than 5% of b's fetched records rejected),
        ``slow_run`` (b took more than 3x the median of the 10 runs before it, and
        at least a second), ``new_drift`` (drift in b that a did not have),
        ``source_failed`` (a source succeeded in a and failed in b).
        """
        async with service.reading() as pool:
            run_a = await reads.run_detail(pool, a)
            run_b = await reads.run_detail(pool, b)
            missing = [label for label, run in (("a", run_a), ("b", run_b)) if run is None]
            if missing or run_a is None or run_b is None:
                raise NotFoundException(detail=f"Run not found: {', '.join(missing)}")
            median, _ = await reads.median_duration_before(pool, run_b.started_at, MEDIAN_WINDOW)
        return compare_runs(run_a, run_b, median)
