"""Dependencies injected into handlers."""

from __future__ import annotations

from typing import TypeAlias, cast

from litestar.datastructures import State
from litestar.di import NamedDependency

from app.service.lifespan import Service

ServiceDep: TypeAlias = NamedDependency[Service]
"""A handler parameter named ``service`` receives the app's :class:`Service`."""


def provide_service(state: State) -> Service:
    """The app's lifespan component, holding the pools and the ingestion loop."""
    return cast(Service, state.service)
