"""Totals that the etl_* metrics read, kept by the writing transactions.

Every replica must report the same figures, whichever process ran the run (the
service, ``kasparro etl run`` from a CronJob) and across restarts, so they are
kept in the database: statement triggers on ``etl_runs``, ``etl_run_sources``
and ``etl_drift_events`` add what each statement changed to small totals
tables, in the same transaction, whatever code path wrote the rows. A scrape
reads a few dozen rows, however many runs there are. Totals only grow: deleting
old runs does not take back what they counted.

- ``etl_metric_runs``: per final status, the runs that reached it and the sum
  of their durations (a run is counted once, when it leaves ``running``);
- ``etl_metric_durations``: per histogram bucket (upper bound ``le``), the runs
  whose duration falls in it (not cumulative; ``Infinity`` closes the list);
- ``etl_metric_sources``: per source, its failures in runs, the sum of each
  record count of ``etl_run_sources``, and the finish time of the last run in
  which it succeeded;
- ``etl_metric_drift``: schema drift events per source and kind.

Existing rows are counted when the migration runs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Steps between 10 s and 30 s and beyond: a large file or a slow upstream takes
# that long, and a quantile can only be as precise as the buckets around it.
BUCKETS = (
    0.1,
    0.25,
    0.5,
    1,
    2,
    3,
    5,
    7.5,
    10,
    12.5,
    15,
    20,
    25,
    30,
    45,
    60,
    90,
    120,
    180,
    300,
    600,
    1200,
    1800,
    3600,
)
_FINAL = "('success', 'partial', 'failed')"
_COUNTS = ("fetched", "raw_inserted", "duplicates", "rejected", "unified_upserted")

# Runs that reach a final status: counted by status, by duration bucket, and
# the finish time of each of their successful sources. ``finished`` is the rows
# (id, status, started_at, finished_at) that did.
_COUNT_FINISHED = """
WITH done AS (
    SELECT id, status, coalesce(finished_at, now()) AS finished_at,
        greatest(extract(epoch FROM coalesce(finished_at, now()) - started_at), 0)::float8
            AS seconds
    FROM finished
),
by_status AS (
    INSERT INTO etl_metric_runs AS m (status, runs, duration_seconds)
    SELECT status, count(*), sum(seconds) FROM done GROUP BY status
    ON CONFLICT (status) DO UPDATE SET runs = m.runs + excluded.runs,
        duration_seconds = m.duration_seconds + excluded.duration_seconds
),
by_bucket AS (
    UPDATE etl_metric_durations AS b SET runs = b.runs + d.runs
    FROM (
        SELECT bound.le, count(*) AS runs
        FROM done CROSS JOIN LATERAL (
            SELECT min(le) AS le FROM etl_metric_durations WHERE le >= done.seconds
        ) AS bound
        GROUP BY bound.le
    ) AS d
    WHERE b.le = d.le
)
INSERT INTO etl_metric_sources AS m (source, last_success_at)
SELECT s.source, max(done.finished_at)
FROM done JOIN etl_run_sources AS s ON s.run_id = done.id
WHERE s.status = 'success'
GROUP BY s.source
ON CONFLICT (source) DO UPDATE
    SET last_success_at = greatest(m.last_success_at, excluded.last_success_at)
"""

# Record counts, failures, and a success recorded after its run was closed
# (the run's trigger counts the sources already closed when it is). ``changed``
# is (source, run_id, status, was_status, the five counts, the five before).
_add = ", ".join(f"{c} = m.{c} + excluded.{c}" for c in _COUNTS)
_COUNT_SOURCES = f"""
INSERT INTO etl_metric_sources AS m (source, failures, {", ".join(_COUNTS)}, last_success_at)
SELECT c.source,
    count(*) FILTER (WHERE c.status = 'failed' AND c.was_status IS DISTINCT FROM 'failed'),
    {", ".join(f"sum(greatest(c.{n} - coalesce(c.was_{n}, 0), 0))" for n in _COUNTS)},
    max(r.finished_at) FILTER (
        WHERE c.status = 'success' AND c.was_status IS DISTINCT FROM 'success'
            AND r.status IN {_FINAL}
    )
FROM changed AS c LEFT JOIN etl_runs AS r ON r.id = c.run_id
GROUP BY c.source
ON CONFLICT (source) DO UPDATE SET failures = m.failures + excluded.failures, {_add},
    last_success_at = greatest(m.last_success_at, excluded.last_success_at)
"""

_was = ", ".join(f"o.{c} AS was_{c}" for c in _COUNTS)
_none = ", ".join(f"NULL::bigint AS was_{c}" for c in _COUNTS)
_counts = ", ".join(f"n.{c}" for c in _COUNTS)

_FUNCTIONS = {
    "etl_metric_runs_inserted": f"""
WITH finished AS (SELECT * FROM new_rows WHERE status IN {_FINAL})
{_COUNT_FINISHED.replace("WITH done AS", ", done AS", 1)}
""",
    "etl_metric_runs_updated": f"""
WITH finished AS (
    SELECT n.* FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.status IN {_FINAL} AND o.status NOT IN {_FINAL}
)
{_COUNT_FINISHED.replace("WITH done AS", ", done AS", 1)}
""",
    "etl_metric_sources_inserted": f"""
WITH changed AS (
    SELECT n.source, n.run_id, n.status, NULL::text AS was_status, {_counts}, {_none}
    FROM new_rows AS n
)
{_COUNT_SOURCES}
""",
    "etl_metric_sources_updated": f"""
WITH changed AS (
    SELECT n.source, n.run_id, n.status, o.status AS was_status, {_counts}, {_was}
    FROM new_rows AS n JOIN old_rows AS o ON o.run_id = n.run_id AND o.source = n.source
)
{_COUNT_SOURCES}
""",
    "etl_metric_drift_inserted": """
INSERT INTO etl_metric_drift AS m (source, kind, events)
SELECT source, kind, count(*) FROM new_rows GROUP BY source, kind
ON CONFLICT (source, kind) DO UPDATE SET events = m.events + excluded.events
""",
}

# (trigger, table, event, transition tables, function)
_TRIGGERS = (
    ("etl_metric_runs_insert", "etl_runs", "INSERT", "NEW TABLE AS new_rows", "inserted"),
    (
        "etl_metric_runs_update",
        "etl_runs",
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "updated",
    ),
    ("etl_metric_sources_insert", "etl_run_sources", "INSERT", "NEW TABLE AS new_rows", "inserted"),
    (
        "etl_metric_sources_update",
        "etl_run_sources",
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "updated",
    ),
    ("etl_metric_drift_insert", "etl_drift_events", "INSERT", "NEW TABLE AS new_rows", "inserted"),
)
_FUNCTION_OF = {
    "etl_runs": "etl_metric_runs",
    "etl_run_sources": "etl_metric_sources",
    "etl_drift_events": "etl_metric_drift",
}

# What the rows already there add up to; run after the triggers exist (creating
# them locks the tables against writers until this transaction commits).
_BACKFILL = (
    f"""
WITH finished AS (SELECT * FROM etl_runs WHERE status IN {_FINAL})
{_COUNT_FINISHED.replace("WITH done AS", ", done AS", 1).replace("now()", "started_at")}
""",
    f"""
WITH changed AS (
    SELECT n.source, n.run_id, n.status, NULL::text AS was_status, {_counts}, {_none}
    FROM etl_run_sources AS n
)
{_COUNT_SOURCES}
""",
    """
INSERT INTO etl_metric_drift (source, kind, events)
SELECT source, kind, count(*) FROM etl_drift_events GROUP BY source, kind
""",
)


def upgrade() -> None:
    op.create_table(
        "etl_metric_runs",
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("runs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("duration_seconds", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("status", name=op.f("pk_etl_metric_runs")),
    )
    op.create_table(
        "etl_metric_durations",
        sa.Column("le", sa.Double(), nullable=False),
        sa.Column("runs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("le", name=op.f("pk_etl_metric_durations")),
    )
    op.create_table(
        "etl_metric_sources",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("failures", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), server_default=sa.text("0"), nullable=False)
            for name in _COUNTS
        ),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_etl_metric_sources")),
    )
    op.create_table(
        "etl_metric_drift",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("events", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("source", "kind", name=op.f("pk_etl_metric_drift")),
    )
    bounds = "".join(f"({float(b)!r}), " for b in BUCKETS)
    op.execute(f"INSERT INTO etl_metric_durations (le) VALUES {bounds}('Infinity')")
    for name, body in _FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n{body.strip()};\n    RETURN NULL;\nEND $$"
        )
    for trigger, table, event, transitions, suffix in _TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {trigger} AFTER {event} ON {table} "
            f"REFERENCING {transitions} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {_FUNCTION_OF[table]}_{suffix}()"
        )
    for statement in _BACKFILL:
        op.execute(statement)


def downgrade() -> None:
    for trigger, table, *_ in _TRIGGERS:
        op.execute(f"DROP TRIGGER {trigger} ON {table}")
    for name in _FUNCTIONS:
        op.execute(f"DROP FUNCTION {name}()")
    for table in ("drift", "sources", "durations", "runs"):
        op.drop_table(f"etl_metric_{table}")
