"""Runs on demand (``POST /runs``) for external schedulers: Cloud Scheduler,
EventBridge, cron with curl.

The handler sits in :class:`app.api.controllers.runs.RunsController`, beside ``GET
/runs`` (Litestar routes one path from one controller); what it does is here.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response
from litestar.exceptions import HTTPException, ServiceUnavailableException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_409_CONFLICT

from app.api.schemas import ErrorBody, RunStarted, error_responses
from app.service.lifespan import Service
from app.service.schedule import RunInProgressError, StoppingError

TRIGGER = "api"
"""The ``trigger`` of a run started over HTTP."""


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Optional body of ``POST /runs``."""

    sources: list[str] | None = None
    """Names of declared sources to run; all of them when absent."""


def responses() -> dict[int, Any]:
    """The OpenAPI entries of ``POST /runs``'s errors."""
    return {
        **error_responses(401, 409, 503),
        400: ResponseSpec(data_container=ErrorBody, description="Malformed body or unknown source"),
    }


def start_run(service: Service, data: RunRequest | None) -> Response[RunStarted]:
    """Start a run in the background; 202 with its id, 409 while one is going."""
    names = _wanted(data, service.source_names)
    try:
        run_id = service.loop.start_now(TRIGGER, names)
    except RunInProgressError:
        raise HTTPException(
            status_code=HTTP_409_CONFLICT, detail="A run of this process is already in progress"
        ) from None
    except StoppingError:
        raise ServiceUnavailableException(detail="The service is stopping") from None
    return Response(
        RunStarted(id=str(run_id), status="running"),
        status_code=HTTP_202_ACCEPTED,
        headers={"location": f"/runs/{run_id}"},
    )


def _wanted(data: RunRequest | None, declared: list[str]) -> list[str] | None:
    """The requested sources in request order, each once; ``None`` for all."""
    if data is None or data.sources is None:
        return None
    if not data.sources:
        raise _bad_sources("give at least one source name, or leave sources out for all")
    wanted = list(dict.fromkeys(data.sources))
    unknown = [name for name in wanted if name not in declared]
    if unknown:
        raise _bad_sources(
            f"unknown source: {', '.join(unknown)} (declared: {', '.join(declared)})"
        )
    return wanted


def _bad_sources(message: str) -> ValidationException:
    return ValidationException(
        detail="Invalid parameter: sources",
        extra=[{"message": message, "key": "sources", "source": "body"}],
    )
