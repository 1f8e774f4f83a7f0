"""The change feed's reads: unified rows and tombstones in the order of their number.

Every insert or update of a unified row gives it the next number of
``unified_change_seq``, and every removal leaves a tombstone numbered the same
way (migration 0007). Numbers are drawn under a lock held to commit, so the
changes a reader sees are always every change up to some point: a change that
commits later carries a larger number than any the reader has seen. Reading
past ``after`` therefore misses nothing and repeats nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from persistence.reads import ITEM_JSON, READ_TIMEOUT_SECONDS, SHORTEST_FLOATS

if TYPE_CHECKING:
    from persistence.reads import Executor

#: A change as the JSON object ``/changes`` shows: the ``/data`` item with its
#: number first and ``"deleted":false`` last.
CHANGE_JSON = f"""'{{"seq":' || seq || ',' || substr(left({ITEM_JSON}, -1), 2)
    || ',"deleted":false}}'"""
#: A tombstone: the name, no state, ``"deleted":true``.
REMOVAL_JSON = """'{"seq":' || seq || ',"name":' || to_json(name)::text
    || ',"value":null,"source":null,"observed_at":null,"ingested_at":null,"deleted":true}'"""

# Each branch is one range scan of its seq index; the page is the first $2 of both.
# Floats render in their shortest exact form (SHORTEST_FLOATS, as for /data).
CHANGES_PAGE = f"""
SELECT '[' || coalesce(string_agg(c.item, ',' ORDER BY c.seq), '') || ']' AS items,
    max(c.seq) AS last_seq, count(*) AS n
FROM {SHORTEST_FLOATS}
CROSS JOIN LATERAL (
    SELECT seq, item FROM (
        (SELECT seq, {CHANGE_JSON} AS item
         FROM unified_data WHERE seq > $1 AND floats.digits IS NOT NULL ORDER BY seq LIMIT $2)
        UNION ALL
        (SELECT seq, {REMOVAL_JSON} AS item
         FROM unified_removals WHERE seq > $1 ORDER BY seq LIMIT $2)
    ) AS both_kinds
    ORDER BY seq LIMIT $2
) AS c
"""


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
    found = await db.fetchrow(CHANGES_PAGE, after, limit, timeout=READ_TIMEOUT_SECONDS)
    assert found is not None  # an aggregate: always one row
    items, last_seq, n = found
    return ChangePage(items, after if last_seq is None else int(last_seq), int(n))


LATEST_SEQ = """
SELECT greatest(
    (SELECT max(seq) FROM unified_data), (SELECT max(seq) FROM unified_removals), 0)
"""


async def latest_seq(db: Executor) -> int:
    """The largest number of any change visible now (0 when there is none)."""
    value: int = await db.fetchval(LATEST_SEQ, timeout=READ_TIMEOUT_SECONDS)
    return int(value)
