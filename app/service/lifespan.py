"""The service's lifespan component: database pools and the ingestion loop.

Entered when the app starts and left when it stops, like Litestar's own channels
plugin: start-up opens the pools and starts the loop in the background (the API
answers at once); shutdown asks the run in progress to close, waits for it with a
bound, cancels what is left and closes the pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg
import structlog

from app.service.child_run import SubprocessRunner
from app.service.page_cache import PageCache
from app.service.schedule import DEFAULT_STOP_TIMEOUT, IngestionLoop, RunnerLike
from config.settings import Settings
from config.sources import SourceConfig
from observability.metrics import Metrics
from persistence import metric_totals, reads
from persistence.database import create_pool, resolve_database_url
from pipelines.runner import Runner

log = structlog.get_logger("kasparro.service")

HEALTH_TIMEOUT_SECONDS = 1.0
"""The database check of ``/health`` gives up after this long."""
METRICS_TIMEOUT_SECONDS = 2.0
"""A scrape gives up reading the etl_* figures after this long (and says so)."""
POOL_CLOSE_TIMEOUT_SECONDS = 5.0
PRIMARY_POOL_SIZE = 2
"""Connections of the service's primary pool: the health check, and releasing the
run of a child that had to be killed."""


def package_version() -> str:
    """The installed version of the project, or ``0+unknown`` when run from a checkout."""
    try:
        return importlib.metadata.version("kasparro")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class DatabaseCheck:
    ok: bool
    last_status: str | None
    latency_ms: float | None


class Service:
    """Owns the pools and the ingestion loop for the lifetime of the app.

    Args:
        settings: the service settings.
        sources: the declared sources, in file order.
        metrics: the process's metrics.
        pool: an existing pool to use (left open on exit); by default one is
            opened on ``settings.database_url`` or the embedded server.
        runner: the run executor; by default a :class:`pipelines.runner.Runner`.
        stop_timeout: how long shutdown waits for the run in progress.
    """

    def __init__(
        self,
        settings: Settings,
        sources: list[SourceConfig],
        metrics: Metrics,
        *,
        pool: asyncpg.Pool[Any] | None = None,
        runner: RunnerLike | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.source_names = [s.name for s in sources]
        self.metrics = metrics
        self.version = package_version()
        self.data_pages = PageCache(settings.data_cache_bytes)
        """Rendered ``/data`` pages, served again while the data is unchanged."""
        self._given_pool = pool
        self._given_runner = runner
        self._stop_timeout = stop_timeout
        self._pool: asyncpg.Pool[Any] | None = None
        self._read_pool: asyncpg.Pool[Any] | None = None
        self._read_gate: asyncio.Semaphore | None = None
        self._owned: list[asyncpg.Pool[Any]] = []
        self._url: str | None = None
        self._loop: IngestionLoop | None = None

    @property
    def pool(self) -> asyncpg.Pool[Any]:
        """The primary pool: ingestion and the health check."""
        if self._pool is None:
            raise RuntimeError("the service is not started")
        return self._pool

    @property
    def read_pool(self) -> asyncpg.Pool[Any]:
        """The pool of the read endpoints (``DATABASE_READ_URL`` when set)."""
        if self._read_pool is None:
            raise RuntimeError("the service is not started")
        return self._read_pool

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[asyncpg.Pool[Any]]:
        """The read pool, entered first come, first served.

        asyncpg hands a released connection to whichever request asks next, and a
        request that was already waiting queues again at the back: under load a few
        requests waited hundreds of milliseconds while the median took ten. The gate
        admits as many requests as the pool has connections, in arrival order
        (asyncio's semaphore lets no newcomer pass a waiter), so none of them waits
        inside the pool.
        """
        if self._read_gate is None:
            raise RuntimeError("the service is not started")
        async with self._read_gate:
            yield self.read_pool

    @property
    def url(self) -> str | None:
        """The database URL in use (the embedded server's too); ``None`` when a pool
        was handed in."""
        return self._url

    @property
    def loop(self) -> IngestionLoop:
        if self._loop is None:
            raise RuntimeError("the service is not started")
        return self._loop

    async def __aenter__(self) -> Service:
        try:
            await self._open_pools()
            runner = self._given_runner or self._default_runner()
            self._loop = IngestionLoop(
                runner,
                self.metrics,
                on_startup=self.settings.etl_on_startup,
                interval_seconds=self.settings.etl_interval_seconds,
                stop_timeout=self._stop_timeout,
            )
            self._loop.start()
        except BaseException:
            await self._close_pools()
            raise
        log.info(
            "service_started",
            etl_on_startup=self.settings.etl_on_startup,
            etl_interval_seconds=self.settings.etl_interval_seconds,
            sources=self.source_names,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        interrupted = await self._loop.stop() if self._loop is not None else False
        await self._close_pools()
        log.info("service_stopped", run_interrupted=interrupted)

    def _default_runner(self) -> RunnerLike:
        if self._url is None:
            # A pool handed in (tests, embedding): runs stay in this process.
            return Runner(self.pool, self.settings, self.sources, self.metrics)
        # Runs go to a child process so that parsing never competes with requests
        # for this interpreter (app/service/child_run.py).
        settings = dataclasses.replace(self.settings, database_url=self._url)
        return SubprocessRunner(settings, self.pool, self.metrics)

    async def _open_pools(self) -> None:
        cache_size = self.settings.database_statement_cache_size
        if self._given_pool is not None:
            self._pool = self._given_pool
        else:
            url = self.settings.database_url
            if url is None:
                # Starting the embedded server blocks; keep the event loop free.
                url = await asyncio.to_thread(resolve_database_url, self.settings)
            self._url = url
            # The health check and the release of a killed run's child; runs
            # have a pool of their own (DATABASE_RUN_POOL_SIZE), in the child.
            self._pool = await create_pool(
                url, max_size=PRIMARY_POOL_SIZE, statement_cache_size=cache_size
            )
            self._owned.append(self._pool)
        read_url = self.settings.database_read_url or self._url
        if read_url is not None:
            # A pool of its own, so a burst of reads never starves the health
            # check and the runs' bookkeeping.
            self._read_pool = await create_pool(
                read_url,
                max_size=self.settings.database_pool_size,
                statement_cache_size=cache_size,
            )
            self._owned.append(self._read_pool)
        else:
            self._read_pool = self._pool
        self._read_gate = asyncio.Semaphore(self._read_pool.get_max_size())

    async def _close_pools(self) -> None:
        for pool in self._owned:
            try:
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_SECONDS)
            except Exception as exc:
                log.warning("pool_close_forced", error=str(exc) or type(exc).__name__)
                pool.terminate()
        self._owned.clear()

    @contextlib.asynccontextmanager
    async def _bounded_connection(self, seconds: float) -> AsyncIterator[Any]:
        """A primary-pool connection for at most ``seconds``, waiting included. One
        that fails or is cut mid-query is terminated rather than put back, so the
        pool opens a fresh one once the database is reachable again."""
        async with asyncio.timeout(seconds):
            conn = await self.pool.acquire()
            try:
                yield conn
            except BaseException:
                conn.terminate()
                raise
            finally:
                await self.pool.release(conn)

    async def check_database(self) -> DatabaseCheck:
        """One bounded round trip on the primary pool."""
        started = time.perf_counter()
        try:
            async with self._bounded_connection(HEALTH_TIMEOUT_SECONDS) as conn:
                status = await reads.ping(conn)
        except Exception as exc:
            log.warning("db_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return DatabaseCheck(ok=False, last_status=None, latency_ms=None)
        latency = round((time.perf_counter() - started) * 1000, 3)
        return DatabaseCheck(ok=True, last_status=status, latency_ms=latency)

    async def metric_totals(self) -> metric_totals.EtlTotals | None:
        """The etl_* figures from the primary database, or ``None`` when it does
        not answer within :data:`METRICS_TIMEOUT_SECONDS` (a scrape then still
        serves this process's own metrics)."""
        try:
            async with self._bounded_connection(METRICS_TIMEOUT_SECONDS) as conn:
                return await metric_totals.read_totals(conn)
        except Exception as exc:
            log.warning("metrics_db_read_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return None
