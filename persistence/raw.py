"""Which records a raw table already holds, told by their content hashes."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from persistence.types import Queryable


@functools.cache
def _stored_sql(table: str) -> str:
    # The unique index on (source, content_hash) answers this without the table.
    return f"SELECT content_hash FROM {table} WHERE source = $1 AND content_hash = ANY($2::bytea[])"


async def stored_hashes(
    conn: Queryable, table: str, source: str, hashes: Sequence[bytes]
) -> set[bytes]:
    """The ``hashes`` that ``table`` already holds for ``source`` (committed rows)."""
    if not hashes:
        return set()
    rows = await conn.fetch(_stored_sql(table), source, list(hashes))
    return {bytes(row["content_hash"]) for row in rows}
