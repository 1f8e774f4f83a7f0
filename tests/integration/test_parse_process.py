"""Large files are parsed in a process of their own (pipelines/parse_process.py).

Whether a file is parsed in a worker thread or in a parse process must change
nothing a user can see: the same run counts, raw rows, unified rows, rejections,
checkpoints and errors. ``ETL_PARSE_PROCESS_MIN_BYTES=0`` sends every file to a
parse process; a huge threshold keeps every file in the thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from persistence.database import create_pool, with_database
from tests.conftest import _admin
from tests.helpers import (
    append_csv,
    checkpoint,
    coin,
    count,
    csv_entry,
    csv_rows,
    json_entry,
    make_settings,
    raw_payloads,
    run_etl,
    unified_rows,
    wait_for,
    write_csv,
    write_json_array,
    write_json_lines,
    write_sources,
)

IN_PROCESS = {"ETL_PARSE_PROCESS_MIN_BYTES": 0}
IN_THREAD = {"ETL_PARSE_PROCESS_MIN_BYTES": 10**12}
T = "2026-01-01T00:00:00Z"


def _files(tmp_path: Path) -> Path:
    rows = csv_rows(40)
    rows[5] = ("", "1", T)  # rejected: empty name
    rows[9] = ("Coin 3", "abc", T)  # rejected: value
    rows.append(rows[0])  # a repeat in another chunk: a duplicate
    rows.append((" COIN 1 ", "9.5", "2026-06-01T00:00:00Z"))  # same entity, newer
    write_csv(tmp_path / "data.csv", rows)
    items = [coin(f"Json {i}", float(i), T) for i in range(25)]
    write_json_lines(tmp_path / "lines.jsonl", items)
    write_json_array(tmp_path / "array.json", [coin(f"Array {i}", 1.0, T) for i in range(10)])
    return write_sources(
        tmp_path,
        csv_entry(tmp_path / "data.csv"),
        json_entry(tmp_path / "lines.jsonl", name="json"),
        json_entry(tmp_path / "array.json", name="json_array"),
    )


async def _outcome(pool: asyncpg.Pool[Any], run: dict[str, Any]) -> dict[str, Any]:
    sources = {
        name: {k: v for k, v in s.items() if k not in ("drift",)}
        for name, s in run["sources"].items()
    }
    unified = [
        {
            k: v
            for k, v in row.items()
            if k not in ("ingested_at", "updated_at", "raw_id", "run_id", "seq")
        }
        for row in await unified_rows(pool)
    ]
    rejections = await pool.fetch(
        "SELECT source, field, reason FROM etl_rejections ORDER BY source, field, reason"
    )
    return {
        "status": run["status"],
        "sources": sources,
        # Sources sharing a table interleave in it as their batches arrive.
        "raw": {
            table: sorted(json.dumps(p, sort_keys=True) for p in await raw_payloads(pool, table))
            for table in ("raw_csv_data", "raw_third_source_data")
        },
        "unified": unified,
        "rejections": [tuple(r) for r in rejections],
        "checkpoints": {name: await checkpoint(pool, name) for name in run["sources"]},
    }


async def test_a_parse_process_gives_exactly_what_the_worker_thread_gives(
    tmp_path: Path, server_url: str, template_database: str
) -> None:
    outcomes = []
    # One database per way, two runs each: all at once, then the rows appended.
    for env in (IN_THREAD, IN_PROCESS):
        name = f"kasparro_t_{uuid.uuid4().hex[:12]}"
        await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        pool = await create_pool(with_database(server_url, name), max_size=4)
        try:
            sources_file = _files(tmp_path)
            settings = make_settings(sources_file, ETL_BATCH_SIZE=7, **env)
            first = await _outcome(pool, await run_etl(pool, settings))
            # More rows arrive: the second run resumes from the checkpoint.
            append_csv(tmp_path / "data.csv", csv_rows(5, start=100))
            second = await _outcome(pool, await run_etl(pool, settings))
            outcomes.append((first, second))
        finally:
            await pool.close()
            await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert outcomes[0] == outcomes[1]
    first, second = outcomes[1]
    assert first["sources"]["csv"]["fetched"] == 42
    assert first["sources"]["csv"]["duplicates"] == 1
    assert first["sources"]["csv"]["rejected"] == 2
    assert first["sources"]["json"]["fetched"] == 25
    assert first["sources"]["json_array"]["fetched"] == 10


async def test_an_unreadable_file_fails_its_source_with_the_same_line_either_way(
    tmp_path: Path, pool: asyncpg.Pool[Any]
) -> None:
    path = tmp_path / "broken.json"
    path.write_text("this is not JSON\n", encoding="utf-8")
    sources_file = write_sources(tmp_path, json_entry(path))
    errors = []
    for env in (IN_THREAD, IN_PROCESS):
        run = await run_etl(pool, make_settings(sources_file, **env))
        assert run["status"] == "failed"
        errors.append(run["sources"]["json"]["error"])
    assert errors[0] == errors[1] == "json: broken.json: expected a JSON array or JSON Lines"


async def test_a_parse_process_that_dies_fails_its_source_and_keeps_what_committed(
    tmp_path: Path, pool: asyncpg.Pool[Any]
) -> None:
    write_csv(tmp_path / "big.csv", csv_rows(300_000))
    settings = make_settings(
        write_sources(tmp_path, csv_entry(tmp_path / "big.csv")), ETL_BATCH_SIZE=2000, **IN_PROCESS
    )
    run_task = asyncio.create_task(run_etl(pool, settings))

    async def committed() -> bool:
        return await count(pool, "raw_csv_data") > 0

    await wait_for(committed, within=30)
    victims = _parse_processes()
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    run = await asyncio.wait_for(run_task, 60)

    csv = run["sources"]["csv"]
    assert csv["status"] == "failed"
    assert csv["error"] == "ParseProcessError: the parse process exited with code -9"
    stored = await count(pool, "raw_csv_data")
    assert stored == csv["raw_inserted"] > 0
    assert stored < 300_000
    # The checkpoint covers exactly what committed: the next run goes on from there.
    rerun = await run_etl(pool, settings)
    assert rerun["sources"]["csv"]["fetched"] == 300_000 - stored
    assert await count(pool, "raw_csv_data") == 300_000


def _parse_processes() -> list[int]:
    """Live children of this process started by multiprocessing's spawn."""
    found = []
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = stat.rsplit(")", 1)[1].split()[1]
        if parent == me and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_consumer_cancelled_mid_transfer_leaves_no_reader_behind(tmp_path: Path) -> None:
    # Chunks of several megabytes take a while to cross the pipe: a consumer
    # cancelled then must not terminate the parse process under a reader thread
    # that is half way through a chunk (it would wait forever for the rest, and
    # the event loop's shutdown with it).
    from config.sources import load_sources
    from pipelines.parse_process import prepared_in_process

    write_csv(tmp_path / "big.csv", csv_rows(120_000))
    settings = make_settings(write_sources(tmp_path, csv_entry(tmp_path / "big.csv")))
    source = next(s for s in load_sources(settings) if s.name == "csv")

    async def consume() -> None:
        stream = prepared_in_process(source, None, None, 40_000)
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()

    for _ in range(3):
        task = asyncio.create_task(consume())
        # Cancel exactly while a reader thread is inside a chunk's bytes.
        await wait_for(lambda: _thread_in("_recv_bytes"), within=60, interval=0.001)
        task.cancel()
        await asyncio.wait([task], timeout=60)
        assert task.done()
        # The receive under way ends (it is not left waiting on a dead process).
        await wait_for(lambda: _no_thread_in("_receive"), within=15)


async def _thread_in(function: str) -> bool:
    return not await _no_thread_in(function)


async def _no_thread_in(function: str) -> bool:
    import sys

    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == function:
                return False
            frame = frame.f_back
    return True


_KILLED_MID_CHUNK = """
import asyncio, fcntl, os, signal, sys, termios
from array import array

from config.sources import load_sources
from pipelines.parse_process import ParseProcessError, prepared_in_process
from tests.helpers import make_settings


def waiting_bytes(channel):
    count = array("i", [0])
    fcntl.ioctl(channel._reader.fileno(), termios.FIONREAD, count)
    return count[0]


async def main(sources_file):
    source = next(s for s in load_sources(make_settings(sources_file)) if s.name == "csv")
    stream = prepared_in_process(source, None, None, 40_000)
    await anext(stream)
    channel = stream.ag_frame.f_locals["channel"]
    process = stream.ag_frame.f_locals["process"]
    # A chunk is megabytes and a pipe holds 64 KiB: bytes waiting in it are the
    # start of a chunk whose writer is blocked on the rest.
    for _ in range(3000):
        if waiting_bytes(channel) > 0:
            break
        await asyncio.sleep(0.01)
    else:
        sys.exit("the next chunk never started")
    os.kill(process.pid, signal.SIGKILL)
    try:
        await asyncio.wait_for(anext(stream), 20)
    except ParseProcessError as exc:
        print(exc)
    finally:
        await stream.aclose()


asyncio.run(main(sys.argv[1]))
"""


def test_a_parse_process_killed_half_way_through_a_chunk_fails_the_read_instead_of_hanging(
    tmp_path: Path,
) -> None:
    # Killed from outside (the OOM killer, say) with a chunk half written, the
    # process leaves the reader with a truncated message: the read must end,
    # and the source fail with one line, rather than wait for the rest forever.
    # In a child interpreter, so that a reader left hanging fails this test by
    # its timeout instead of hanging the test session.
    import subprocess
    import sys

    write_csv(tmp_path / "big.csv", csv_rows(120_000))
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "big.csv"))
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_CHUNK, str(sources_file)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the parse process exited with code -9"
