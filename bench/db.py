"""The database server the bench runs against, and fresh databases on it.

By default the bench starts its own embedded PostgreSQL in a temporary folder;
``BENCH_DATABASE_URL`` (an admin URL: it may create and drop databases) points
it at an existing server instead. Every scenario gets a new database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from bench.proc import stat_fields, tree_cpu_seconds

_counter = itertools.count(1)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("postgres")
    except OSError:
        return False


@dataclass(slots=True)
class DatabaseServer:
    """A PostgreSQL server and the bench databases created on it.

    Attributes:
        admin_url: where ``CREATE DATABASE`` is run.
        kind: ``embedded`` or ``external``.
        postmaster_pid: the server's main process when it runs on this host and
            ``/proc`` shows it; server CPU time is measured through it.
        version: ``server_version`` of the server.
    """

    admin_url: str
    kind: str
    postmaster_pid: int | None = None
    version: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path) -> DatabaseServer:
        """The server named by ``BENCH_DATABASE_URL``, else an embedded one under ``workdir``."""
        url = os.environ.get("BENCH_DATABASE_URL", "").strip()
        if url:
            server = cls(url, "external")
        else:
            from persistence.database import embedded_url

            server = cls(embedded_url(workdir, database="postgres"), "embedded")
        asyncio.run(server._inspect())
        return server

    async def _inspect(self) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            self.version = str(await conn.fetchval("SHOW server_version"))
            for name in (
                "shared_buffers",
                "work_mem",
                "synchronous_commit",
                "fsync",
                "max_wal_size",
            ):
                self.settings[name] = str(await conn.fetchval(f"SHOW {name}"))
            # Read while the connection is open: the backend exits when it closes.
            fields = stat_fields(int(await conn.fetchval("SELECT pg_backend_pid()")))
        finally:
            await conn.close()
        # The parent of a backend is the postmaster. A remote server's pid may name an
        # unrelated local process: only a local postgres is trusted.
        if fields is not None and _is_postgres(int(fields[1])):
            self.postmaster_pid = int(fields[1])

    def create(self, label: str, template: str | None = None) -> str:
        """A new empty database, or a copy of the database at URL ``template``;
        returns its URL."""
        name = f"bench_{os.getpid()}_{next(_counter)}_{label}"[:63]
        copy = "" if template is None else f' TEMPLATE "{urlsplit(template).path.lstrip("/")}"'

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                # The sessions of a loader that just exited end a moment after it.
                deadline = time.monotonic() + 30.0
                while True:
                    try:
                        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
                        return
                    except asyncpg.ObjectInUseError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await conn.close()

        asyncio.run(go())
        self.created.append(name)
        return with_database(self.admin_url, name)

    def checkpoint(self) -> None:
        """Flush dirty buffers (best effort: needs superuser or ``pg_checkpoint``), so
        every measured loader starts from the same state and none pays for the
        previous one's writes, in time or in full-page images in its WAL."""

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

        with contextlib.suppress(asyncpg.PostgresError):
            asyncio.run(go())

    def settle(self, timeout: float = 120.0) -> None:
        """Wait (up to ``timeout`` seconds) until no autovacuum worker runs on the
        bench's databases: the vacuum of an earlier loader's database must not be
        charged to the next one."""

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    busy = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'autovacuum worker' AND datname = ANY($1)",
                        self.created,
                    )
                    if not busy:
                        return
                    await asyncio.sleep(0.5)
            finally:
                await conn.close()

        with contextlib.suppress(asyncpg.PostgresError):
            asyncio.run(go())

    def checkpoints(self) -> int | None:
        """Checkpoints the server has run so far (timed and requested)."""

        async def go() -> int | None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                for sql in (
                    "SELECT num_timed + num_requested FROM pg_stat_checkpointer",
                    "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
                ):
                    try:
                        return int(await conn.fetchval(sql))
                    except asyncpg.PostgresError:
                        continue
                return None
            finally:
                await conn.close()

        return asyncio.run(go())

    def drop_all(self) -> None:
        """Drop every database this bench created (best effort)."""

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                for name in self.created:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(go())
        self.created.clear()

    def cpu_seconds(self) -> float | None:
        """CPU seconds used so far by the server: the postmaster, its live children
        and the children it has reaped. ``None`` when the server is not local."""
        if self.postmaster_pid is None:
            return None
        return tree_cpu_seconds(self.postmaster_pid)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "settings": self.settings}


async def scalar(url: str, sql: str) -> Any:
    """One value from ``url``."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def active_seconds(url: str) -> float | None:
    """Seconds the server has spent executing statements in ``url``'s database
    (``pg_stat_database.active_time``, PostgreSQL 14+; flushed as sessions end)."""

    async def go() -> float | None:
        conn = await asyncpg.connect(url)
        try:
            value = await conn.fetchval(
                "SELECT active_time FROM pg_stat_database WHERE datname = current_database()"
            )
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()
        return float(value) / 1000.0 if value is not None else None

    return asyncio.run(go())


def wal_bytes(url: str) -> float | None:
    """WAL written by the whole server so far (``pg_stat_wal``); the bench's runs
    are the only writers on its server, so a difference is one run's WAL."""

    async def go() -> float | None:
        conn = await asyncpg.connect(url)
        try:
            value = await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal")
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()
        return float(value) if value is not None else None

    return asyncio.run(go())


def footprint(url: str) -> dict[str, Any]:
    """Size of ``url``'s database, and rows written and size per table."""

    async def go() -> dict[str, Any]:
        conn = await asyncpg.connect(url)
        try:
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            rows = await conn.fetch(
                """
                SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del,
                       pg_total_relation_size(relid) AS bytes,
                       (SELECT count(*) FROM pg_index i WHERE i.indrelid = relid) AS indexes
                FROM pg_stat_user_tables
                WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
                ORDER BY pg_total_relation_size(relid) DESC
                """
            )
        finally:
            await conn.close()
        return {
            "database_bytes": int(size),
            "tables": {
                r["relname"]: {
                    "inserted": r["n_tup_ins"],
                    "updated": r["n_tup_upd"],
                    "hot_updated": r["n_tup_hot_upd"],
                    "deleted": r["n_tup_del"],
                    "bytes": r["bytes"],
                    "indexes": r["indexes"],
                }
                for r in rows
            },
        }

    return asyncio.run(go())
