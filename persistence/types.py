"""Type aliases for what the SQL functions accept."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A single connection, direct or borrowed from a pool.
Conn: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
#: Anything that can run a query: a connection or the pool itself.
Queryable: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any] | asyncpg.Pool[Any]
