"""Row counts of unified_data per winning source, kept by statement triggers.

``GET /data`` reports an exact total on every page; counting the table per
request is what makes list endpoints slow. Statement-level triggers with
transition tables see exactly the rows each statement inserted, replaced or
deleted (even under concurrent writers), so the counts stay exact and cost one
small aggregate per batch, not per row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATEMENTS = (
    """
CREATE FUNCTION unified_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO unified_counts AS c (source, rows)
    SELECT source, count(*) FROM new_rows GROUP BY source
    ON CONFLICT (source) DO UPDATE SET rows = c.rows + excluded.rows;
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION unified_counts_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Each replaced row is once in old_rows and once in new_rows: the net change
    -- of a source is its new count minus its old count. No join of the two sets
    -- (they have no statistics, and a nested loop grows with the square).
    WITH delta AS (
        SELECT source, count(*) AS d FROM new_rows GROUP BY source
        UNION ALL
        SELECT source, -count(*) FROM old_rows GROUP BY source
    )
    INSERT INTO unified_counts AS c (source, rows)
    SELECT source, sum(d) FROM delta GROUP BY source HAVING sum(d) <> 0
    ON CONFLICT (source) DO UPDATE SET rows = c.rows + excluded.rows;
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION unified_counts_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE unified_counts AS c SET rows = c.rows - o.n
    FROM (SELECT source, count(*) AS n FROM old_rows GROUP BY source) AS o
    WHERE c.source = o.source;
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION unified_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM unified_counts;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER unified_counts_insert AFTER INSERT ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_add()
""",
    """
CREATE TRIGGER unified_counts_update AFTER UPDATE ON unified_data
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_move()
""",
    """
CREATE TRIGGER unified_counts_delete AFTER DELETE ON unified_data
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_remove()
""",
    """
CREATE TRIGGER unified_counts_truncate AFTER TRUNCATE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_counts_clear()
""",
)


def upgrade() -> None:
    op.create_table(
        "unified_counts",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_unified_counts")),
    )
    op.execute(
        "INSERT INTO unified_counts (source, rows) "
        "SELECT source, count(*) FROM unified_data GROUP BY source"
    )
    for statement in _STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for trigger in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER unified_counts_{trigger} ON unified_data")
    for function in ("add", "move", "remove", "clear"):
        op.execute(f"DROP FUNCTION unified_counts_{function}()")
    op.drop_table("unified_counts")
