"""SIGKILL in the middle of a large CSV, then run again (acceptance 6 of issue 2)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.helpers import (
    REPO_ROOT,
    checkpoint,
    cli_env,
    count,
    csv_entry,
    kasparro_command,
    row_end_offsets,
    run_cli,
    wait_for,
    write_sources,
)

ROWS = 300_000


def write_large_csv(path: Path) -> None:
    lines = ["name,value,updated_at\n"]
    lines.extend(
        f"coin {i},{i % 997}.{i % 89},2026-05-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z\n"
        for i in range(ROWS)
    )
    path.write_text("".join(lines), encoding="utf-8")


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name; ``None`` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields


def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` and their command lines (Linux ``/proc``)."""
    found = {}
    for folder in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(folder.name))
        if fields is not None and int(fields[1]) == pid:
            try:
                found[int(folder.name)] = (folder / "cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
    return found


@pytest.mark.timeout(240)
async def test_killed_run_is_closed_as_interrupted_and_the_rerun_stores_each_record_once(
    database_url: str, pool: asyncpg.Pool[Any], tmp_path: Path
) -> None:
    data = tmp_path / "large.csv"
    write_large_csv(data)
    env = cli_env(
        database_url,
        write_sources(tmp_path, csv_entry(data)),
        ETL_BATCH_SIZE=2000,
        ETL_LEASE_SECONDS=2,
    )

    with (tmp_path / "killed.out").open("wb") as out, (tmp_path / "killed.err").open("wb") as err:
        victim = await asyncio.create_subprocess_exec(
            *kasparro_command("etl", "run"), cwd=REPO_ROOT, env=env, stdout=out, stderr=err
        )
        try:

            async def committed_some() -> bool:
                assert victim.returncode is None, "the run finished before it could be killed"
                return await count(pool, "raw_csv_data") > 0

            await wait_for(committed_some, within=60, interval=0.005)
            children = _children(victim.pid)
        finally:
            if victim.returncode is None:
                victim.kill()
            await asyncio.wait_for(victim.wait(), 30)
    assert victim.returncode == -9
    # The file is large enough for a parse process (beside multiprocessing's
    # resource tracker); neither outlives the run.
    assert sum("spawn_main" in command for command in children.values()) == 1

    async def children_gone() -> bool:
        return all(await asyncio.to_thread(lambda: [_stat(pid) is None for pid in children]))

    await wait_for(children_gone, within=15)

    # A batch statement already sent when the client died still runs to its end
    # and commits, whole: wait for it before counting.
    async def sessions_gone() -> bool:
        busy: int = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state <> 'idle'"
        )
        return busy == 0

    await wait_for(sessions_gone, within=30)

    stored = await count(pool, "raw_csv_data")
    assert 0 < stored < ROWS
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") == 1
    # What committed is exactly what the checkpoint covers: no more, no less.
    cursor = await checkpoint(pool, "csv")
    assert cursor is not None
    ends = row_end_offsets(data)
    assert cursor["offset"] == ends[stored - 1]

    # The dead run's lease on the source ends when nobody renews it; until then
    # the source is busy.
    async def lease_expired() -> bool:
        live: int = await pool.fetchval("SELECT count(*) FROM etl_leases WHERE expires_at > now()")
        return live == 0

    await wait_for(lease_expired, within=10)
    rerun = await asyncio.to_thread(run_cli, "etl", "run", "--json", env=env, timeout=180)

    assert rerun.returncode == 0, rerun.stderr
    run = json.loads(rerun.stdout)
    csv = run["sources"]["csv"]
    assert (csv["fetched"], csv["raw_inserted"], csv["duplicates"]) == (
        ROWS - stored,
        ROWS - stored,
        0,
    )
    assert await count(pool, "raw_csv_data") == ROWS
    assert await pool.fetchval("SELECT count(DISTINCT payload->>'name') FROM raw_csv_data") == ROWS
    assert (await checkpoint(pool, "csv") or {})["offset"] == data.stat().st_size
    runs = await pool.fetch("SELECT id::text AS id, status, error FROM etl_runs")
    assert len(runs) == 2
    killed = [r for r in runs if r["id"] != run["id"]]
    assert [(r["status"], r["error"]) for r in killed] == [("failed", "interrupted")]
    assert await pool.fetchval("SELECT count(*) FROM etl_run_sources WHERE status = 'running'") == 0
    assert (
        await pool.fetchval(
            "SELECT error FROM etl_run_sources WHERE run_id = $1::uuid", killed[0]["id"]
        )
        == "interrupted"
    )
    assert await count(pool, "unified_data") == ROWS
