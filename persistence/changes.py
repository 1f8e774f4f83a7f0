"""The change feed's reads: unified rows and tombstones in the order of their number.

Every insert or update of a unified row gives it the next number of
``unified_change_seq``, logged with the row's name in ``unified_feed``, and
every removal leaves a tombstone numbered the same way (migrations 0007 and
0010). Numbers are drawn under a lock held to commit, so the changes a reader
sees are always every change up to some point: a change that commits later
carries a larger number than any the reader has seen. Reading past ``after``
therefore misses nothing and repeats nothing. A log entry whose row has changed
again since is skipped: the row shows once, under its latest number.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from persistence.reads import ITEM_JSON, READ_TIMEOUT_SECONDS, SHORTEST_FLOATS

if TYPE_CHECKING:
    from persistence.reads import Executor

MAX_LIMIT = 1000
"""The largest page a reader may ask for."""

#: A change as the JSON object ``/changes`` shows: the ``/data`` item with its
#: number first and ``"deleted":false`` last.
CHANGE_JSON = f"""'{{"seq":' || seq || ',' || substr(left({ITEM_JSON}, -1), 2)
    || ',"deleted":false}}'"""
#: A tombstone: the name, no state, ``"deleted":true``.
REMOVAL_JSON = """'{"seq":' || seq || ',"name":' || to_json(name)::text
    || ',"value":null,"source":null,"observed_at":null,"ingested_at":null,"deleted":true}'"""

# Each branch is one range scan of a seq index (the log's entries each look
# their row up by name, a stale one finding none); the page is the first _LIMIT_
# of both. Floats render in their shortest exact form (SHORTEST_FLOATS, as for
# /data). The limit is written into the statement rather than bound: for
# ``LIMIT $2`` a generic plan assumes a tenth of the table is read, so the server
# planned every request anew (a third of its CPU per page, 100 consumers polling).
CHANGES_PAGE = f"""
SELECT '[' || coalesce(string_agg(c.item, ',' ORDER BY c.seq), '') || ']' AS items,
    max(c.seq) AS last_seq, count(*) AS n
FROM {SHORTEST_FLOATS}
CROSS JOIN LATERAL (
    SELECT seq, item FROM (
        (SELECT f.seq, row.item
         FROM unified_feed f
         CROSS JOIN LATERAL (
             -- OFFSET 0 keeps this a look-up per entry, never a join of both tables.
             SELECT {CHANGE_JSON} AS item FROM unified_data
             WHERE name = f.name AND seq = f.seq AND floats.digits IS NOT NULL
             OFFSET 0
         ) AS row
         WHERE f.seq > $1
         ORDER BY f.seq LIMIT _LIMIT_)
        UNION ALL
        (SELECT seq, {REMOVAL_JSON} AS item
         FROM unified_removals WHERE seq > $1 ORDER BY seq LIMIT _LIMIT_)
    ) AS both_kinds
    ORDER BY seq LIMIT _LIMIT_
) AS c
"""


@functools.lru_cache(maxsize=64)
def changes_page_sql(limit: int) -> str:
    """:data:`CHANGES_PAGE` for pages of ``limit`` changes (``$1``: after)."""
    return CHANGES_PAGE.replace("_LIMIT_", str(int(limit)))


@dataclass(frozen=True, slots=True)
class ChangePage:
    items: str
    """The page's changes as one JSON array, rendered by the database."""
    next_after: int
    """The number to pass as ``after`` next: the page's last, or ``after`` for an empty page."""
    count: int
    """Changes in the page; fewer than the limit when the reader has caught up."""


async def changes_page(db: Executor, *, after: int, limit: int) -> ChangePage:
    """Up to ``limit`` changes numbered above ``after``, oldest first.

    Args:
        after: the last number the reader has seen (0 for the start).
        limit: page size.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIMIT}, got {limit}")
    found = await db.fetchrow(changes_page_sql(limit), after, timeout=READ_TIMEOUT_SECONDS)
    assert found is not None  # an aggregate: always one row
    items, last_seq, n = found
    return ChangePage(items, after if last_seq is None else int(last_seq), int(n))


LATEST_SEQ = """
SELECT greatest(
    (SELECT max(seq) FROM unified_feed), (SELECT max(seq) FROM unified_removals), 0)
"""


async def latest_seq(db: Executor) -> int:
    """The largest number of any change visible now (0 when there is none)."""
    value: int = await db.fetchval(LATEST_SEQ, timeout=READ_TIMEOUT_SECONDS)
    return int(value)


# Stale entries go once twice as many numbers as the table has rows (at least
# PRUNE_MIN_CHANGES) were drawn since the last pass: the log then holds at most
# about three entries per row, and a pass costs about two entry visits per
# change however often runs finish. The singleton's row lock lets one pass run
# at a time. An entry is stale when its row holds a newer number, or none
# (removed: its tombstone carries the newer number).
PRUNE_MIN_CHANGES = 10_000

START_PRUNE = f"""
UPDATE unified_feed_pruned SET upto = (SELECT last_value FROM unified_change_seq)
WHERE (SELECT last_value FROM unified_change_seq) - upto > greatest(
    2 * (SELECT coalesce(sum(rows), 0) FROM unified_counts), {PRUNE_MIN_CHANGES})
RETURNING upto
"""

PRUNE_FEED = """
DELETE FROM unified_feed f
WHERE f.seq <= $1
    AND NOT EXISTS (SELECT FROM unified_data u WHERE u.name = f.name AND u.seq = f.seq)
"""


async def prune_feed(pool: asyncpg.Pool[Any]) -> int:
    """Delete stale entries of the feed's log when enough have accumulated;
    returns how many went."""
    async with pool.acquire() as conn, conn.transaction():
        # Two statements: in one, the server could read the whole log even
        # when there is nothing to do.
        upto = await conn.fetchval(START_PRUNE)
        if upto is None:
            return 0
        status: str = await conn.execute(PRUNE_FEED, upto)
    return int(status.split()[-1])
