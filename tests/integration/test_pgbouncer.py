"""Every command and the service through a real PgBouncer, in session and in
transaction mode, with PgBouncer's default settings (tests/pgbouncer.py).

The only setting of ours that a mode needs: ``DATABASE_STATEMENT_CACHE_SIZE=0``
in transaction mode.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from persistence.database import alembic_upgrade, head_revision, with_database
from tests.conftest import _admin
from tests.helpers import (
    REPO_ROOT,
    cli_env,
    count,
    csv_entry,
    csv_rows,
    json_entry,
    kasparro_command,
    run_cli,
    wait_for,
    write_csv,
    write_json_array,
    write_sources,
)
from tests.pgbouncer import PgBouncer

KEY = "pgbouncer-test-key"


@pytest.fixture
def empty_database(server_url: str) -> Any:
    name = f"kasparro_e_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    yield with_database(server_url, name)
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _sources(tmp_path: Path) -> Path:
    write_csv(tmp_path / "a.csv", csv_rows(500))
    coins = [{"id": f"c{i}", "name": f"token {i}", "current_price": i + 0.1} for i in range(50)]
    write_json_array(tmp_path / "b.json", coins)
    return write_sources(tmp_path, csv_entry(tmp_path / "a.csv"), json_entry(tmp_path / "b.json"))


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stdout


async def test_every_command_works_through_pgbouncer(
    empty_database: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    env = cli_env(pgbouncer.url(empty_database), _sources(tmp_path), **pgbouncer.settings())

    def cli(*args: str) -> str:
        return _ok(run_cli(*args, env=env, timeout=120))

    assert "latest migration" in await asyncio.to_thread(cli, "db", "upgrade")
    first = json.loads(await asyncio.to_thread(cli, "etl", "run", "--json"))
    assert first["status"] == "success"
    assert (first["sources"]["csv"]["raw_inserted"], first["sources"]["json"]["raw_inserted"]) == (
        500,
        50,
    )
    assert "forgotten" in await asyncio.to_thread(cli, "etl", "reset", "--source", "csv")
    again = json.loads(await asyncio.to_thread(cli, "etl", "run", "--json"))
    assert (again["sources"]["csv"]["fetched"], again["sources"]["csv"]["duplicates"]) == (500, 500)
    assert "550 rows" in await asyncio.to_thread(cli, "etl", "reprocess")
    assert "latest migration" in await asyncio.to_thread(cli, "db", "upgrade")

    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM unified_data") == 550
        assert await conn.fetchval("SELECT count(*) FROM etl_runs") == 2
        assert await conn.fetchval("SELECT count(*) FROM etl_leases") == 0
    finally:
        await conn.close()


async def test_an_older_database_is_upgraded_by_alembic_through_pgbouncer(
    empty_database: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    await asyncio.to_thread(alembic_upgrade, empty_database, "0002")
    env = cli_env(pgbouncer.url(empty_database), _sources(tmp_path), **pgbouncer.settings())

    _ok(await asyncio.to_thread(run_cli, "db", "upgrade", env=env, timeout=120))

    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == head_revision(
            REPO_ROOT
        )
    finally:
        await conn.close()


async def test_the_service_answers_through_pgbouncer(
    database_url: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    env = cli_env(
        pgbouncer.url(database_url),
        _sources(tmp_path),
        API_KEY=KEY,
        ETL_ON_STARTUP="true",
        ETL_INTERVAL_SECONDS="0",
        **pgbouncer.settings(),
    )
    with (tmp_path / "serve.log").open("w") as log:
        served = subprocess.Popen(  # noqa: ASYNC220 - stopped at the end of the test
            kasparro_command("serve", "--host", "127.0.0.1", "--port", "0"),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = await _listening(tmp_path / "serve.log", served)
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:

                async def ran() -> bool:
                    return (await client.get("/health")).json()["last_etl"] == "success"

                await wait_for(ran, within=60, interval=0.1)
                paths = [
                    "/data?limit=5",
                    "/data?source=json&limit=3",
                    "/data?name=coin%207",
                    "/stats",
                    "/runs?limit=2",
                    "/health",
                ]
                answers = await asyncio.gather(
                    *(
                        client.get(paths[i % len(paths)], headers={"x-api-key": KEY})
                        for i in range(300)
                    )
                )
                health = (await client.get("/health")).json()
                page = (await client.get("/data?limit=1000", headers={"x-api-key": KEY})).json()
        finally:
            served.terminate()
            code = await asyncio.to_thread(served.wait, 20)
    output = (tmp_path / "serve.log").read_text()
    assert [a.status_code for a in answers] == [200] * 300, output[-3000:]
    assert (health["status"], health["db"], health["last_etl"]) == ("ok", "ok", "success")
    assert page["pagination"]["total"] == 550
    assert {item["value"] for item in page["data"] if item["source"] == "json"} == {
        i + 0.1 for i in range(50)
    }
    assert code == 0
    assert "Traceback" not in output
    assert await count_runs(database_url) == 1


async def count_runs(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM etl_runs")
        return n
    finally:
        await conn.close()


async def _listening(log: Path, served: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(log.read_text)
        assert served.poll() is None, text[-3000:]
        for line in text.splitlines():
            if '"server_listening"' in line:
                url = str(json.loads(line)["url"])
                try:
                    async with httpx.AsyncClient(timeout=2) as client:
                        if (await client.get(url + "/")).status_code == 200:
                            return url
                except httpx.TransportError:
                    pass
        await asyncio.sleep(0.05)
    tail = (await asyncio.to_thread(log.read_text))[-3000:]
    raise AssertionError(f"serve never answered: {tail}")


async def test_nothing_a_killed_child_sent_commits_after_its_run_is_closed_behind_pgbouncer(
    database_url: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    # Behind a pooler the service cannot end the child's server sessions: the
    # closed run source refuses the batch a dead child left waiting.
    from app.service.child_run import SubprocessRunner
    from observability.metrics import Metrics
    from persistence.database import create_pool
    from tests.helpers import make_settings

    url = pgbouncer.url(database_url)
    write_csv(tmp_path / "data.csv", csv_rows(300_000))
    sources_file = write_sources(tmp_path, csv_entry(tmp_path / "data.csv"))
    settings = make_settings(
        sources_file, DATABASE_URL=url, ETL_BATCH_SIZE=2000, **pgbouncer.settings()
    )
    pool = await create_pool(url, statement_cache_size=settings.database_statement_cache_size)
    direct = await asyncpg.connect(database_url)
    blocker = await asyncpg.connect(database_url)
    try:
        runner = SubprocessRunner(settings, pool, Metrics())
        task = asyncio.create_task(runner.run("schedule"))

        async def committed() -> bool:
            return await count(direct, "raw_csv_data") > 0  # type: ignore[arg-type]

        await wait_for(committed, within=60)
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("LOCK TABLE raw_csv_data IN SHARE MODE")

        async def batch_waits() -> bool:
            waiting: int = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%raw_csv_data%'"
            )
            return waiting > 0

        await wait_for(batch_waits, within=30)
        stored = await count(direct, "raw_csv_data")  # type: ignore[arg-type]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await direct.fetchval("SELECT status FROM etl_run_sources") == "failed"
        await locked.rollback()

        async def settled() -> bool:
            busy: int = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state <> 'idle' AND pid <> pg_backend_pid()"
            )
            return busy == 0

        await wait_for(settled, within=30)
        assert await count(direct, "raw_csv_data") == stored  # type: ignore[arg-type]
        run = await direct.fetchrow("SELECT status, error FROM etl_runs")
        assert (run["status"], run["error"]) == ("failed", "interrupted")
        assert await direct.fetchval("SELECT count(*) FROM etl_leases") == 0
    finally:
        await blocker.close()
        await direct.close()
        await pool.close()
