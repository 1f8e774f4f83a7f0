"""Identity: per-source keys linked to unified rows (unified_links).

A row of ``unified_data`` is one asset; ``unified_links`` says which key of which
source (its upstream id, else its canonical name) belongs to it, by what rule
and with what confidence. ``(source, source_key)`` is the primary key (a key is
in one row) and ``(name, source)`` is unique (a row holds at most one key of a
source). ``names_seen`` keeps every canonical name a key was seen under, indexed
so that ``/data?name=`` finds a row by any of them.

The rows that exist are linked as they are: each to the key of its winning
record (its upstream id, else its name). Keys that never won a row are linked
when their records are read again, or by ``kasparro etl reprocess``, which
decides every key from the raw tables.

Statement triggers move ``unified_version`` when links change, so a kept
``/data`` page filtered by name is not served after a link that changes it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE FUNCTION unified_links_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Only statements that changed a link: most batches change none.
    IF EXISTS (SELECT 1 FROM changed_rows) THEN
        UPDATE unified_version SET version = pg_current_xact_id()::text::bigint;
    END IF;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "unified_links",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_key", sa.Text(collation="C"), nullable=False),
        sa.Column("name", sa.Text(collation="C"), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("names_seen", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("symbol", sa.Text(), nullable=True),
        sa.Column(
            "linked_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "confidence >= 0 AND confidence <= 1", name=op.f("ck_unified_links_confidence")
        ),
        sa.PrimaryKeyConstraint("source", "source_key", name=op.f("pk_unified_links")),
        sa.UniqueConstraint("name", "source", name=op.f("uq_unified_links_name_source")),
    )
    op.create_index(
        op.f("ix_unified_links_names_seen"),
        "unified_links",
        ["names_seen"],
        postgresql_using="gin",
    )
    op.execute(
        "INSERT INTO unified_links (source, source_key, name, rule, confidence, names_seen) "
        "SELECT source, coalesce(source_record_id, name), name, 'new', 1.0, ARRAY[name::text] "
        "FROM unified_data"
    )
    op.execute(_FUNCTION)
    for event, new, old in (
        ("insert", "NEW", None),
        ("update", "NEW", "OLD"),
        ("delete", None, "OLD"),
    ):
        table = new or old
        op.execute(
            f"CREATE TRIGGER unified_links_version_{event} AFTER {event.upper()} ON unified_links "
            f"REFERENCING {table} TABLE AS changed_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION unified_links_version_bump()"
        )


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER unified_links_version_{event} ON unified_links")
    op.execute("DROP FUNCTION unified_links_version_bump()")
    op.drop_index(op.f("ix_unified_links_names_seen"), table_name="unified_links")
    op.drop_table("unified_links")
