"""Run coordination that holds through a transaction pooler.

A run takes a lease per source (``etl_leases``: one row per source, the run
that holds it, an expiry the live run keeps renewing), in short transactions,
so it works where session state does not survive (PgBouncer in transaction
mode). A lease whose expiry has passed belongs to a process that is gone: the
next run deletes it and closes the source of that run as interrupted, in one
transaction. A run source that is no longer ``running`` refuses every change
(trigger below), so no batch of a run can commit after its source was closed,
whatever its process still had on the wire.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GUARD = """
CREATE FUNCTION etl_run_sources_closed_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'run % no longer holds source %', OLD.run_id, OLD.source
        USING ERRCODE = 'object_not_in_prerequisite_state';
END $$
"""


def upgrade() -> None:
    op.create_table(
        "etl_leases",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column(
            "acquired_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "renewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["etl_runs.id"],
            name=op.f("fk_etl_leases_run_id_etl_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_etl_leases")),
    )
    op.create_index(op.f("ix_etl_leases_run_id"), "etl_leases", ["run_id"], unique=False)
    # Finding the open run sources (a few) must not scan every run's.
    op.create_index(
        "ix_etl_run_sources_running",
        "etl_run_sources",
        ["run_id"],
        unique=False,
        postgresql_where=sa.text("status = 'running'"),
    )
    op.execute(_GUARD)
    op.execute(
        "CREATE TRIGGER etl_run_sources_closed BEFORE UPDATE ON etl_run_sources "
        "FOR EACH ROW WHEN (OLD.status <> 'running') "
        "EXECUTE FUNCTION etl_run_sources_closed_guard()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER etl_run_sources_closed ON etl_run_sources")
    op.execute("DROP FUNCTION etl_run_sources_closed_guard()")
    op.drop_index("ix_etl_run_sources_running", table_name="etl_run_sources")
    op.drop_index(op.f("ix_etl_leases_run_id"), table_name="etl_leases")
    op.drop_table("etl_leases")
