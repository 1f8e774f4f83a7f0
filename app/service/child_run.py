"""The service's runs, each in a child process: ``kasparro etl run --json``.

Parsing, transforming and encoding batches are CPU work that holds the GIL; in
the service's own interpreter they take turns with every request, and ``/data``
slows down while a large run goes on (docs/performance.md). So the service runs
each run as the command a scheduler would run, with the trigger and the run's
id passed:

- the child gets the service's settings as environment variables, and prints
  one JSON line, the run object (or ``{"status": "skipped", ...}``); its log
  lines, on its standard error, go on to the service's output;
- SIGTERM asks it to stop gracefully (the batch in flight commits and the run
  is closed);
- a child that does not stop in time is killed with its process group and
  reaped; the service then frees the run's leases and closes it as
  interrupted. Nothing the child sent can commit after that: a closed run
  source refuses every batch (see :func:`persistence.runs.close_interrupted_runs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import structlog

from config.errors import KasparroError
from config.settings import Settings, environment
from observability.metrics import Metrics
from persistence import runs
from persistence.runs import Run
from pipelines.runner import SKIPPED, Skipped, skipped

log = structlog.get_logger("kasparro.subprocess_runner")

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
CLEANUP_SECONDS = 10.0
"""Bound of the release of a killed child's run."""


class RunProcessError(KasparroError):
    """The run's process ended without a run object; the message says why."""


class SubprocessRunner:
    """Runs each ETL run as ``kasparro etl run --json`` in a child process; the
    service's loop uses it like a :class:`pipelines.runner.Runner`.

    Args:
        settings: the service settings, with ``database_url`` resolved (the
            embedded server's URL when that is in use).
        pool: a pool of the service, to release the run of a child it killed.
        metrics: the service's metrics (the etl_* ones are read from the database,
            so nothing is counted here).
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool[Any], metrics: Metrics) -> None:
        if settings.database_url is None:
            raise ValueError("a child process needs the database URL resolved")
        self.settings = settings
        self.pool = pool
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
        """Graceful stop: SIGTERM to the child (at once if it is still starting)."""
        self._stop_requested = True
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    async def run(
        self, trigger: str, names: Sequence[str] | None = None, *, run_id: uuid.UUID | None = None
    ) -> Run | Skipped:
        """One run in a child process; returns its run object (or the skipped answer).

        ``run_id`` names the run (a new id by default).

        Raises:
            RunProcessError: the child ended without a run object (the database
                was unreachable, it was killed...), with its last words.
        """
        async with self._lock:
            self._stop_requested = False
            run_id = run_id or uuid.uuid4()
            # This process takes part in the run too: its lines carry the run's id.
            with structlog.contextvars.bound_contextvars(run_id=str(run_id)):
                returncode, out, last_error = await self._spawn_and_wait(trigger, names, run_id)
                if returncode < 0:
                    # Killed by a signal (by us, or from elsewhere): it closed nothing.
                    await self._release(run_id)
                    if self._stop_requested and returncode == -signal.SIGTERM:
                        return skipped({})  # stopped before the run began: nothing recorded
                    raise RunProcessError(
                        f"the run's process was killed by signal {-returncode}; "
                        "the run is closed as interrupted"
                    )
            run = _run_object(out)
            if run is None:
                raise RunProcessError(
                    last_error or f"the run's process exited with {returncode} and no result"
                )
            return run

    def _command(self, trigger: str, names: Sequence[str] | None, run_id: uuid.UUID) -> list[str]:
        argv = [sys.executable, "-m", "app.cli", "etl", "run", "--json"]
        argv += ["--trigger", trigger, "--run-id", str(run_id), "--parent-pid", str(os.getpid())]
        for name in names or ():
            argv += ["--source", name]
        return argv

    async def _spawn_and_wait(
        self, trigger: str, names: Sequence[str] | None, run_id: uuid.UUID
    ) -> tuple[int, bytes, str | None]:
        env = dict(os.environ)
        env.update(environment(self.settings))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        process = await asyncio.create_subprocess_exec(
            *self._command(trigger, names, run_id),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # A process group of its own: a Ctrl-C on the terminal reaches the
            # service, which then stops the child gracefully; a kill takes the
            # child's parse process with it.
            start_new_session=True,
        )
        self._process = process
        try:
            if self._stop_requested:
                self.request_stop()
            assert process.stdout is not None
            assert process.stderr is not None
            out, last_error, _ = await asyncio.gather(
                process.stdout.read(), _relay(process.stderr), process.wait()
            )
            return process.returncode or 0, out, last_error
        except BaseException:
            # Cancelled (a stop that ran out of time) or failed: never leave the
            # child behind, nor a zombie.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            await asyncio.shield(process.wait())
            await asyncio.shield(self._release(run_id))
            raise
        finally:
            self._process = None

    async def _release(self, run_id: uuid.UUID) -> None:
        """Free the leases of a killed child's run and close it as interrupted."""
        try:
            async with (
                asyncio.timeout(CLEANUP_SECONDS),
                self.pool.acquire(timeout=CLEANUP_SECONDS) as conn,
            ):
                closed = await runs.close_interrupted_runs(
                    conn, release=run_id, lock_timeout=CLEANUP_SECONDS / 2
                )
        except Exception as exc:  # its leases expire on their own
            log.warning("run_release_failed", run_id=str(run_id), error=_one_line(exc))
            return
        for closed_id in closed:
            log.warning("run_interrupted_closed", run_id=str(closed_id))


async def _relay(stream: asyncio.StreamReader) -> str | None:
    """Copy the child's log lines to this process's output; return the last line
    that is not a log event (the one-line error of a child that failed)."""
    last: str | None = None
    while line := await stream.readline():
        text = line.decode(errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        text = text.strip()
        if text.startswith("kasparro:"):
            last = text.removeprefix("kasparro:").strip()
    return last


def _run_object(out: bytes) -> Run | Skipped | None:
    """The child's last line: its run object, or the skipped answer."""
    lines = out.strip().splitlines()
    if not lines:
        return None
    try:
        answer = msgspec.json.decode(lines[-1])
        if isinstance(answer, dict) and answer.get("status") == SKIPPED:
            return msgspec.convert(answer, Skipped)
        return msgspec.convert(answer, Run)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."
