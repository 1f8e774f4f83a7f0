"""Migrations: the rendered schema an empty database gets in one script, and
Alembic for a database at an older migration; both end at the same schema."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from persistence.database import (
    REPO_ROOT,
    SCHEMA_FILE,
    alembic_upgrade,
    head_revision,
    render_schema,
    run_migrations,
    schema_script,
    with_database,
)
from tests.conftest import _admin

# Every object of the public schema, as PostgreSQL itself spells it.
CATALOG = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(indexrelid)
FROM pg_index JOIN pg_class c ON c.oid = indrelid WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'function ' || pg_get_functiondef(p.oid)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'sequence ' || sequencename || ' ' || start_value || ' ' || increment_by
FROM pg_sequences WHERE schemaname = 'public'
UNION ALL
SELECT 'row ' || version_num FROM alembic_version
ORDER BY 1
"""


@pytest.fixture
def empty_databases(server_url: str) -> Iterator[list[str]]:
    names = [f"kasparro_m_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    asyncio.run(_admin(server_url, *(f'CREATE DATABASE "{n}"' for n in names)))
    yield [with_database(server_url, n) for n in names]
    asyncio.run(_admin(server_url, *(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names)))


async def _catalog(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        lines = [row[0] for row in await conn.fetch(CATALOG)]
        if await conn.fetchval("SELECT to_regclass('unified_version')") is not None:
            count = await conn.fetchval("SELECT count(*) FROM unified_version")
            lines.append(f"row unified_version {count}")
        return lines
    finally:
        await conn.close()


def test_the_rendered_schema_is_the_migrations_of_today() -> None:
    # After a new migration: `make schema`.
    committed = (REPO_ROOT / "alembic" / SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == render_schema(REPO_ROOT)
    assert schema_script(committed)[0] == head_revision(REPO_ROOT)


def test_an_empty_database_gets_the_schema_alembic_would_build_without_loading_alembic(
    empty_databases: list[str],
) -> None:
    fast, slow = empty_databases
    script = (
        "import sys; from persistence.database import run_migrations; "
        "run_migrations(sys.argv[1]); print('alembic' in sys.modules, 'sqlalchemy' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, fast],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["False", "False"]
    alembic_upgrade(slow, "head")
    built = asyncio.run(_catalog(fast))
    assert built == asyncio.run(_catalog(slow))
    assert f"row {head_revision(REPO_ROOT)}" in built
    assert "row unified_version 1" in built


def test_a_database_at_an_older_migration_is_upgraded_by_alembic(
    empty_databases: list[str],
) -> None:
    older, fresh = empty_databases
    alembic_upgrade(older, "0002")
    assert "row 0002" in asyncio.run(_catalog(older))
    run_migrations(older)
    run_migrations(fresh)
    assert asyncio.run(_catalog(older)) == asyncio.run(_catalog(fresh))


def test_processes_migrating_one_empty_database_together_all_end_at_the_newest(
    empty_databases: list[str],
) -> None:
    url = empty_databases[0]
    with ThreadPoolExecutor(max_workers=4) as workers:
        list(workers.map(run_migrations, [url] * 4))
    catalog = asyncio.run(_catalog(url))
    assert [line for line in catalog if line.startswith("row ")] == [
        f"row {head_revision(REPO_ROOT)}",
        "row unified_version 1",
    ]


def test_a_rendered_schema_behind_the_migrations_is_not_used(
    empty_databases: list[str], tmp_path: Path
) -> None:
    # A checkout with a migration newer than its rendered schema: Alembic builds it.
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "alembic.ini").write_text((REPO_ROOT / "alembic.ini").read_text())
    subprocess.run(["cp", "-r", str(REPO_ROOT / "alembic"), str(root / "alembic")], check=True)
    text = (root / "alembic" / SCHEMA_FILE).read_text()
    head = head_revision(root)
    (root / "alembic" / SCHEMA_FILE).write_text(
        text.replace(f"version_num='{head}'", "version_num='0000'")
        + "\nCREATE TABLE should_not_exist (x int);\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from persistence.database import run_migrations; "
            "run_migrations(sys.argv[1])",
            empty_databases[0],
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    catalog = asyncio.run(_catalog(empty_databases[0]))
    assert not any("should_not_exist" in line for line in catalog)
    assert f"row {head}" in catalog
