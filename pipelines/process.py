"""Runs in a child process: the service's ingestion, away from its event loop.

Parsing, transforming and encoding a batch are CPU work that holds the GIL; in
the service's own interpreter they would queue behind and in front of every
request, and reads would slow down by several times while a large run goes on.
So the service hands each run to a child process (``python -m
pipelines.process``) and keeps only the waiting:

- the job (settings, sources, trigger, source names) goes to the child on its
  standard input, pickled: no file ever holds the settings, keys included;
- the child runs :class:`pipelines.runner.Runner` on a pool of its own and
  writes the outcome (the run object, or the error that ended the run) to a
  result file in a private temporary folder;
- the pipe stays open for the run: a line on it asks the child to stop
  gracefully (the batch in flight commits and the run is closed), and its end,
  when the service is gone, does the same, so a killed service never leaves an
  orphan ingesting on; a stop asked while the child is still starting waits in
  the pipe instead of being lost. SIGTERM and SIGINT stop it the same way;
- the parent counts the run's metrics from the run object it gets back;
- a child that had to be killed (a stop that ran out of time, a cancelled
  run) or died by a signal can leave database sessions behind: a backend only
  learns that its client is gone when it next reads from it, so a statement
  under way, or waiting for a lock, would carry on and could still commit, and
  the run's advisory lock would keep the run looking alive meanwhile. The
  parent terminates the sessions the child opened (they carry a name drawn
  for the run in their ``application_name``) and closes the run as
  interrupted before it lets the run go.

The child's log lines go to the service's own standard output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import structlog

from pipelines import errors
from pipelines.config import SourceConfig
from pipelines.errors import DatabaseUnavailableError, InjectedFailure, KasparroError
from pipelines.priority import lower_priority
from pipelines.settings import Settings

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = structlog.get_logger("kasparro.process")

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
STOP_LINE = b"stop\n"
"""What the service writes on the child's standard input to stop the run."""
END_SESSIONS_SECONDS = 3.0
"""How long the parent tries to end a killed child's database sessions and close its run."""


@dataclass(frozen=True, slots=True)
class Job:
    """What one run in a child process needs; ``settings.database_url`` is set."""

    settings: Settings
    sources: list[SourceConfig]
    trigger: str
    names: tuple[str, ...] | None
    session_name: str = "kasparro"
    """The ``application_name`` of the child's database sessions: drawn per run,
    so that no other run's sessions (another replica's, say) share it."""


class Outcome(msgspec.Struct, frozen=True):
    """The child's answer: a run object, or why there is none."""

    run: dict[str, Any] | None = None
    unified_rows: int | None = None
    error: str | None = None
    error_type: str | None = None
    """The class of an error the project raises on purpose (``None``: a bug)."""


class ChildRunError(KasparroError):
    """A run in the child process ended without a run object."""


class ChildCrashError(Exception):
    """The child process died or answered nothing: a bug, not an expected failure."""


class ProcessRunner:
    """Runs each ETL run in a child process; the service's loop uses it like a Runner.

    Args:
        settings: the service settings, with ``database_url`` resolved (the
            embedded server's URL when that is in use).
        sources: the declared sources.
        metrics: the service's metrics, counted from each run object.
    """

    def __init__(self, settings: Settings, sources: list[SourceConfig], metrics: Metrics) -> None:
        if settings.database_url is None:
            raise ValueError("a child process needs the database URL resolved")
        self.settings = settings
        self.sources = sources
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self._stop_requested = False

    @property
    def running(self) -> bool:
        return self._lock.locked()

    @property
    def pid(self) -> int | None:
        """The process id of the run's child while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def request_stop(self) -> None:
        """Graceful stop: the child commits the batch in flight and closes the run."""
        self._stop_requested = True
        process = self._process
        if process is None or process.returncode is not None or process.stdin is None:
            return
        if not process.stdin.is_closing():
            process.stdin.write(STOP_LINE)

    async def run(self, trigger: str, names: Sequence[str] | None = None) -> dict[str, Any]:
        """One run in a child process; returns its run object.

        Raises:
            KasparroError: the run ended without a run object for an expected
                reason, raised as the class the child raised
                (:class:`DatabaseUnavailableError`, :class:`RunRecordError`...).
            ChildCrashError: the child died without answering, or hit a bug.
        """
        async with self._lock:
            self._stop_requested = False
            job = Job(
                self.settings,
                self.sources,
                trigger,
                tuple(names) if names else None,
                session_name=f"kasparro-run-{uuid.uuid4().hex[:16]}",
            )
            with tempfile.TemporaryDirectory(prefix="kasparro-run-") as folder:
                result = Path(folder) / "outcome.json"
                returncode = await self._spawn_and_wait(job, result)
                outcome = _read_outcome(result)
            if outcome is None:
                raise ChildCrashError(
                    f"the ingestion process exited with {returncode} and no result"
                )
            if outcome.run is None:
                raise _error_of(outcome)
            self.metrics.observe_run(outcome.run, outcome.unified_rows)
            return outcome.run

    async def _spawn_and_wait(self, job: Job, result: Path) -> int:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipelines.process",
            str(result),
            stdin=asyncio.subprocess.PIPE,
            env=env,
            # Its own session: a Ctrl-C on the terminal reaches the service, which
            # then stops the child gracefully, instead of both at once.
            start_new_session=True,
        )
        self._process = process
        self.metrics.running.set(1)
        try:
            assert process.stdin is not None
            # The job, length first, then the pipe stays open: a stop is a line on it.
            data = pickle.dumps(job)
            process.stdin.write(len(data).to_bytes(8, "big") + data)
            if self._stop_requested:
                self.request_stop()
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            return await process.wait()
        except BaseException:
            # Cancelled (a stop that ran out of time) or failed: never leave the
            # child behind. Its run is closed as interrupted by the service.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            raise
        finally:
            if process.returncode is not None and process.returncode < 0:
                # Killed, by us or by a signal from elsewhere: its sessions may outlive it.
                await self._after_kill(job.session_name)
            self.metrics.running.set(0)
            self._process = None

    async def _after_kill(self, name: str) -> None:
        """Terminate the database sessions called ``name``, wait until they are
        gone, then close the run they leave behind as interrupted (its lock went
        with them), so that ``/runs`` and ``/health`` do not show it running."""
        from persistence import runs

        assert self.settings.database_url is not None
        ended = 0
        closed: list[uuid.UUID] = []
        try:
            async with asyncio.timeout(END_SESSIONS_SECONDS):
                conn = await asyncpg.connect(self.settings.database_url)
                try:
                    while left := await conn.fetchval(_TERMINATE_SESSIONS, name):
                        ended = max(ended, left)
                        await asyncio.sleep(0.02)
                    closed = await runs.close_interrupted_runs(conn)
                finally:
                    await conn.close()
        except Exception as exc:  # the database is away: its sessions are gone or go with it
            log.warning("run_sessions_not_ended", application_name=name, error=_one_line(exc))
            return
        if ended:
            log.warning("run_sessions_ended", application_name=name, sessions=ended)
        for run_id in closed:
            log.warning("run_interrupted_closed", closed_run_id=str(run_id))


# Signalled sessions stay listed until they exit: counted again until none is left.
_TERMINATE_SESSIONS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE application_name = $1 AND pid <> pg_backend_pid()
"""


def _error_of(outcome: Outcome) -> Exception:
    """The child's error as the parent raises it: the same class when it is ours."""
    message = outcome.error or "the ingestion process gave no run"
    if outcome.error_type is None:
        return ChildCrashError(message)
    cls = getattr(errors, outcome.error_type, None)
    if isinstance(cls, type) and issubclass(cls, KasparroError) and cls is not InjectedFailure:
        return cls(message)
    return ChildRunError(message)


def _read_outcome(path: Path) -> Outcome | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Outcome)
    except (OSError, msgspec.DecodeError):
        return None


def _write_outcome(path: Path, outcome: Outcome) -> None:
    partial = path.with_suffix(".partial")
    partial.write_bytes(msgspec.json.encode(outcome))
    partial.replace(path)


# -- the child ------------------------------------------------------------------


async def _child(job: Job) -> Outcome:
    from persistence import runs
    from persistence.database import create_pool
    from pipelines.runner import Runner

    assert job.settings.database_url is not None
    pool = await create_pool(
        job.settings.database_url,
        max_size=4,
        backend_nice=job.settings.etl_nice,
        application_name=job.session_name,
    )
    try:
        # No metrics here: the service counts the run from the run object.
        runner = Runner(pool, job.settings, job.sources, None)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runner.request_stop)
        task = asyncio.create_task(runner.run(job.trigger, job.names))
        # One step of the run clears its stop flag; a stop read after that holds.
        await asyncio.sleep(0)
        threading.Thread(
            target=_watch_pipe, args=(loop, runner.request_stop), name="stop-pipe", daemon=True
        ).start()
        run = await task
        unified: int | None = None
        with contextlib.suppress(Exception):
            unified = await runs.unified_total(pool)
        return Outcome(run=run, unified_rows=unified)
    finally:
        await pool.close()


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``, fewer only at its end."""
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _watch_pipe(loop: asyncio.AbstractEventLoop, stop: Any) -> None:
    """Stop the run at a line from the service, or when its end of the pipe closes."""
    # os.read, not sys.stdin: a daemon thread blocked in a buffered reader would
    # hold its lock when the interpreter exits.
    try:
        asked = _read_exactly(0, len(STOP_LINE))
    except OSError:
        asked = b""
    if asked != STOP_LINE:
        log.warning("etl_parent_gone")
    with contextlib.suppress(RuntimeError):  # the run has already ended
        loop.call_soon_threadsafe(stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child: ``python -m pipelines.process RESULT_FILE``."""
    from observability.logging import configure_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pipelines.process RESULT_FILE (job on stdin)", file=sys.stderr)
        return 2
    result = Path(args[0])
    # The job comes from the service that started this process, on a pipe only
    # the two of them hold.
    size = int.from_bytes(_read_exactly(0, 8), "big")
    job: Job = pickle.loads(_read_exactly(0, size))  # noqa: S301
    configure_logging(job.settings.log_format, job.settings.log_level, stream=sys.stdout)
    lower_priority(job.settings.etl_nice)
    try:
        outcome = asyncio.run(_child(job))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The database went away before the run could be recorded: a routine
        # outage, reported in one line (the next run closes this one if need be).
        outcome = Outcome(
            error=f"database unavailable: {type(exc).__name__}: {_one_line(exc)}",
            error_type=DatabaseUnavailableError.__name__,
        )
    except KasparroError as exc:
        outcome = Outcome(error=_one_line(exc), error_type=type(exc).__name__)
    except Exception as exc:  # a bug: the service logs it with this message
        log.exception("etl_process_crashed")
        outcome = Outcome(error=f"{type(exc).__name__}: {_one_line(exc)}")
    _write_outcome(result, outcome)
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    raise SystemExit(main())
