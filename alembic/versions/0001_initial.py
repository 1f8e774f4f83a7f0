"""Initial schema: raw tables, unified table, checkpoints, runs, rejections, drift.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One id sequence for every raw table: ids follow ingestion order across sources.
    op.execute(sa.schema.CreateSequence(sa.Sequence("raw_record_seq")))
    op.create_table(
        "etl_checkpoint",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column(
            "cursor",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("schema", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_etl_checkpoint")),
    )
    op.create_table(
        "etl_drift_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("field", sa.Text(), nullable=False),
        sa.Column("new_field", sa.Text(), nullable=True),
        sa.Column("confidence", sa.Double(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_etl_drift_events")),
    )
    op.create_index(
        op.f("ix_etl_drift_events_run_id_source"),
        "etl_drift_events",
        ["run_id", "source"],
        unique=False,
    )
    op.create_table(
        "etl_rejections",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("raw_table", sa.Text(), nullable=False),
        sa.Column("raw_id", sa.BigInteger(), nullable=False),
        sa.Column("field", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_etl_rejections")),
    )
    op.create_index(
        op.f("ix_etl_rejections_run_id_source"),
        "etl_rejections",
        ["run_id", "source"],
        unique=False,
    )
    op.create_index(
        op.f("ix_etl_rejections_source_id"), "etl_rejections", ["source", "id"], unique=False
    )
    op.create_table(
        "etl_runs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("trigger", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_etl_runs")),
    )
    op.create_index(op.f("ix_etl_runs_started_at"), "etl_runs", ["started_at"], unique=False)
    op.create_index(op.f("ix_etl_runs_status"), "etl_runs", ["status"], unique=False)
    op.create_table(
        "raw_api_data",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('raw_record_seq')"),
            nullable=False,
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_api_data")),
        sa.UniqueConstraint(
            "source", "content_hash", name=op.f("uq_raw_api_data_source_content_hash")
        ),
    )
    op.create_table(
        "raw_csv_data",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('raw_record_seq')"),
            nullable=False,
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_csv_data")),
        sa.UniqueConstraint(
            "source", "content_hash", name=op.f("uq_raw_csv_data_source_content_hash")
        ),
    )
    op.create_table(
        "raw_third_source_data",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('raw_record_seq')"),
            nullable=False,
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_third_source_data")),
        sa.UniqueConstraint(
            "source", "content_hash", name=op.f("uq_raw_third_source_data_source_content_hash")
        ),
    )
    op.create_table(
        "unified_data",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("raw_id", sa.BigInteger(), nullable=False),
        sa.Column("source_record_id", sa.Text(), nullable=True),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_unified_data")),
    )
    op.create_index(
        op.f("ix_unified_data_source_name"), "unified_data", ["source", "name"], unique=False
    )
    op.create_table(
        "etl_run_sources",
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("fetched", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("raw_inserted", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("rejected", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("unified_upserted", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "drift",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["etl_runs.id"],
            name=op.f("fk_etl_run_sources_run_id_etl_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "source", name=op.f("pk_etl_run_sources")),
    )
    op.create_index(
        op.f("ix_etl_run_sources_source_finished_at"),
        "etl_run_sources",
        ["source", "finished_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_etl_run_sources_source_finished_at"), table_name="etl_run_sources")
    op.drop_table("etl_run_sources")
    op.drop_index(op.f("ix_unified_data_source_name"), table_name="unified_data")
    op.drop_table("unified_data")
    op.drop_table("raw_third_source_data")
    op.drop_table("raw_csv_data")
    op.drop_table("raw_api_data")
    op.drop_index(op.f("ix_etl_runs_status"), table_name="etl_runs")
    op.drop_index(op.f("ix_etl_runs_started_at"), table_name="etl_runs")
    op.drop_table("etl_runs")
    op.drop_index(op.f("ix_etl_rejections_source_id"), table_name="etl_rejections")
    op.drop_index(op.f("ix_etl_rejections_run_id_source"), table_name="etl_rejections")
    op.drop_table("etl_rejections")
    op.drop_index(op.f("ix_etl_drift_events_run_id_source"), table_name="etl_drift_events")
    op.drop_table("etl_drift_events")
    op.drop_table("etl_checkpoint")
    op.execute(sa.schema.DropSequence(sa.Sequence("raw_record_seq")))
