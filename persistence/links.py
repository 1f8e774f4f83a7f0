"""``unified_links``: which unified row each (source, source_key) belongs to.

A key is the record's upstream id when its source maps one, else its canonical
name. Every key that brought a valid record has exactly one link; the unique
``(name, source)`` index keeps two keys of one source out of one row. Links are
created by the batch statement (``persistence.batches``) from the decisions of
``pipelines.identity``; this module holds the queries those decisions read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from persistence.types import Conn, Queryable

IDENTITY_LOCK_KEY = 0x6B61737061726F01
"""Transaction advisory lock held while new links are decided and written: two
sources linking new keys at once would each miss the other's new rows."""


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key of the batch that has no link yet, with what the batch says of it."""

    key: str
    name: str
    """Canonical name of its latest record in the batch."""
    symbol: str | None
    value: float
    observed_at: datetime


@dataclass(frozen=True, slots=True)
class NewLink:
    """The row a new key joins (``entity``) and why."""

    key: str
    entity: str
    rule: str
    confidence: float


@dataclass(frozen=True, slots=True)
class Member:
    """One stored link, with the current value of the row it belongs to."""

    source: str
    key: str
    entity: str
    names: tuple[str, ...]
    symbol: str | None
    value: float | None
    observed_at: datetime | None


def _member(row: Any) -> Member:
    return Member(
        source=row["source"],
        key=row["source_key"],
        entity=row["name"],
        names=tuple(row["names_seen"]),
        symbol=row["symbol"],
        value=row["value"],
        observed_at=row["observed_at"],
    )


OTHER_SOURCES_LINKS = """
SELECT l.source, l.source_key, l.name, l.names_seen, l.symbol, u.value, u.observed_at
FROM (
    -- Two ranges of the primary key: "<>" would read this source's links too.
    SELECT * FROM unified_links WHERE source < $1
    UNION ALL
    SELECT * FROM unified_links WHERE source > $1
) AS l
LEFT JOIN unified_data u ON u.name = l.name
ORDER BY l.name, l.source, l.source_key
"""


async def other_sources_links(conn: Queryable, source: str) -> list[Member]:
    """Every link of the sources other than ``source``: the candidates new keys are
    compared with."""
    return [_member(row) for row in await conn.fetch(OTHER_SOURCES_LINKS, source)]


async def other_sources_linked(conn: Queryable, source: str) -> bool:
    """Whether a source other than ``source`` has links."""
    # The nearest source on either side, each one probe of the primary key: an
    # EXISTS that the planner answers with a scan reads every link of ``source``
    # when no other source has any, and runs for every batch of new keys.
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM (SELECT source FROM unified_links WHERE source < $1 "
        "ORDER BY source DESC LIMIT 1) AS below) "
        "OR EXISTS (SELECT FROM (SELECT source FROM unified_links WHERE source > $1 "
        "ORDER BY source LIMIT 1) AS above)",
        source,
    )
    return found


RENAMED_KEYS = """
SELECT EXISTS (SELECT 1 FROM unified_links WHERE source = $1 AND name <> source_key)
"""


async def renamed_keys(conn: Queryable, source: str) -> bool:
    """Whether a key of ``source`` belongs to a row named otherwise than the key."""
    return bool(await conn.fetchval(RENAMED_KEYS, source))


NAMES_IN_USE = """
SELECT name, bool_or(source = $2) AS own
FROM unified_links WHERE name = ANY($1::text[])
GROUP BY name
"""


async def names_in_use(conn: Queryable, names: Sequence[str], source: str) -> dict[str, bool]:
    """Which of ``names`` are rows already, each with whether ``source`` has a key in it."""
    if not names:
        return {}
    rows = await conn.fetch(NAMES_IN_USE, list(names), source)
    return {row["name"]: bool(row["own"]) for row in rows}


ENTITY_MEMBERS = """
SELECT l.source, l.source_key, l.names_seen, l.rule, l.confidence
FROM unified_links l
WHERE l.name = $1
ORDER BY l.linked_at, l.source, l.source_key
"""

ENTITY_ROW = """
SELECT name, value, source, observed_at, ingested_at FROM unified_data WHERE name = $1
"""


@dataclass(frozen=True, slots=True)
class EntityMember:
    source: str
    source_key: str
    names_seen: list[str]
    rule: str
    confidence: float


@dataclass(frozen=True, slots=True)
class Entity:
    name: str
    members: list[EntityMember]
    row: dict[str, Any] | None
    """The unified row (name, value, source, observed_at, ingested_at), if any."""


async def entity(
    conn: Queryable, name: str, *, limit_seconds: float | None = None
) -> Entity | None:
    """The row ``name`` with every key linked to it; ``None`` when neither exists."""
    members = await conn.fetch(ENTITY_MEMBERS, name, timeout=limit_seconds)
    row = await conn.fetchrow(ENTITY_ROW, name, timeout=limit_seconds)
    if not members and row is None:
        return None
    return Entity(
        name=name,
        members=[
            EntityMember(
                source=m["source"],
                source_key=m["source_key"],
                names_seen=list(m["names_seen"]),
                rule=m["rule"],
                confidence=float(m["confidence"]),
            )
            for m in members
        ],
        row=None if row is None else dict(row),
    )


# -- reprocess -----------------------------------------------------------------------

ALL_LINKS = """
SELECT source, source_key, name, rule, linked_at FROM unified_links
ORDER BY linked_at, source, source_key
"""


@dataclass(frozen=True, slots=True)
class StoredLink:
    source: str
    key: str
    entity: str
    rule: str


async def all_links(conn: Conn) -> list[StoredLink]:
    """Every link, oldest first."""
    return [
        StoredLink(row["source"], row["source_key"], row["name"], row["rule"])
        for row in await conn.fetch(ALL_LINKS)
    ]


DROP_LINKS = """
DELETE FROM unified_links l
USING unnest($1::text[], $2::text[]) AS d(source, source_key)
WHERE l.source = d.source AND l.source_key = d.source_key
"""


async def drop_links(conn: Conn, keys: Sequence[tuple[str, str]]) -> int:
    """Forget these (source, key) links: their keys are decided again."""
    if not keys:
        return 0
    result: str = await conn.execute(
        DROP_LINKS, [source for source, _ in keys], [key for _, key in keys]
    )
    return int(result.rsplit(" ", 1)[-1])


async def any_links(conn: Conn, source: str) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM unified_links WHERE source = $1)", source
    )
    return found


LINKED_KEYS = """
SELECT source_key, name, names_seen, symbol FROM unified_links
WHERE source = $1 AND source_key = ANY($2::text[])
"""


async def linked_keys(
    conn: Conn, source: str, keys: Sequence[str]
) -> dict[str, tuple[str, list[str], str | None]]:
    """The links ``source`` has among ``keys``: the row, names seen and ticker of each."""
    rows = await conn.fetch(LINKED_KEYS, source, list(keys))
    return {
        row["source_key"]: (row["name"], list(row["names_seen"]), row["symbol"]) for row in rows
    }


INSERT_LINKS = """
INSERT INTO unified_links (source, source_key, name, rule, confidence, names_seen, symbol)
SELECT $1, t.key, t.name, t.rule, t.confidence, ARRAY[t.seen], t.symbol
FROM unnest($2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::text[])
    AS t(key, name, rule, confidence, seen, symbol)
"""


async def insert_links(conn: Conn, source: str, decided: Sequence[tuple[NewLink, NewKey]]) -> None:
    if decided:
        await conn.execute(
            INSERT_LINKS,
            source,
            [link.key for link, _ in decided],
            [link.entity for link, _ in decided],
            [link.rule for link, _ in decided],
            [link.confidence for link, _ in decided],
            [new.name for _, new in decided],
            [new.symbol for _, new in decided],
        )


UPDATE_SEEN = """
UPDATE unified_links AS l SET
    names_seen = CASE WHEN l.names_seen @> ARRAY[t.seen] THEN l.names_seen
                      ELSE l.names_seen || t.seen END,
    symbol = coalesce(t.symbol, l.symbol)
FROM unnest($2::text[], $3::text[], $4::text[]) AS t(key, seen, symbol)
WHERE l.source = $1 AND l.source_key = t.key COLLATE "C"
"""


async def update_seen(conn: Conn, source: str, seen: Sequence[tuple[str, str, str | None]]) -> None:
    """Remember new names and tickers of known keys: ``(key, name, symbol)``."""
    if seen:
        await conn.execute(
            UPDATE_SEEN,
            source,
            [key for key, _, _ in seen],
            [name for _, name, _ in seen],
            [symbol for _, _, symbol in seen],
        )
