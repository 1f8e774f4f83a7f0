"""Async Alembic environment: migrations run over SQLAlchemy's asyncpg dialect."""

from __future__ import annotations

import asyncio
import uuid
from logging.config import fileConfig

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from alembic import context
from persistence.database import MIGRATION_LOCK_KEY
from persistence.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        # Plain `alembic upgrade head`: use the service's own settings.
        from config.settings import load_settings
        from persistence.database import resolve_database_url

        url = resolve_database_url(load_settings())
    from persistence.database import sqlalchemy_url

    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def _connect_args() -> dict[str, object]:
    size = int(config.attributes.get("statement_cache_size", 100))
    if size > 0:
        return {"statement_cache_size": size}
    # Behind a transaction pooler: no statement outlives its transaction, and the
    # ones SQLAlchemy prepares get names no other client's can collide with.
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__kasparro_{uuid.uuid4().hex}__",
    }


async def run_migrations_online() -> None:
    engine = create_async_engine(_url(), poolclass=NullPool, connect_args=_connect_args())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
