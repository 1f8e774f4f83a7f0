"""The run loop: producers per source → bounded queue → one writer, batch by batch.

Each source reads in its own task and puts chunks on a bounded queue, so a slow
database slows the readers down (backpressure) while parsing of the next chunk
overlaps the write of the current one. The writer commits each chunk in one
transaction (raw rows, rejections, unified upserts, checkpoint, run counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from persistence import batches, runs
from persistence.batches import BatchCounts
from persistence.types import Conn
from pipelines.config import SourceConfig
from pipelines.errors import InjectedFailure, RunRecordError, SourceError
from pipelines.prepare import Prepared, prepare
from pipelines.records import Chunk
from pipelines.settings import Settings
from pipelines.sources.files import read_csv, read_json, unread_bytes

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = structlog.get_logger("kasparro.runner")

QUEUE_CHUNKS = 4
STOPPED = "stopped: the service is shutting down"

Progress = Callable[[str, BatchCounts], None]


@dataclass(slots=True)
class _SourceState:
    config: SourceConfig
    cursor: dict[str, Any]
    schema: dict[str, str] | None
    counts: BatchCounts = field(default_factory=BatchCounts)
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_seen: set[tuple[str, str, str | None]] = field(default_factory=set)
    error: str | None = None
    done: bool = False
    task: asyncio.Task[None] | None = None
    insert_mode: batches.InsertMode = field(default_factory=batches.InsertMode)

    @property
    def status(self) -> str:
        return "failed" if self.error is not None or not self.done else "success"


@dataclass(slots=True)
class _End:
    """Marks the end of a source's stream (``error`` set when it failed)."""

    error: str | None = None


def run_status(states: Sequence[_SourceState]) -> str:
    """Contract section 3: success, failed (every source failed) or partial."""
    if not states:
        return "success"
    failed = sum(1 for s in states if s.status == "failed")
    rejected = sum(s.counts.rejected for s in states)
    if failed == len(states):
        return "failed"
    if failed or rejected:
        return "partial"
    return "success"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class Runner:
    """Runs ETL over the declared sources; one run at a time per process."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        settings: Settings,
        sources: list[SourceConfig],
        metrics: Metrics | None,
        *,
        progress: Progress | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.sources = sources
        self.metrics = metrics
        self.progress = progress
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._read_total = 0

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def request_stop(self) -> None:
        """Graceful stop: readers stop, the batch in flight commits, the run is closed."""
        self._stop.set()

    async def run(self, trigger: str, names: Sequence[str] | None = None) -> dict[str, Any]:
        """One run over all sources (or the named ones); returns the run object.

        Source failures are recorded, never raised. Database errors that prevent
        recording the run at all propagate.
        """
        async with self._lock:
            self._stop.clear()
            return await self._run(trigger, names)

    # -- the run ---------------------------------------------------------

    async def _run(self, trigger: str, names: Sequence[str] | None) -> dict[str, Any]:
        wanted = [s for s in self.sources if not names or s.name in names]
        run_id = uuid.uuid4()
        log_ = log.bind(run_id=str(run_id))
        started = time.monotonic()
        self._read_total = 0
        async with self.pool.acquire() as control:
            # Session-level advisory locks live on this connection for the whole
            # run: the run's own (so a crash is detectable) and one per source (so
            # replicas never ingest the same source at once). They end with the
            # session, so a lost connection releases them too.
            closed = await runs.close_interrupted_runs(control)
            for stale in closed:
                log_.warning("run_interrupted_closed", closed_run_id=str(stale))
            await control.execute("SELECT pg_advisory_lock($1)", runs.run_lock_key(run_id))
            mine: list[SourceConfig] = []
            try:
                for source in wanted:
                    key = runs.source_lock_key(source.name)
                    if await control.fetchval("SELECT pg_try_advisory_lock($1)", key):
                        mine.append(source)
                    else:
                        log_.info("source_skipped_locked", source=source.name)
                await runs.open_run(control, run_id, trigger, [s.name for s in mine])
                if self.metrics is not None:
                    self.metrics.running.set(1)
                states = await self._ingest(run_id, mine, log_)
                status = run_status(states)
                await self._close_run(control, run_id, states, status)
            finally:
                if self.metrics is not None:
                    self.metrics.running.set(0)
                await self._unlock(control, run_id, mine)
        run = await runs.get_run(self.pool, run_id)
        assert run is not None
        if self.metrics is not None:
            self.metrics.observe_run(run, await runs.unified_total(self.pool))
        log_.info(
            "etl_run_finished",
            status=status,
            trigger=trigger,
            duration_seconds=round(time.monotonic() - started, 3),
            sources={
                s.config.name: {
                    "status": s.status,
                    "fetched": s.counts.fetched,
                    "raw_inserted": s.counts.raw_inserted,
                    "duplicates": s.counts.duplicates,
                    "rejected": s.counts.rejected,
                    "unified_upserted": s.counts.unified_upserted,
                    "error": s.error,
                }
                for s in states
            },
        )
        return run

    async def _close_run(
        self, control: Conn, run_id: uuid.UUID, states: Sequence[_SourceState], status: str
    ) -> None:
        """Record each source's end and the run's; on a fresh connection if need be.

        Raises:
            RunRecordError: the database cannot be reached to record the end (the
                run is then closed as interrupted by the next start).
        """
        errors = {s.error for s in states if s.status == "failed"}
        run_error = errors.pop() if status == "failed" and len(errors) == 1 else None
        last: BaseException | None = None
        for attempt in range(3):
            try:
                if attempt == 0 and not control.is_closed():
                    await self._write_end(control, run_id, states, status, run_error)
                else:
                    async with self.pool.acquire(timeout=5) as conn:
                        await self._write_end(conn, run_id, states, status, run_error)
                return
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.5 * attempt)
        raise RunRecordError(
            f"database unavailable: cannot record the end of run {run_id} "
            f"({_one_line(last) if last else 'unknown'}); it is closed as interrupted "
            "at the next start"
        )

    @staticmethod
    async def _write_end(
        conn: Conn,
        run_id: uuid.UUID,
        states: Sequence[_SourceState],
        status: str,
        run_error: str | None,
    ) -> None:
        async with conn.transaction():
            for state in states:
                await runs.finish_source(
                    conn,
                    run_id,
                    state.config.name,
                    state.status,
                    state.error if state.status == "failed" else None,
                    state.drift,
                )
            await runs.finish_run(conn, run_id, status, run_error)

    @staticmethod
    async def _unlock(control: Conn, run_id: uuid.UUID, sources: Sequence[SourceConfig]) -> None:
        if control.is_closed():
            return  # the locks ended with the session
        keys = [runs.source_lock_key(s.name) for s in sources] + [runs.run_lock_key(run_id)]
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await control.execute("SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) k", keys)

    async def _ingest(
        self, run_id: uuid.UUID, sources: Sequence[SourceConfig], log_: Any
    ) -> list[_SourceState]:
        committed = await batches.load_checkpoints(self.pool, [s.name for s in sources])
        states = [_SourceState(s, *committed.get(s.name, ({}, None))) for s in sources]
        queue: asyncio.Queue[tuple[_SourceState, Prepared | _End]] = asyncio.Queue(QUEUE_CHUNKS)
        batch_size = self._batch_size()
        http_session = await self._http_session(sources)
        try:
            for state in states:
                state.task = asyncio.create_task(
                    self._produce(state, queue, batch_size, http_session),
                    name=f"kasparro-source-{state.config.name}",
                )
            await self._consume(run_id, states, queue, log_)
        finally:
            for state in states:
                if state.task is not None and not state.task.done():
                    state.task.cancel()
            for state in states:
                if state.task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await state.task
            if http_session is not None:
                await http_session.close()
        return states

    def _batch_size(self) -> int:
        size = self.settings.etl_batch_size
        limit = self.settings.etl_fail_after_records
        if limit is not None:
            # Smaller batches so that the injected failure lands after committed work.
            size = min(size, max(1, (limit + 1) // 2))
        return size

    async def _http_session(self, sources: Sequence[SourceConfig]) -> Any:
        if not any(s.kind == "http" for s in sources):
            return None
        import aiohttp

        return aiohttp.ClientSession()

    def _reader(
        self, state: _SourceState, batch_size: int, http_session: Any
    ) -> AsyncGenerator[Chunk, None]:
        source = state.config
        if source.kind == "csv":
            return read_csv(source, state.cursor, batch_size)
        if source.kind == "json":
            return read_json(source, state.cursor, batch_size)
        from pipelines.sources.http import read_http

        return read_http(source, state.cursor, batch_size, session=http_session)

    def _prepared(
        self, state: _SourceState, batch_size: int, http_session: Any
    ) -> AsyncGenerator[Prepared, None]:
        """The source's chunks, prepared: by a parse process for a large file."""
        source = state.config
        if (
            source.kind in ("csv", "json")
            and unread_bytes(source, state.cursor) >= self.settings.etl_parse_process_min_bytes
        ):
            # Imported here: multiprocessing is not worth a short run's start-up.
            from pipelines.parse_process import prepared_in_process

            return prepared_in_process(source, state.cursor, state.schema, batch_size)
        return self._prepared_in_thread(state, batch_size, http_session)

    async def _prepared_in_thread(
        self, state: _SourceState, batch_size: int, http_session: Any
    ) -> AsyncGenerator[Prepared, None]:
        schema = state.schema
        async with contextlib.aclosing(self._reader(state, batch_size, http_session)) as chunks:
            async for chunk in chunks:
                if self._stop.is_set():
                    return  # not worth preparing: the producer stops at this chunk
                prepared = await asyncio.to_thread(prepare, state.config, chunk, schema)
                schema = prepared.outcome.schema
                yield prepared

    async def _produce(
        self,
        state: _SourceState,
        queue: asyncio.Queue[tuple[_SourceState, Prepared | _End]],
        batch_size: int,
        http_session: Any,
    ) -> None:
        limit = self.settings.etl_fail_after_records
        end = _End()
        complete = False  # the source's final chunk went to the writer
        try:
            stream = self._prepared(state, batch_size, http_session)
            async with contextlib.aclosing(stream) as prepared_chunks:
                async for prepared in prepared_chunks:
                    if self._stop.is_set() or state.error is not None:
                        break  # stopping, or the writer failed this source
                    self._read_total += prepared.fetched
                    if limit is not None and self._read_total >= limit:
                        raise InjectedFailure()
                    await queue.put((state, prepared))
                    complete = prepared.final
                    if prepared.outcome.error is not None:
                        break  # the writer keeps the raw records and fails the source
            if self._stop.is_set() and not complete:
                end = _End(STOPPED)
        except InjectedFailure as exc:
            end = _End(str(exc))
        except SourceError as exc:
            end = _End(_one_line(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reader bug must fail its source, not the run
            log.exception("source_crashed", source=state.config.name)
            end = _End(f"{type(exc).__name__}: {_one_line(exc)}")
        await queue.put((state, end))

    async def _consume(
        self,
        run_id: uuid.UUID,
        states: Sequence[_SourceState],
        queue: asyncio.Queue[tuple[_SourceState, Prepared | _End]],
        log_: Any,
    ) -> None:
        open_sources = len(states)
        injected = False
        while open_sources:
            state, item = await queue.get()
            if isinstance(item, _End):
                open_sources -= 1
                if item.error == InjectedFailure().args[0]:
                    injected = True
                    for other in states:
                        if other.error is None:
                            other.error = item.error
                        self._stop.set()
                elif item.error is not None and state.error is None:
                    state.error = item.error
                if state.error is None:
                    state.done = True
                if item.error is not None:
                    log_.warning("source_failed", source=state.config.name, error=state.error)
                continue
            if state.error is not None or injected or (self._stop.is_set() and not item.final):
                if state.error is None:
                    state.error = STOPPED
                continue
            try:
                counts = await self._write(run_id, state, item)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                state.error = f"database error: {_one_line(exc)}"
                log_.error("batch_failed", source=state.config.name, error=state.error)
                continue
            state.counts.add(counts)
            if self.progress is not None:
                self.progress(state.config.name, state.counts)

    async def _write(
        self, run_id: uuid.UUID, state: _SourceState, prepared: Prepared
    ) -> BatchCounts:
        source = state.config
        outcome = prepared.outcome
        new_events: list[dict[str, Any]] = []
        for event in outcome.events:
            key = (event.kind, event.field, event.new_field)
            if key not in state.drift_seen:
                state.drift_seen.add(key)
                new_events.append(event.to_dict())
        ingested_at = datetime.now(UTC)
        counts = BatchCounts(fetched=prepared.fetched)
        cols = prepared.columns
        if outcome.error is None:
            async with self.pool.acquire() as conn:
                (
                    inserted,
                    counts.rejected,
                    counts.unified_upserted,
                ) = await batches.write_batch_adaptive(
                    conn,
                    source.raw_table,
                    cols,
                    state.insert_mode,
                    source=source.name,
                    priority=source.priority,
                    run_id=run_id,
                    ingested_at=ingested_at,
                    fetched=counts.fetched,
                    cursor=prepared.cursor,
                    schema=outcome.schema,
                    drift=new_events,
                )
            counts.raw_inserted = inserted
            counts.duplicates = counts.fetched - inserted
        else:
            # The raw records are kept; nothing else of this batch moves forward.
            async with self.pool.acquire() as conn, conn.transaction():
                stored = await batches.insert_raw(
                    conn, source.raw_table, source.name, run_id, cols, ingested_at
                )
                counts.raw_inserted = len(stored)
                counts.duplicates = counts.fetched - counts.raw_inserted
                await batches.insert_drift(conn, run_id, source.name, new_events)
                await batches.add_counts(conn, run_id, source.name, counts)
        state.drift.extend(new_events)
        for drift_event in new_events:
            log.warning("schema_drift", source=source.name, run_id=str(run_id), **drift_event)
        if outcome.error is not None:
            # The raw records are kept; nothing else of this batch moves forward.
            state.error = outcome.error
        else:
            state.schema = outcome.schema
            state.cursor = prepared.cursor
        log.debug(
            "batch_committed",
            source=source.name,
            run_id=str(run_id),
            fetched=counts.fetched,
            raw_inserted=counts.raw_inserted,
            duplicates=counts.duplicates,
            rejected=counts.rejected,
            unified_upserted=counts.unified_upserted,
        )
        return counts
