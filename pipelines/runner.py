"""The run loop: producers per source → bounded queue → one writer, batch by batch.

Each source reads in its own task and puts chunks on a bounded queue, so a slow
database slows the readers down (backpressure) while parsing of the next chunk
overlaps the write of the current one. The writer commits each chunk in one
transaction (raw rows, rejections, unified upserts, checkpoint, run counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import structlog

from config.errors import InjectedFailure, RunRecordError, SourceError
from config.settings import Settings
from config.sources import SourceConfig, id_sources, load_sources
from persistence import batches, changes, raw, runs
from persistence.batches import BatchCounts
from persistence.runs import Run
from persistence.types import Conn
from pipelines.identity import Resolver, load_identity
from pipelines.prepare import Prepared, prepare
from pipelines.records import Chunk
from pipelines.sources.files import read_csv, read_json, unread_bytes

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = structlog.get_logger("kasparro.runner")

QUEUE_CHUNKS = 4
STOPPED = "stopped: the service is shutting down"
INTERRUPTED = "interrupted"
"""The error of a source whose lease another run freed (its run looked dead)."""
SKIPPED = "skipped"
"""The status of a run that could take no source: nothing of it is recorded."""
CLEANUP_SECONDS = 10.0
"""Bound of each bookkeeping step (open, close, release) on a slow or full pool."""
PRUNE_SECONDS = 300.0
"""Bound of a pass over the change feed's log (about 1.5 s per million entries here)."""
LEASE_OWNER = f"{socket.gethostname()}:{os.getpid()}"
"""Who holds a lease, as ``etl_leases.owner`` shows it to operators."""

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
    """Success, failed (every source failed) or partial (anything in between, or
    records rejected); a run always has at least one source."""
    failed = sum(1 for s in states if s.status == "failed")
    rejected = sum(s.counts.rejected for s in states)
    if failed == len(states):
        return "failed"
    if failed or rejected:
        return "partial"
    return "success"


class BusySource(msgspec.Struct):
    """A source another run holds."""

    held_by: str | None
    """The id of the run that holds it."""
    status: str = "busy"


class Skipped(msgspec.Struct):
    """What a run that could take no source answers (it is recorded nowhere)."""

    sources: dict[str, BusySource]
    status: str = SKIPPED


def skipped(busy: dict[str, uuid.UUID | None]) -> Skipped:
    return Skipped({name: BusySource(_text(run)) for name, run in busy.items()})


def _text(run_id: uuid.UUID | None) -> str | None:
    return None if run_id is None else str(run_id)


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
        self._resolver: Resolver | None = None

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def request_stop(self) -> None:
        """Graceful stop: readers stop, the batch in flight commits, the run is closed."""
        self._stop.set()

    async def run(
        self, trigger: str, names: Sequence[str] | None = None, *, run_id: uuid.UUID | None = None
    ) -> Run | Skipped:
        """One run over all sources (or the named ones); returns the run object.

        When another run holds every source, nothing is recorded and the answer
        is :class:`Skipped` (with no sources when a stop was asked before the run
        began).

        Source failures are recorded, never raised. Database errors that prevent
        recording the run at all propagate.
        """
        async with self._lock:
            run_id = run_id or uuid.uuid4()
            # Every line written during the run carries its id, the lines of the
            # tasks and threads it starts too (they copy the context).
            try:
                with structlog.contextvars.bound_contextvars(run_id=str(run_id)):
                    return await self._run(trigger, names, run_id)
            finally:
                # Cleared after the run, not before: a stop asked while the run
                # was being set up (SIGTERM to `etl run`, say) is not lost.
                self._stop.clear()

    # -- the run ---------------------------------------------------------

    async def _run(
        self, trigger: str, names: Sequence[str] | None, run_id: uuid.UUID
    ) -> Run | Skipped:
        wanted = [s for s in self.sources if not names or s.name in names]
        log_ = log.bind(run_id=str(run_id))
        started = time.monotonic()
        self._read_total = 0
        await self._close_interrupted(run_id, log_)
        if self._stop.is_set():
            log_.info("etl_run_stopped_before_start", trigger=trigger)
            return skipped({})
        async with self.pool.acquire(timeout=CLEANUP_SECONDS) as conn:
            opened = await runs.open_run(
                conn,
                run_id,
                trigger,
                [s.name for s in wanted],
                owner=LEASE_OWNER,
                lease_seconds=self.settings.etl_lease_seconds,
            )
        for name, holder in opened.busy.items():
            log_.info("source_skipped_busy", source=name, held_by=_text(holder))
        if not opened.taken:
            log_.info("etl_run_skipped", trigger=trigger, busy=sorted(opened.busy))
            return skipped(opened.busy)
        log_.info("etl_run_started", trigger=trigger, sources=opened.taken)
        committed = await batches.load_checkpoints(self.pool, opened.taken)
        states = [
            _SourceState(s, *committed.get(s.name, ({}, None)))
            for s in wanted
            if s.name in opened.taken
        ]
        heartbeat = asyncio.create_task(self._heartbeat(run_id, states, log_))
        try:
            await self._ingest(run_id, states, log_)
            status = run_status(states)
            await self._close_run(run_id, states, status)
        except BaseException:
            # Cancelled, or the end could not be recorded: free the sources now
            # rather than when the leases expire.
            await self._abandon(run_id, log_)
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        await self._prune_feed(log_)
        run = await runs.get_run(self.pool, run_id)
        assert run is not None
        log_.info(
            "etl_run_finished",
            status=run.status,
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

    async def _close_interrupted(self, run_id: uuid.UUID, log_: Any) -> None:
        """Close the runs of processes that are gone, within a bound; a failure
        leaves them for the next run (their sources stay busy meanwhile)."""
        try:
            async with (
                asyncio.timeout(CLEANUP_SECONDS),
                self.pool.acquire(timeout=CLEANUP_SECONDS) as conn,
            ):
                closed = await runs.close_interrupted_runs(conn)
        except (asyncpg.LockNotAvailableError, TimeoutError) as exc:
            log_.warning("run_close_interrupted_failed", error=_one_line(exc))
            return
        for stale in closed:
            # A line of the run it ends, as much as of the run that ended it.
            log_.warning("run_interrupted_closed", run_id=str(stale), closed_by_run_id=str(run_id))

    async def _abandon(self, run_id: uuid.UUID, log_: Any) -> None:
        """Release this run's leases and close it as interrupted, within a bound."""
        try:
            async with (
                asyncio.timeout(CLEANUP_SECONDS),
                self.pool.acquire(timeout=CLEANUP_SECONDS) as conn,
            ):
                closed = await runs.close_interrupted_runs(conn, release=run_id)
        except Exception as exc:  # the leases expire on their own
            log_.warning("run_release_failed", error=_one_line(exc))
            return
        for stale in closed:
            # A line of the run it ends, as much as of the run that ended it.
            log_.warning("run_interrupted_closed", run_id=str(stale), closed_by_run_id=str(run_id))

    async def _heartbeat(
        self, run_id: uuid.UUID, states: Sequence[_SourceState], log_: Any
    ) -> None:
        """Renew the run's leases every third of their life; a source whose lease
        went (it expired and another run freed it) stops at once."""
        lease = self.settings.etl_lease_seconds
        every = lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                async with (
                    asyncio.timeout(every),
                    self.pool.acquire(timeout=every) as conn,
                ):
                    held = await runs.renew_leases(conn, run_id, lease)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log_.warning("lease_renewal_failed", error=_one_line(exc))
                continue
            for state in states:
                if state.config.name not in held and state.error != INTERRUPTED:
                    state.error = INTERRUPTED
                    log_.warning("source_lease_lost", source=state.config.name)

    async def _close_run(
        self, run_id: uuid.UUID, states: Sequence[_SourceState], status: str
    ) -> None:
        """Record each source's end and the run's, and free the sources.

        Raises:
            RunRecordError: the database cannot be reached to record the end (the
                leases then expire and the run is closed as interrupted).
        """
        errors = {s.error for s in states if s.status == "failed"}
        run_error = errors.pop() if status == "failed" and len(errors) == 1 else None
        last: BaseException | None = None
        for attempt in range(3):
            try:
                async with (
                    asyncio.timeout(CLEANUP_SECONDS),
                    self.pool.acquire(timeout=CLEANUP_SECONDS) as conn,
                ):
                    await self._write_end(conn, run_id, states, status, run_error)
                return
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.5 * attempt)
        raise RunRecordError(
            f"database unavailable: cannot record the end of run {run_id} "
            f"({_one_line(last) if last else 'unknown'}); it is closed as interrupted "
            "once its leases expire"
        )

    async def _prune_feed(self, log_: Any) -> None:
        """Delete the change feed's stale entries when enough have gathered; a
        failure leaves them to a later run (readers skip them meanwhile)."""
        try:
            async with asyncio.timeout(PRUNE_SECONDS):
                gone = await changes.prune_feed(self.pool)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log_.warning("feed_prune_failed", error=_one_line(exc))
            return
        if gone:
            log_.info("feed_pruned", entries=gone)

    @staticmethod
    async def _write_end(
        conn: Conn,
        run_id: uuid.UUID,
        states: Sequence[_SourceState],
        status: str,
        run_error: str | None,
    ) -> None:
        async with conn.transaction():
            # Leases first: the order in which close_interrupted_runs locks rows.
            await runs.release_leases(conn, run_id)
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

    async def _ingest(self, run_id: uuid.UUID, states: Sequence[_SourceState], log_: Any) -> None:
        sources = [s.config for s in states]
        # Identity is decided against every declared source, run or not; the
        # identity file is read again each run, so a changed one applies to new keys.
        declared = id_sources(load_sources(self.settings))
        rules = load_identity(self.settings.identity_file, self.settings.sources_file, declared)
        self._resolver = Resolver(rules, declared)
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
        # Whole documents are read again every run: what raw holds is left out early.
        stored = functools.partial(raw.stored_hashes, self.pool, source.raw_table, source.name)
        if source.kind == "json":
            return read_json(source, state.cursor, batch_size, stored=stored)
        from pipelines.sources.http import read_http

        return read_http(source, state.cursor, batch_size, session=http_session, stored=stored)

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
            except asyncpg.ObjectNotInPrerequisiteStateError:
                # The source was closed as interrupted (its lease had expired):
                # the batch was refused whole.
                state.error = INTERRUPTED
                log_.warning("source_lease_lost", source=state.config.name)
                continue
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
            assert self._resolver is not None
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
                    resolver=self._resolver,
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
