"""Change feed: a sequence number on every change of unified_data, and events.

``GET /changes`` serves unified rows in the order of ``seq``, a number each row
gets from a BEFORE ROW trigger every time it is inserted or updated (whoever
writes: the batch statement, ``etl reprocess``, an operator's SQL). A row
carries only its latest number, so a row changed twice shows once, with its
latest state. A row that leaves the table (a delete, the truncation of ``etl
reprocess``, a rename) leaves a tombstone in ``unified_removals`` with a number
of its own; a tombstone goes when its name comes back.

Numbers follow commit order. A consumer that has read number N must never
later see a change numbered below N appear: so every statement that changes
``unified_data`` first takes one transaction-scoped advisory lock, held to the
end of its transaction, and draws its numbers under it. A writer that commits
later took the lock later and drew larger numbers. (The transaction id alone
would not do: a transaction may get its id before another and draw its numbers
after it. The version row of migration 0003 already serialises these writers at
the end of each statement; the lock makes the order hold on its own, and takes
effect before any number is drawn.)

Events: the triggers send ``pg_notify('kasparro_events', ...)`` in the writing
transaction, so every listener on the database hears of it at commit, whichever
process wrote: ``unified_changed`` with the range of numbers a statement drew,
``run_started`` when a run is recorded and ``run_finished`` when it leaves
``running``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FEED_LOCK_KEY = 0x6B61737066656564
"""The advisory lock under which changes of unified_data draw their numbers."""
CHANNEL = "kasparro_events"

_NOTIFY_RANGE = f"""
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('{CHANNEL}', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;"""

_STATEMENTS = (
    "CREATE SEQUENCE unified_change_seq AS bigint",
    # Numbers the rows already there; from now on the trigger numbers every row.
    "ALTER TABLE unified_data ADD COLUMN seq bigint DEFAULT nextval('unified_change_seq') NOT NULL",
    "ALTER TABLE unified_data ALTER COLUMN seq DROP DEFAULT",
    "ALTER SEQUENCE unified_change_seq OWNED BY unified_data.seq",
    "CREATE INDEX ix_unified_data_seq ON unified_data (seq)",
    """
CREATE TABLE unified_removals (
    name text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    removed_at timestamptz DEFAULT now() NOT NULL,
    CONSTRAINT pk_unified_removals PRIMARY KEY (name)
)
""",
    "CREATE INDEX ix_unified_removals_seq ON unified_removals (seq)",
    f"""
CREATE FUNCTION unified_feed_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Held to the end of the transaction: numbers are drawn in commit order.
    PERFORM pg_advisory_xact_lock({FEED_LOCK_KEY});
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION unified_feed_number() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.seq := nextval('unified_change_seq');
    IF TG_OP = 'UPDATE' AND NEW.name IS DISTINCT FROM OLD.name THEN
        -- A rename removes the old name and brings the new one (back).
        INSERT INTO unified_removals AS r (name, seq)
        VALUES (OLD.name, nextval('unified_change_seq'))
        ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, removed_at = now();
        DELETE FROM unified_removals WHERE name = NEW.name;
    END IF;
    RETURN NEW;
END $$
""",
    f"""
CREATE FUNCTION unified_feed_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    -- A name that comes back is no longer removed (checked only while tombstones exist).
    IF EXISTS (SELECT FROM unified_removals) THEN
        DELETE FROM unified_removals r USING new_rows n WHERE r.name = n.name;
    END IF;
    SELECT min(seq), max(seq) INTO lo, hi FROM new_rows;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
""",
    f"""
CREATE FUNCTION unified_feed_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    SELECT min(seq) INTO lo FROM new_rows;
    IF lo IS NOT NULL THEN
        -- The statement's last number, a rename's tombstone included.
        hi := currval('unified_change_seq');
    END IF;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
""",
    f"""
CREATE FUNCTION unified_feed_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    WITH gone AS (
        INSERT INTO unified_removals AS r (name, seq)
        SELECT name, nextval('unified_change_seq') FROM old_rows
        ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, removed_at = now()
        RETURNING r.seq
    )
    SELECT min(seq), max(seq) INTO lo, hi FROM gone;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
""",
    f"""
CREATE FUNCTION unified_feed_truncating() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({FEED_LOCK_KEY});
    -- Every row leaves; those written again later in the transaction lose
    -- their tombstone then.
    WITH gone AS (
        INSERT INTO unified_removals AS r (name, seq)
        SELECT name, nextval('unified_change_seq') FROM unified_data
        ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, removed_at = now()
        RETURNING r.seq
    )
    SELECT min(seq), max(seq) INTO lo, hi FROM gone;{_NOTIFY_RANGE}
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER unified_feed_lock BEFORE INSERT OR UPDATE OR DELETE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_lock()
""",
    """
CREATE TRIGGER unified_feed_number BEFORE INSERT OR UPDATE ON unified_data
    FOR EACH ROW EXECUTE FUNCTION unified_feed_number()
""",
    """
CREATE TRIGGER unified_feed_insert AFTER INSERT ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_inserted()
""",
    """
CREATE TRIGGER unified_feed_update AFTER UPDATE ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_updated()
""",
    """
CREATE TRIGGER unified_feed_delete AFTER DELETE ON unified_data
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_deleted()
""",
    """
CREATE TRIGGER unified_feed_truncate BEFORE TRUNCATE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_truncating()
""",
    f"""
CREATE FUNCTION etl_runs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('{CHANNEL}',
            json_build_object('event', 'run_started', 'id', NEW.id)::text);
    ELSIF OLD.status = 'running' AND NEW.status <> 'running' THEN
        PERFORM pg_notify('{CHANNEL}',
            json_build_object('event', 'run_finished', 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER etl_runs_events AFTER INSERT OR UPDATE OF status ON etl_runs
    FOR EACH ROW EXECUTE FUNCTION etl_runs_notify()
""",
)

_UNIFIED_TRIGGERS = ("lock", "number", "insert", "update", "delete", "truncate")
_FUNCTIONS = ("lock", "number", "inserted", "updated", "deleted", "truncating")


def upgrade() -> None:
    for statement in _STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER etl_runs_events ON etl_runs")
    op.execute("DROP FUNCTION etl_runs_notify()")
    for trigger in _UNIFIED_TRIGGERS:
        op.execute(f"DROP TRIGGER unified_feed_{trigger} ON unified_data")
    for function in _FUNCTIONS:
        op.execute(f"DROP FUNCTION unified_feed_{function}()")
    op.drop_table("unified_removals")
    op.execute("ALTER TABLE unified_data DROP COLUMN seq")
