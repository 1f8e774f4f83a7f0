"""The change feed as a log of its own, so row updates can be HOT; raw hashes first.

Until now ``GET /changes`` read ``unified_data`` through an index on ``seq``.
Every change of a row changes its ``seq``, so no update could be a HOT update:
each one wrote a new entry into every index of the table. The numbers now also
go, with the row's name, into ``unified_feed``, an append-only log written by
the same statement triggers in the same transaction; ``unified_data.seq`` keeps
the row's latest number and is no longer indexed. A log entry whose row has
since changed again (its number is no longer the row's) is skipped by the
reader and deleted later by ``persistence.changes.prune_feed``, which runs once
twice as many changes as the table has rows have been made since its last pass
(``unified_feed_pruned.upto``).

``unified_data`` keeps a tenth of each page free for those HOT updates.

The raw tables' unique constraints become ``(content_hash, source)``: the
hash, nearly always different, decides a comparison on its own, where the
source, nearly always equal, was compared first.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "kasparro_events"
RAW_TABLES = ("raw_api_data", "raw_csv_data", "raw_third_source_data")

_NOTIFY_RANGE = f"""
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('{CHANNEL}', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;"""


_LOG = "\n    INSERT INTO unified_feed (seq, name) SELECT seq, name FROM new_rows;"


def _inserted(log: bool) -> str:
    logged = _LOG if log else ""
    return f"""
CREATE OR REPLACE FUNCTION unified_feed_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    -- A name that comes back is no longer removed (checked only while tombstones exist).
    IF EXISTS (SELECT FROM unified_removals) THEN
        DELETE FROM unified_removals r USING new_rows n WHERE r.name = n.name;
    END IF;{logged}
    SELECT min(seq), max(seq) INTO lo, hi FROM new_rows;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
"""


def _updated(log: bool) -> str:
    logged = _LOG if log else ""
    return f"""
CREATE OR REPLACE FUNCTION unified_feed_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN{logged}
    SELECT min(seq) INTO lo FROM new_rows;
    IF lo IS NOT NULL THEN
        -- The statement's last number, a rename's tombstone included.
        hi := currval('unified_change_seq');
    END IF;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
"""


_TRUNCATING = """
CREATE FUNCTION unified_feed_log_truncating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Every row leaves (its tombstone is numbered by unified_feed_truncating).
    TRUNCATE unified_feed;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.execute(
        'CREATE TABLE unified_feed (seq bigint NOT NULL, name text COLLATE "C" NOT NULL,'
        " CONSTRAINT pk_unified_feed PRIMARY KEY (seq))"
    )
    op.execute("INSERT INTO unified_feed (seq, name) SELECT seq, name FROM unified_data")
    op.execute(
        "CREATE TABLE unified_feed_pruned (singleton boolean DEFAULT true NOT NULL,"
        " upto bigint NOT NULL,"
        " CONSTRAINT pk_unified_feed_pruned PRIMARY KEY (singleton),"
        " CONSTRAINT ck_unified_feed_pruned_singleton CHECK (singleton))"
    )
    op.execute(
        "INSERT INTO unified_feed_pruned (upto) SELECT coalesce(max(seq), 0) FROM unified_feed"
    )
    op.execute(_inserted(log=True))
    op.execute(_updated(log=True))
    op.execute(_TRUNCATING)
    op.execute(
        "CREATE TRIGGER unified_feed_log_truncate BEFORE TRUNCATE ON unified_data"
        " FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_log_truncating()"
    )
    op.execute("DROP INDEX ix_unified_data_seq")
    op.execute("ALTER TABLE unified_data SET (fillfactor = 90)")
    for table in RAW_TABLES:
        op.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT uq_{table}_content_hash_source"
            " UNIQUE (content_hash, source)"
        )
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT uq_{table}_source_content_hash")


def downgrade() -> None:
    for table in RAW_TABLES:
        op.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT uq_{table}_source_content_hash"
            " UNIQUE (source, content_hash)"
        )
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT uq_{table}_content_hash_source")
    op.execute("ALTER TABLE unified_data RESET (fillfactor)")
    op.execute("CREATE INDEX ix_unified_data_seq ON unified_data (seq)")
    op.execute("DROP TRIGGER unified_feed_log_truncate ON unified_data")
    op.execute("DROP FUNCTION unified_feed_log_truncating()")
    op.execute(_inserted(log=False))
    op.execute(_updated(log=False))
    op.execute("DROP TABLE unified_feed_pruned")
    op.execute("DROP TABLE unified_feed")
