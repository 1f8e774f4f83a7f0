"""The ``kasparro`` command line: ``serve``, ``etl run|reset|reprocess``, ``db upgrade|url``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from config.errors import ConfigError
from config.runtime import collect_rarely
from config.settings import Settings, load_settings
from config.sources import select_sources
from observability.logging import StatusLine, configure_logging, status_line
from persistence.batches import BatchCounts, reset_checkpoint
from persistence.database import create_pool, resolve_database_url, run_migrations
from persistence.runs import Run
from pipelines.identity import declared_sources
from pipelines.runner import Skipped

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
_RUN_EXIT = {"success": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILED, "skipped": EXIT_OK}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2 with one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _trigger(text: str) -> str:
    if not text or len(text) > 40 or not text.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError("expected a short word (letters, digits, - and _)")
    return text


def _run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kasparro", description="Kasparro ETL service.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="apply migrations, serve the API, run the ETL loop")
    serve.add_argument("--host", help="listen address (default HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default PORT or 8000)")

    etl = commands.add_parser("etl", help="ETL commands")
    etl_commands = etl.add_subparsers(dest="etl_command", required=True, parser_class=_Parser)
    run = etl_commands.add_parser("run", help="one ETL run now")
    run.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME",
        help="only this source (repeatable)",
    )
    run.add_argument("--json", action="store_true", help="print the run object as one JSON line")
    run.add_argument(
        "--trigger",
        default="cli",
        type=_trigger,
        help="what started the run, as /runs shows it (default cli)",
    )
    run.add_argument(
        "--run-id",
        type=_run_id,
        metavar="UUID",
        help="the id the run is recorded under (default: a new one)",
    )
    run.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="stop gracefully as soon as this process (the service that started the run) is gone",
    )
    reset = etl_commands.add_parser("reset", help="forget a source's checkpoint")
    reset.add_argument("--source", required=True, metavar="NAME")
    etl_commands.add_parser("reprocess", help="rebuild unified_data from the raw tables")

    db = commands.add_parser("db", help="database commands")
    db_commands = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    db_commands.add_parser("upgrade", help="apply migrations")
    db_commands.add_parser("url", help="print the connection URL in use")
    return parser


def _progress_line(enabled: bool) -> contextlib.AbstractContextManager[StatusLine | None]:
    """The terminal's progress line on stderr, or nothing off a terminal."""
    return status_line(sys.stderr) if enabled else contextlib.nullcontext()


def _progress_printer(line: StatusLine | None) -> Any:
    if line is None:
        return None
    totals: dict[str, BatchCounts] = {}

    def show(source: str, counts: BatchCounts) -> None:
        totals[source] = counts
        parts = (f"{name}: {c.fetched} read, {c.raw_inserted} new" for name, c in totals.items())
        line.show("  ".join(parts))

    return show


def _print_skipped(result: Skipped) -> None:
    busy = ", ".join(
        f"{name} (held by run {s.held_by or 'that has just ended'})"
        for name, s in result.sources.items()
    )
    print(f"skipped: every source is being ingested by another run: {busy}")


def _print_summary(run: Run, busy: Sequence[str]) -> None:
    print(f"run {run.id}: {run.status} in {run.duration_seconds or 0:.2f}s")
    for name, s in run.sources.items():
        line = (
            f"  {name:<12} {s.status:<8} fetched={s.fetched} new={s.raw_inserted} "
            f"duplicates={s.duplicates} rejected={s.rejected} "
            f"unified={s.unified_upserted}"
        )
        if s.error:
            line += f"  error: {s.error}"
        print(line)
        for event in s.drift:
            print(f"    drift {event.get('kind')}: {event.get('detail')}")
    for name in busy:
        print(f"  {name:<12} skipped: another run is ingesting it")


def _pool(settings: Settings, url: str, size: int) -> Any:
    return create_pool(
        url, max_size=size, statement_cache_size=settings.database_statement_cache_size
    )


def _migrate(settings: Settings, url: str) -> None:
    run_migrations(url, statement_cache_size=settings.database_statement_cache_size)


ORPHAN_CHECK_SECONDS = 0.2


async def _stop_when_orphaned(parent: int, stop: Callable[[], None]) -> None:
    """Stop the run once ``parent`` is gone (killed, say): a run must not ingest on
    as an orphan. Its pipes went with the parent, so output goes nowhere from then on."""
    # The kernel tells a child nothing when its parent dies; polling is portable.
    while os.getppid() == parent:  # noqa: ASYNC110 - no event exists to wait on
        await asyncio.sleep(ORPHAN_CHECK_SECONDS)
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    stop()


async def _etl_run(args: argparse.Namespace, settings: Settings) -> int:
    from pipelines.runner import Runner

    names: list[str] = args.source
    sources = select_sources(declared_sources(settings), names)
    url = resolve_database_url(settings)
    await asyncio.to_thread(_migrate, settings, url)
    pool = await _pool(settings, url, settings.database_run_pool_size)
    interactive = not args.json and sys.stdout.isatty() and sys.stderr.isatty()
    # Log lines go to stderr too: each ends the progress line before it is written.
    with _progress_line(interactive) as line:
        runner = Runner(pool, settings, sources, None, progress=_progress_printer(line))
        loop = asyncio.get_running_loop()
        # SIGTERM (a scheduler, the service that started this run) stops the run
        # gracefully: the batch in flight commits and the run is closed.
        loop.add_signal_handler(signal.SIGTERM, runner.request_stop)
        watch = (
            asyncio.create_task(_stop_when_orphaned(args.parent_pid, runner.request_stop))
            if args.parent_pid
            else None
        )
        try:
            run = await runner.run(args.trigger, names or None, run_id=args.run_id)
        finally:
            if watch is not None:
                watch.cancel()
            loop.remove_signal_handler(signal.SIGTERM)
            await pool.close()
    if args.json:
        sys.stdout.write(msgspec.json.encode(run).decode() + "\n")
    elif isinstance(run, Skipped):
        _print_skipped(run)
    else:
        busy = [s.name for s in sources if s.name not in run.sources]
        _print_summary(run, busy)
    return _RUN_EXIT.get(run.status, EXIT_FAILED)


async def _etl_reset(settings: Settings, name: str) -> int:
    select_sources(declared_sources(settings), [name])
    url = resolve_database_url(settings)
    await asyncio.to_thread(_migrate, settings, url)
    pool = await _pool(settings, url, 2)
    try:
        existed = await reset_checkpoint(pool, name)
    finally:
        await pool.close()
    print(
        f"{name}: checkpoint {'forgotten' if existed else 'was not set'}; "
        "the next run reads it from the start"
    )
    return EXIT_OK


async def _etl_reprocess(settings: Settings) -> int:
    from config.sources import id_sources
    from pipelines.identity import load_identity
    from pipelines.reprocess import reprocess

    sources = declared_sources(settings)
    rules = load_identity(settings.identity_file, settings.sources_file, id_sources(sources))
    url = resolve_database_url(settings)
    await asyncio.to_thread(_migrate, settings, url)
    pool = await _pool(settings, url, settings.database_run_pool_size)
    with _progress_line(sys.stdout.isatty() and sys.stderr.isatty()) as line:

        def show(source: str, total: int) -> None:
            assert line is not None
            line.show(f"{source}: {total} unified rows")

        try:
            written = await reprocess(
                pool, sources, rules=rules, progress=show if line is not None else None
            )
            total = await pool.fetchval("SELECT count(*) FROM unified_data")
        finally:
            await pool.close()
    print(
        f"unified_data rebuilt from raw: {total} rows "
        f"({', '.join(f'{k}: {v} written' for k, v in written.items())})"
    )
    return EXIT_OK


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        from app.api.server import run_server

        port = args.port if args.port is not None else settings.port
        return int(run_server(settings, args.host or settings.host, port))
    if args.command == "db":
        url = resolve_database_url(settings)
        if args.db_command == "url":
            print(url)
            return EXIT_OK
        _migrate(settings, url)
        print("database is at the latest migration")
        return EXIT_OK
    collect_rarely()  # the commands below load records
    if args.etl_command == "run":
        return asyncio.run(_etl_run(args, settings))
    if args.etl_command == "reset":
        return asyncio.run(_etl_reset(settings, args.source))
    return asyncio.run(_etl_reprocess(settings))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kasparro`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        declared_sources(settings)
    except ConfigError as exc:
        print(f"kasparro: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Commands other than serve keep stdout for their own output.
    configure_logging(
        settings.log_format,
        settings.log_level,
        stream=sys.stdout if args.command == "serve" else sys.stderr,
    )
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"kasparro: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kasparro: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # the last resort: one clear line, never a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"kasparro: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
