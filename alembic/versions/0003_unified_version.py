"""The version of unified_data: the id of the last transaction that changed it.

``GET /data`` keeps rendered pages and serves one again only while the version
it was read at is still the current one. A statement trigger sets the version in
the same transaction as every change of ``unified_data`` (insert, update,
delete, truncate), so a page is never served after the change that outdates it
became visible. The trigger fires before the ``unified_counts`` triggers (they
fire in name order), so concurrent writers always lock the version row first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENTS = ("insert", "update", "delete", "truncate")

_FUNCTION = """
CREATE FUNCTION unified_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Transaction ids never repeat in a cluster: two changes never share a version.
    UPDATE unified_version SET version = pg_current_xact_id()::text::bigint;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "unified_version",
        sa.Column("singleton", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("singleton", name=op.f("ck_unified_version_singleton")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_unified_version")),
    )
    op.execute("INSERT INTO unified_version (version) VALUES (pg_current_xact_id()::text::bigint)")
    op.execute(_FUNCTION)
    for event in _EVENTS:
        op.execute(
            f"CREATE TRIGGER unified_a_version_{event} AFTER {event.upper()} ON unified_data "
            "FOR EACH STATEMENT EXECUTE FUNCTION unified_version_bump()"
        )


def downgrade() -> None:
    for event in _EVENTS:
        op.execute(f"DROP TRIGGER unified_a_version_{event} ON unified_data")
    op.execute("DROP FUNCTION unified_version_bump()")
    op.drop_table("unified_version")
