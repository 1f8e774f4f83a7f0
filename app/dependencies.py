"""Dependencies injected into handlers."""

from __future__ import annotations

from typing import cast

from litestar.datastructures import State

from app.service import Service


def provide_service(state: State) -> Service:
    """The app's lifespan component, holding the pools and the ingestion loop."""
    return cast(Service, state.service)
