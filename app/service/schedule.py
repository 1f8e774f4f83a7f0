"""The ingestion loop the service runs in the background.

One task: the startup run (when enabled), then a run every interval. A run that
raises is logged, counted and shown in ``/health``; the loop goes on to the next
interval, so neither the API nor later runs depend on one bad run.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Protocol

import structlog

from config.errors import KasparroError
from observability.metrics import Metrics
from persistence.runs import Run
from pipelines.runner import Skipped

log = structlog.get_logger("kasparro.loop")

DEFAULT_STOP_TIMEOUT = 6.0
"""How long a stop waits for the run in progress to close itself before cancelling it."""


class RunnerLike(Protocol):
    """What the loop needs of :class:`pipelines.runner.Runner`."""

    async def run(
        self,
        trigger: str,
        names: Sequence[str] | None = None,
        *,
        run_id: uuid.UUID | None = None,
    ) -> Run | Skipped:
        """The run object, or :class:`Skipped` when nothing ran."""
        ...

    def request_stop(self) -> None: ...

    @property
    def running(self) -> bool: ...


class RunInProgressError(Exception):
    """A run of this process is already going (or about to start)."""


class StoppingError(Exception):
    """The service is stopping: no new run starts."""


class IngestionLoop:
    """Schedules runs; entered and left by the service's lifespan.

    Attributes:
        state: ``disabled`` (nothing scheduled), ``scheduled`` (waiting for the next
            run), ``running``, ``finished`` (the startup run was the only one),
            ``crashed`` (the last attempt raised; kept until a run completes) or
            ``stopping``.
        last_error: one line about the last crash, ``None`` after a completed run.
        last_status: status of the last run this loop completed (a skipped
            attempt, which took no source, is no run and changes nothing).
    """

    def __init__(
        self,
        runner: RunnerLike,
        metrics: Metrics,
        *,
        on_startup: bool,
        interval_seconds: float,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.on_startup = on_startup
        self.interval_seconds = interval_seconds
        self.stop_timeout = stop_timeout
        self.state = "disabled"
        self.last_error: str | None = None
        self.last_status: str | None = None
        self.runs_completed = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_demand: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.on_startup or self.interval_seconds > 0

    def start(self) -> None:
        """Start the background task (no-op when nothing is scheduled)."""
        if not self.enabled or self._task is not None:
            return
        self.state = "scheduled"
        self._task = asyncio.create_task(self._main(), name="kasparro-ingestion-loop")

    async def stop(self) -> bool:
        """Ask the run in progress to close, wait for it with a bound, then cancel.

        Returns:
            ``True`` when a run had to be cancelled (its record may still say
            ``running`` and is closed as interrupted at the next start).
        """
        self._stopping.set()
        tasks = {t for t in (self._task, self._on_demand) if t is not None and not t.done()}
        if not tasks:
            return False
        if self._task in tasks:
            self.state = "stopping"
        self.runner.request_stop()
        _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
        if not pending:
            return False
        log.warning("etl_loop_stop_timeout", timeout_seconds=self.stop_timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return True

    async def _main(self) -> None:
        try:
            if self.on_startup:
                await self._attempt("startup")
            if self.interval_seconds <= 0:
                if self.state != "crashed":
                    self.state = "finished"
                return
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_seconds):
                        await self._stopping.wait()
                if self._stopping.is_set():
                    return
                await self._attempt("schedule")
        except Exception as exc:  # a bug in the loop itself: report it, keep the API up
            self._crashed(exc)

    async def _attempt(self, trigger: str) -> None:
        # Checked right before the run: the runner clears its stop flag when a run
        # begins, so a stop requested before that moment must be honoured here.
        if self._stopping.is_set():
            return
        if self.on_demand_pending:
            # A run asked for over HTTP is about to start: it stands for this one.
            log.info("etl_scheduled_run_skipped", reason="a run on demand is starting")
            return
        previous = self.state
        self.state = "running"
        try:
            run = await self.runner.run(trigger)
        except Exception as exc:
            self._crashed(exc)
            return
        if isinstance(run, Skipped):
            log.info("etl_attempt_skipped", trigger=trigger, busy=sorted(run.sources))
            if not self._stopping.is_set():
                self.state = "crashed" if previous == "crashed" else "scheduled"
            return
        self.last_status = run.status
        self.last_error = None
        self.runs_completed += 1
        if not self._stopping.is_set():
            self.state = "scheduled"

    def _crashed(self, exc: BaseException) -> None:
        message = " ".join(str(exc).split()) or type(exc).__name__
        self.last_error = f"{type(exc).__name__}: {message}"[:500]
        self.state = "crashed"
        self.metrics.loop_crashes.inc()
        # An expected failure (the database went away) is one clear line; anything
        # else is a bug and keeps its traceback.
        expected = isinstance(exc, KasparroError)
        log.error("etl_loop_crashed", error=self.last_error, exc_info=None if expected else exc)

    # -- runs on demand (POST /runs) ---------------------------------------

    @property
    def on_demand_pending(self) -> bool:
        """A run on demand was started and has not finished."""
        return self._on_demand is not None and not self._on_demand.done()

    def start_now(self, trigger: str, names: Sequence[str] | None = None) -> uuid.UUID:
        """Start a run in the background at once, outside the schedule.

        The run goes through the same runner as the scheduled ones (the same
        per-source coordination with other processes). Its id is drawn here, so
        the caller knows it before the run is recorded.

        Raises:
            RunInProgressError: a run of this process is going or about to start.
            StoppingError: the service is stopping.
        """
        if self._stopping.is_set():
            raise StoppingError()
        # No await between the check and the task: nothing can slip in between.
        if self.runner.running or self.on_demand_pending:
            raise RunInProgressError()
        run_id = uuid.uuid4()
        self._on_demand = asyncio.create_task(
            self._run_on_demand(trigger, names, run_id), name="kasparro-run-on-demand"
        )
        return run_id

    async def _run_on_demand(
        self, trigger: str, names: Sequence[str] | None, run_id: uuid.UUID
    ) -> None:
        if self._stopping.is_set():
            return
        try:
            run = await self.runner.run(trigger, names, run_id=run_id)
        except Exception as exc:
            self._crashed(exc)
            return
        if isinstance(run, Skipped):
            # Every source was held by a run elsewhere: nothing was recorded.
            log.info("etl_attempt_skipped", trigger=trigger, busy=sorted(run.sources))
            return
        self.last_status = run.status
        self.last_error = None
        self.runs_completed += 1
        if self.state == "crashed":
            # A completed run clears the crash: back to what the schedule is doing.
            if self._task is None:
                self.state = "disabled"
            else:
                self.state = "finished" if self._task.done() else "scheduled"
