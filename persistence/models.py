"""SQLAlchemy models of every table; Alembic migrations are written against these.

The runtime never calls ``create_all``: the schema comes from ``alembic/versions``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: One sequence for every raw table: ids then follow ingestion order across
#: sources, which is the last tie-break of the winner rule.
raw_record_seq = Sequence("raw_record_seq")
#: The change feed's numbers (migration 0007), drawn by a trigger on every
#: insert or update of a unified row and for every tombstone.
unified_change_seq = Sequence("unified_change_seq")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class _RawColumns:
    """Columns shared by the raw tables: the record exactly as received."""

    id: Mapped[int] = mapped_column(
        BigInteger, raw_record_seq, server_default=raw_record_seq.next_value(), primary_key=True
    )
    source: Mapped[str] = mapped_column(Text)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    content_hash: Mapped[bytes] = mapped_column(LargeBinary)
    payload: Mapped[Any] = mapped_column(JSONB)
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )


class RawApiData(_RawColumns, Base):
    __tablename__ = "raw_api_data"
    __table_args__ = (UniqueConstraint("content_hash", "source"),)


class RawCsvData(_RawColumns, Base):
    __tablename__ = "raw_csv_data"
    __table_args__ = (UniqueConstraint("content_hash", "source"),)


class RawThirdSourceData(_RawColumns, Base):
    __tablename__ = "raw_third_source_data"
    __table_args__ = (UniqueConstraint("content_hash", "source"),)


class UnifiedData(Base):
    """One row per canonical name: the winner across sources."""

    __tablename__ = "unified_data"

    # Collation "C": a key compared byte for byte (migration 0004).
    name: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    value: Mapped[float] = mapped_column(Double)
    source: Mapped[str] = mapped_column(Text)
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Winner tie-breaks: smaller priority (earlier in the sources file) wins,
    # then the later raw id.
    priority: Mapped[int] = mapped_column(Integer)
    raw_id: Mapped[int] = mapped_column(BigInteger)
    source_record_id: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    # The row's latest change in the feed, set by a trigger (migration 0007);
    # numbers follow commit order. Not indexed, so updates can be HOT: the feed
    # is read through ``unified_feed`` (migration 0010).
    seq: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "source", "name"), {"postgresql_with": {"fillfactor": 90}})


class UnifiedFeed(Base):
    """The change feed's log: every number drawn for a change of ``unified_data``
    with the row's name, written by the same triggers (migration 0010). An entry
    whose number is no longer its row's is stale: skipped, and deleted later."""

    __tablename__ = "unified_feed"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text(collation="C"))


class UnifiedFeedPruned(Base):
    """One row: the last number drawn when stale feed entries were last deleted."""

    __tablename__ = "unified_feed_pruned"
    __table_args__ = (CheckConstraint("singleton", name="singleton"),)

    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=true())
    upto: Mapped[int] = mapped_column(BigInteger)


class UnifiedRemoval(Base):
    """A tombstone: a name that left ``unified_data``, numbered in the change feed
    like a change (migration 0007); it goes when the name comes back."""

    __tablename__ = "unified_removals"

    name: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    removed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (Index(None, "seq"),)


class UnifiedLink(Base):
    """Which row of ``unified_data`` each key of each source belongs to (migration 0006).

    A key is the record's upstream id when its source maps one, else its
    canonical name. A row holds at most one key per source.
    """

    __tablename__ = "unified_links"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    source_key: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    # The unified_data row (no foreign key: reprocess empties that table).
    name: Mapped[str] = mapped_column(Text(collation="C"))
    # What linked it: new (started the row), name, id, symbol, value, manual.
    rule: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Double)
    names_seen: Mapped[list[str]] = mapped_column(ARRAY(Text))
    symbol: Mapped[str | None] = mapped_column(Text)
    linked_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (
        UniqueConstraint("name", "source"),
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence"),
        # Only links seen under a name other than their row's (migration 0009).
        Index(
            None,
            "names_seen",
            postgresql_using="gin",
            postgresql_where=text('names_seen <> ARRAY[name COLLATE "default"]'),
        ),
    )


class UnifiedCount(Base):
    """Rows of ``unified_data`` per winning source, kept exact by statement
    triggers (migration 0002) so that totals never count the table."""

    __tablename__ = "unified_counts"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    rows: Mapped[int] = mapped_column(BigInteger)


class UnifiedVersion(Base):
    """One row: the id of the last transaction that changed ``unified_data``, set by
    statement triggers (migration 0003); ``/data`` serves a kept page only while it
    is unchanged."""

    __tablename__ = "unified_version"
    __table_args__ = (CheckConstraint("singleton", name="singleton"),)

    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=true())
    version: Mapped[int] = mapped_column(BigInteger)


class EtlCheckpoint(Base):
    __tablename__ = "etl_checkpoint"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    cursor: Mapped[Any] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    schema: Mapped[Any] = mapped_column(JSONB, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )


class EtlRun(Base):
    __tablename__ = "etl_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    trigger: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "started_at"), Index(None, "status"))


class EtlRunSource(Base):
    """Per-source counters of a run, updated in each batch's transaction."""

    __tablename__ = "etl_run_sources"

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("etl_runs.id", ondelete="CASCADE"), primary_key=True
    )
    source: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    status: Mapped[str] = mapped_column(Text)
    fetched: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    raw_inserted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    duplicates: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rejected: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    unified_upserted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    drift: Mapped[Any] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(None, "source", "finished_at"),
        Index("ix_etl_run_sources_running", "run_id", postgresql_where=text("status = 'running'")),
    )


class EtlLease(Base):
    """The run that ingests a source now, while it keeps renewing ``expires_at``.

    A row whose expiry has passed belongs to a process that is gone (migration 0008).
    """

    __tablename__ = "etl_leases"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("etl_runs.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(Text)
    """``host:pid`` of the process that runs it, for operators."""
    acquired_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    renewed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EtlRejection(Base):
    """A raw record that failed validation, with the field and a readable reason."""

    __tablename__ = "etl_rejections"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    source: Mapped[str] = mapped_column(Text)
    raw_table: Mapped[str] = mapped_column(Text)
    raw_id: Mapped[int] = mapped_column(BigInteger)
    field: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (Index(None, "run_id", "source"), Index(None, "source", "id"))


class EtlDriftEvent(Base):
    __tablename__ = "etl_drift_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    source: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    field: Mapped[str] = mapped_column(Text)
    new_field: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Double)
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (Index(None, "run_id", "source"),)


# Totals the etl_* metrics read, kept by statement triggers on etl_runs,
# etl_run_sources and etl_drift_events (migration 0005).


class EtlMetricRuns(Base):
    """Finished runs per final status, and the sum of their durations."""

    __tablename__ = "etl_metric_runs"

    status: Mapped[str] = mapped_column(Text, primary_key=True)
    runs: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    duration_seconds: Mapped[float] = mapped_column(Double, server_default=text("0"))


class EtlMetricDurations(Base):
    """Finished runs per duration bucket (upper bound ``le``; not cumulative)."""

    __tablename__ = "etl_metric_durations"

    le: Mapped[float] = mapped_column(Double, primary_key=True)
    runs: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class EtlMetricSources(Base):
    """Per source: failures in runs, record counts, the last successful run's finish."""

    __tablename__ = "etl_metric_sources"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    failures: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    fetched: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    raw_inserted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    duplicates: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rejected: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    unified_upserted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EtlMetricDrift(Base):
    """Schema drift events per source and kind."""

    __tablename__ = "etl_metric_drift"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
