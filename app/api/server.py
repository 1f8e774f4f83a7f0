"""The HTTP service: the Litestar app factory and ``kasparro serve``."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import structlog
import uvicorn
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from app.api.controllers.changes import ChangesController
from app.api.controllers.data import DataController
from app.api.controllers.entities import EntitiesController
from app.api.controllers.events import EventsController
from app.api.controllers.quality import QualityController
from app.api.controllers.runs import RunsController
from app.api.controllers.system import SystemController
from app.api.dependencies import provide_service
from app.api.errors import exception_handlers
from app.api.head import HeadAsGet
from app.api.http_protocol import BoundedHttpProtocol
from app.api.middleware import RequestContext
from app.api.security import API_KEY_HEADER, SECURITY_SCHEME
from app.service.events import CHANNEL, EventHub
from app.service.lifespan import Service
from app.service.schedule import RunnerLike
from config.errors import ConfigError
from config.settings import Settings
from config.sources import SourceConfig
from observability.logging import configure_logging
from observability.metrics import Metrics
from persistence import changes, runs
from persistence.database import resolve_database_url, run_migrations
from pipelines.identity import declared_sources

log = structlog.get_logger("kasparro.server")

GRACEFUL_SHUTDOWN_SECONDS = 2.0
"""How long open HTTP connections may finish their request once a stop is asked.

With the run's own bound (:data:`app.service.schedule.DEFAULT_STOP_TIMEOUT`) a stop takes
under ten seconds."""


def create_app(
    settings: Settings,
    *,
    pool: asyncpg.Pool[Any] | None = None,
    metrics: Metrics | None = None,
    runner: RunnerLike | None = None,
    sources: list[SourceConfig] | None = None,
) -> Litestar:
    """Build the application; nothing touches the database until its lifespan starts.

    Args:
        settings: the service settings (``api_keys`` are the accepted ``x-api-key`` values).
        pool: an open pool to use and leave open; it must belong to the event loop
            the app will run in. By default the lifespan opens its own pools on
            ``settings.database_url`` (or the embedded server) in that loop.
        metrics: the metrics to update and serve; a fresh registry by default.
        runner: the run executor of the ingestion loop; the pipeline's runner by default.
        sources: the declared sources; read from ``settings.sources_file`` by default.

    Raises:
        ConfigError: the sources file is invalid.
    """
    metrics = metrics if metrics is not None else Metrics()
    declared = sources if sources is not None else declared_sources(settings)
    service = Service(settings, declared, metrics, pool=pool, runner=runner)
    events = _event_hub(settings, service)
    app = Litestar(
        route_handlers=[
            SystemController,
            DataController,
            EntitiesController,
            RunsController,
            QualityController,
            ChangesController,
            EventsController,
        ],
        # Left in reverse order: the event streams end before the pools close.
        lifespan=[service, events],
        state=State({"service": service, "events": events}),
        dependencies={"service": Provide(provide_service, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        openapi_config=OpenAPIConfig(
            title="Kasparro",
            version=service.version,
            description="Unified records from APIs and files, with the ETL runs that made them.",
            components=Components(
                security_schemes={
                    SECURITY_SCHEME: SecurityScheme(
                        type="apiKey", name=API_KEY_HEADER, security_scheme_in="header"
                    )
                }
            ),
        ),
        # Logs go through structlog (observability.logging), not Litestar's logging set-up.
        logging_config=None,
        debug=False,
    )
    # Wrapped outside the router so that 404/405 answers get the request id and
    # are counted too (Litestar middleware only runs for a matched route).
    app.asgi_handler = RequestContext(HeadAsGet(app.asgi_handler), metrics)
    return app


def _event_hub(settings: Settings, service: Service) -> EventHub:
    async def connect() -> asyncpg.Connection[Any]:
        url = settings.database_listen_url or service.url or settings.database_url
        if url is None:
            raise ConfigError("DATABASE_LISTEN_URL: no database URL to listen on")
        return await asyncpg.connect(
            url, timeout=5, server_settings={"application_name": "kasparro-events"}
        )

    async def fetch_run(run_id: uuid.UUID) -> runs.Run | None:
        return await runs.get_run(service.pool, run_id)

    async def latest_seq() -> int:
        return await changes.latest_seq(service.pool)

    async def notify(payload: str) -> None:
        await service.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    return EventHub(connect, fetch_run, latest_seq, notify)


class _Server(uvicorn.Server):
    """uvicorn's server, ending the event streams as soon as a stop begins.

    uvicorn waits for open responses before it stops the app, and an event
    stream never ends by itself: the stop would wait for its timeout.
    """

    def __init__(self, config: uvicorn.Config, events: EventHub) -> None:
        super().__init__(config)
        self._events = events

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._events.end_streams()
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now (not when uvicorn starts) queues early connections in the
        # backlog instead of refusing them, once "listening" has been announced.
        sock.listen(2048)
    except OSError as exc:
        raise ConfigError(
            f"HOST/PORT: cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announce(settings: Settings, url: str, generated_key: str | None) -> None:
    if settings.log_format == "json":
        if generated_key is not None:
            log.warning(
                "api_key_generated",
                api_key=generated_key,
                hint="set API_KEY to choose the key; it changes at every start",
            )
        log.info("server_listening", url=url, docs=f"{url}/schema")
        return
    key = generated_key if generated_key is not None else "the one set in API_KEY"
    print(
        f"Kasparro listening on {url} (docs {url}/schema); API key: {key} "
        f"(send it as the {API_KEY_HEADER} header)",
        flush=True,
    )


class StopRequested(SystemExit):
    """SIGINT or SIGTERM arrived before the HTTP server was running.

    A SystemExit (code 0): no ``except Exception`` on the way out of a start-up
    step takes it for an error of that step, and asyncio lets it through where
    it arrives in the middle of a callback (any other exception there is only
    logged, and the stop would be lost).
    """

    def __init__(self) -> None:
        super().__init__(0)


class _StopSignals:
    """SIGINT/SIGTERM handling from the first instant of ``serve``.

    Before the HTTP server runs, a signal ends start-up at once (where a step
    is waiting on the database, the migrations, a connection) by raising
    :class:`StopRequested`, except inside :meth:`shielded`, where the stop
    waits for the end of the step. Once the server exists, a signal asks it to
    stop gracefully: uvicorn installs its own handlers while serving and, once
    stopped, raises the captured signal again for the previous handler, which
    is this one, so the re-raised signal ends nothing.
    """

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None
        self._shielded = False
        self._pending = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        server = self.server
        if server is not None:
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True
            server.should_exit = True
        elif self._shielded:
            self._pending = True
        else:
            raise StopRequested

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A step a signal must not cut half way; the stop comes right after it."""
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
        if self._pending:
            raise StopRequested

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _local_url(host: str, port: int) -> str:
    """Where a client on this host reaches a server listening on ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - the wildcard is recognised, not bound
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return _url(host, port)


def _write_address(path: Path, url: str) -> None:
    try:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(url + "\n", encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        log.warning("address_file_not_written", path=str(path), error=exc.strerror or str(exc))


def run_server(settings: Settings, host: str, port: int) -> int:
    """``kasparro serve``: migrate, then serve the API and run the ingestion loop.

    SIGINT and SIGTERM are honoured from the first instant: during start-up
    (the embedded server, the migrations) they end it promptly, once serving
    they stop the service gracefully; either way the exit code is 0.

    Returns:
        0 after a stop (SIGINT or SIGTERM), 1 when the service could not start.

    Raises:
        ConfigError: the database, the sources file or the address is unusable.
    """
    with _StopSignals().installed() as signals:
        try:
            return _serve(settings, host, port, signals)
        except StopRequested:
            log.info("service_stopped_during_startup")
            sys.stdout.flush()
            return 0


def _serve(settings: Settings, host: str, port: int, signals: _StopSignals) -> int:
    configure_logging(settings.log_format, settings.log_level, stream=sys.stdout)
    log.info("service_starting")
    # The embedded server's first start runs initdb: cut half way, it would
    # leave a data directory that no later start can use.
    with signals.shielded():
        url = resolve_database_url(settings)
    run_migrations(url, statement_cache_size=settings.database_statement_cache_size)
    generated: str | None = None
    keys = settings.api_keys
    if not keys:
        if settings.production:  # load_settings refuses this already; never serve keyless
            raise ConfigError("API_KEY: must be set when APP_ENV=production")
        generated = secrets.token_urlsafe(32)
        keys = (generated,)
    settings = dataclasses.replace(settings, database_url=url, api_keys=keys, host=host, port=port)
    app = create_app(settings)
    sock = _bind(host, port)
    address_file = settings.serve_address_file
    try:
        bound_port = int(sock.getsockname()[1])
        if address_file is not None:
            _write_address(address_file, _local_url(host, bound_port))
        _announce(settings, _url(host, bound_port), generated)
        server = _Server(
            uvicorn.Config(
                app,
                interface="asgi3",
                lifespan="on",
                http=BoundedHttpProtocol.with_timeout(settings.http_header_timeout_seconds),
                timeout_keep_alive=settings.http_keep_alive_seconds,
                log_config=None,
                access_log=False,
                server_header=False,
                timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_SECONDS),
            ),
            app.state.events,
        )
        signals.server = server
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:
            # uvicorn exits this way when the lifespan start-up fails (already logged).
            log.error("service_start_failed", code=exc.code)
            return 1
    finally:
        sock.close()
        if address_file is not None:
            address_file.unlink(missing_ok=True)
    if not server.started:
        log.error("service_start_failed")
        return 1
    log.info("service_exited")
    sys.stdout.flush()
    return 0
