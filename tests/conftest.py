"""Shared fixtures: a real PostgreSQL (embedded by default, or TEST_DATABASE_URL).

The schema is migrated once into a template database; each test gets a fresh
copy (``CREATE DATABASE ... TEMPLATE``), so tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from persistence.database import (
    create_pool,
    embedded_url,
    run_migrations,
    stop_embedded,
    with_database,
)
from tests.pgbouncer import MODES, PgBouncer, binary

REPO_ROOT = Path(__file__).resolve().parent.parent


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the server's maintenance database."""
    external = os.environ.get("TEST_DATABASE_URL", "").strip()
    if external:
        yield external
        return
    # Not under pytest's basetemp: pytest deletes old basetemps when another
    # session starts, which would pull the data directory from under the server.
    data_dir = Path(tempfile.mkdtemp(prefix="kasparro-test-pg-"))
    try:
        yield embedded_url(data_dir, database="postgres")
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    name = f"kasparro_tpl_{os.getpid()}"
    asyncio.run(
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    )
    run_migrations(with_database(server_url, name))
    yield name
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A freshly migrated, empty database for one test."""
    name = f"kasparro_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    yield with_database(server_url, name)
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    p = await create_pool(database_url, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(scope="session", params=MODES)
def pgbouncer(request: pytest.FixtureRequest, server_url: str) -> Iterator[PgBouncer]:
    """A real PgBouncer with its defaults in front of the test server, once per
    pool mode (``session``, ``transaction``)."""
    if binary() is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    bouncer = PgBouncer(server_url, request.param)
    try:
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture
def bounced_url(database_url: str, pgbouncer: PgBouncer) -> str:
    """The test's database through PgBouncer."""
    return pgbouncer.url(database_url)
