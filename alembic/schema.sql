BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE SEQUENCE raw_record_seq;

CREATE TABLE etl_checkpoint (
    source TEXT NOT NULL, 
    cursor JSONB DEFAULT '{}'::jsonb NOT NULL, 
    schema JSONB, 
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_etl_checkpoint PRIMARY KEY (source)
);

CREATE TABLE etl_drift_events (
    id BIGSERIAL NOT NULL, 
    run_id UUID NOT NULL, 
    source TEXT NOT NULL, 
    kind TEXT NOT NULL, 
    field TEXT NOT NULL, 
    new_field TEXT, 
    confidence DOUBLE PRECISION, 
    detail TEXT NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_etl_drift_events PRIMARY KEY (id)
);

CREATE INDEX ix_etl_drift_events_run_id_source ON etl_drift_events (run_id, source);

CREATE TABLE etl_rejections (
    id BIGSERIAL NOT NULL, 
    run_id UUID NOT NULL, 
    source TEXT NOT NULL, 
    raw_table TEXT NOT NULL, 
    raw_id BIGINT NOT NULL, 
    field TEXT NOT NULL, 
    reason TEXT NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_etl_rejections PRIMARY KEY (id)
);

CREATE INDEX ix_etl_rejections_run_id_source ON etl_rejections (run_id, source);

CREATE INDEX ix_etl_rejections_source_id ON etl_rejections (source, id);

CREATE TABLE etl_runs (
    id UUID NOT NULL, 
    trigger TEXT NOT NULL, 
    status TEXT NOT NULL, 
    started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    finished_at TIMESTAMP WITH TIME ZONE, 
    error TEXT, 
    CONSTRAINT pk_etl_runs PRIMARY KEY (id)
);

CREATE INDEX ix_etl_runs_started_at ON etl_runs (started_at);

CREATE INDEX ix_etl_runs_status ON etl_runs (status);

CREATE TABLE raw_api_data (
    id BIGINT DEFAULT nextval('raw_record_seq') NOT NULL, 
    source TEXT NOT NULL, 
    run_id UUID NOT NULL, 
    content_hash BYTEA NOT NULL, 
    payload JSONB NOT NULL, 
    ingested_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_raw_api_data PRIMARY KEY (id), 
    CONSTRAINT uq_raw_api_data_source_content_hash UNIQUE (source, content_hash)
);

CREATE TABLE raw_csv_data (
    id BIGINT DEFAULT nextval('raw_record_seq') NOT NULL, 
    source TEXT NOT NULL, 
    run_id UUID NOT NULL, 
    content_hash BYTEA NOT NULL, 
    payload JSONB NOT NULL, 
    ingested_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_raw_csv_data PRIMARY KEY (id), 
    CONSTRAINT uq_raw_csv_data_source_content_hash UNIQUE (source, content_hash)
);

CREATE TABLE raw_third_source_data (
    id BIGINT DEFAULT nextval('raw_record_seq') NOT NULL, 
    source TEXT NOT NULL, 
    run_id UUID NOT NULL, 
    content_hash BYTEA NOT NULL, 
    payload JSONB NOT NULL, 
    ingested_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_raw_third_source_data PRIMARY KEY (id), 
    CONSTRAINT uq_raw_third_source_data_source_content_hash UNIQUE (source, content_hash)
);

CREATE TABLE unified_data (
    name TEXT NOT NULL, 
    value DOUBLE PRECISION NOT NULL, 
    source TEXT NOT NULL, 
    observed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    ingested_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    priority INTEGER NOT NULL, 
    raw_id BIGINT NOT NULL, 
    source_record_id TEXT, 
    run_id UUID NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_unified_data PRIMARY KEY (name)
);

CREATE INDEX ix_unified_data_source_name ON unified_data (source, name);

CREATE TABLE etl_run_sources (
    run_id UUID NOT NULL, 
    source TEXT NOT NULL, 
    position INTEGER DEFAULT 0 NOT NULL, 
    status TEXT NOT NULL, 
    fetched BIGINT DEFAULT 0 NOT NULL, 
    raw_inserted BIGINT DEFAULT 0 NOT NULL, 
    duplicates BIGINT DEFAULT 0 NOT NULL, 
    rejected BIGINT DEFAULT 0 NOT NULL, 
    unified_upserted BIGINT DEFAULT 0 NOT NULL, 
    error TEXT, 
    drift JSONB DEFAULT '[]'::jsonb NOT NULL, 
    started_at TIMESTAMP WITH TIME ZONE, 
    finished_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_etl_run_sources PRIMARY KEY (run_id, source), 
    CONSTRAINT fk_etl_run_sources_run_id_etl_runs FOREIGN KEY(run_id) REFERENCES etl_runs (id) ON DELETE CASCADE
);

CREATE INDEX ix_etl_run_sources_source_finished_at ON etl_run_sources (source, finished_at);

INSERT INTO alembic_version (version_num) VALUES ('0001') RETURNING alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE TABLE unified_counts (
    source TEXT NOT NULL, 
    rows BIGINT NOT NULL, 
    CONSTRAINT pk_unified_counts PRIMARY KEY (source)
);

INSERT INTO unified_counts (source, rows) SELECT source, count(*) FROM unified_data GROUP BY source;

CREATE FUNCTION unified_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO unified_counts AS c (source, rows)
    SELECT source, count(*) FROM new_rows GROUP BY source
    ON CONFLICT (source) DO UPDATE SET rows = c.rows + excluded.rows;
    RETURN NULL;
END $$;

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
END $$;

CREATE FUNCTION unified_counts_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE unified_counts AS c SET rows = c.rows - o.n
    FROM (SELECT source, count(*) AS n FROM old_rows GROUP BY source) AS o
    WHERE c.source = o.source;
    RETURN NULL;
END $$;

CREATE FUNCTION unified_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM unified_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER unified_counts_insert AFTER INSERT ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_add();

CREATE TRIGGER unified_counts_update AFTER UPDATE ON unified_data
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_move();

CREATE TRIGGER unified_counts_delete AFTER DELETE ON unified_data
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_counts_remove();

CREATE TRIGGER unified_counts_truncate AFTER TRUNCATE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_counts_clear();

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE TABLE unified_version (
    singleton BOOLEAN DEFAULT true NOT NULL, 
    version BIGINT NOT NULL, 
    CONSTRAINT pk_unified_version PRIMARY KEY (singleton), 
    CONSTRAINT ck_unified_version_singleton CHECK (singleton)
);

INSERT INTO unified_version (version) VALUES (pg_current_xact_id()::text::bigint);

CREATE FUNCTION unified_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Transaction ids never repeat in a cluster: two changes never share a version.
    UPDATE unified_version SET version = pg_current_xact_id()::text::bigint;
    RETURN NULL;
END $$;

CREATE TRIGGER unified_a_version_insert AFTER INSERT ON unified_data FOR EACH STATEMENT EXECUTE FUNCTION unified_version_bump();

CREATE TRIGGER unified_a_version_update AFTER UPDATE ON unified_data FOR EACH STATEMENT EXECUTE FUNCTION unified_version_bump();

CREATE TRIGGER unified_a_version_delete AFTER DELETE ON unified_data FOR EACH STATEMENT EXECUTE FUNCTION unified_version_bump();

CREATE TRIGGER unified_a_version_truncate AFTER TRUNCATE ON unified_data FOR EACH STATEMENT EXECUTE FUNCTION unified_version_bump();

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE unified_data ALTER COLUMN name TYPE text COLLATE "C";

UPDATE alembic_version SET version_num='0004' WHERE alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

CREATE TABLE etl_metric_runs (
    status TEXT NOT NULL, 
    runs BIGINT DEFAULT 0 NOT NULL, 
    duration_seconds DOUBLE PRECISION DEFAULT 0 NOT NULL, 
    CONSTRAINT pk_etl_metric_runs PRIMARY KEY (status)
);

CREATE TABLE etl_metric_durations (
    le DOUBLE PRECISION NOT NULL, 
    runs BIGINT DEFAULT 0 NOT NULL, 
    CONSTRAINT pk_etl_metric_durations PRIMARY KEY (le)
);

CREATE TABLE etl_metric_sources (
    source TEXT NOT NULL, 
    failures BIGINT DEFAULT 0 NOT NULL, 
    fetched BIGINT DEFAULT 0 NOT NULL, 
    raw_inserted BIGINT DEFAULT 0 NOT NULL, 
    duplicates BIGINT DEFAULT 0 NOT NULL, 
    rejected BIGINT DEFAULT 0 NOT NULL, 
    unified_upserted BIGINT DEFAULT 0 NOT NULL, 
    last_success_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_etl_metric_sources PRIMARY KEY (source)
);

CREATE TABLE etl_metric_drift (
    source TEXT NOT NULL, 
    kind TEXT NOT NULL, 
    events BIGINT DEFAULT 0 NOT NULL, 
    CONSTRAINT pk_etl_metric_drift PRIMARY KEY (source, kind)
);

INSERT INTO etl_metric_durations (le) VALUES (0.1), (0.25), (0.5), (1.0), (2.0), (3.0), (5.0), (7.5), (10.0), (12.5), (15.0), (20.0), (25.0), (30.0), (45.0), (60.0), (90.0), (120.0), (180.0), (300.0), (600.0), (1200.0), (1800.0), (3600.0), ('Infinity');

CREATE FUNCTION etl_metric_runs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
WITH finished AS (SELECT * FROM new_rows WHERE status IN ('success', 'partial', 'failed'))

, done AS (
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
    SET last_success_at = greatest(m.last_success_at, excluded.last_success_at);
    RETURN NULL;
END $$;

CREATE FUNCTION etl_metric_runs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
WITH finished AS (
    SELECT n.* FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.status IN ('success', 'partial', 'failed') AND o.status NOT IN ('success', 'partial', 'failed')
)

, done AS (
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
    SET last_success_at = greatest(m.last_success_at, excluded.last_success_at);
    RETURN NULL;
END $$;

CREATE FUNCTION etl_metric_sources_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
WITH changed AS (
    SELECT n.source, n.run_id, n.status, NULL::text AS was_status, n.fetched, n.raw_inserted, n.duplicates, n.rejected, n.unified_upserted, NULL::bigint AS was_fetched, NULL::bigint AS was_raw_inserted, NULL::bigint AS was_duplicates, NULL::bigint AS was_rejected, NULL::bigint AS was_unified_upserted
    FROM new_rows AS n
)

INSERT INTO etl_metric_sources AS m (source, failures, fetched, raw_inserted, duplicates, rejected, unified_upserted, last_success_at)
SELECT c.source,
    count(*) FILTER (WHERE c.status = 'failed' AND c.was_status IS DISTINCT FROM 'failed'),
    sum(greatest(c.fetched - coalesce(c.was_fetched, 0), 0)), sum(greatest(c.raw_inserted - coalesce(c.was_raw_inserted, 0), 0)), sum(greatest(c.duplicates - coalesce(c.was_duplicates, 0), 0)), sum(greatest(c.rejected - coalesce(c.was_rejected, 0), 0)), sum(greatest(c.unified_upserted - coalesce(c.was_unified_upserted, 0), 0)),
    max(r.finished_at) FILTER (
        WHERE c.status = 'success' AND c.was_status IS DISTINCT FROM 'success'
            AND r.status IN ('success', 'partial', 'failed')
    )
FROM changed AS c LEFT JOIN etl_runs AS r ON r.id = c.run_id
GROUP BY c.source
ON CONFLICT (source) DO UPDATE SET failures = m.failures + excluded.failures, fetched = m.fetched + excluded.fetched, raw_inserted = m.raw_inserted + excluded.raw_inserted, duplicates = m.duplicates + excluded.duplicates, rejected = m.rejected + excluded.rejected, unified_upserted = m.unified_upserted + excluded.unified_upserted,
    last_success_at = greatest(m.last_success_at, excluded.last_success_at);
    RETURN NULL;
END $$;

CREATE FUNCTION etl_metric_sources_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
WITH changed AS (
    SELECT n.source, n.run_id, n.status, o.status AS was_status, n.fetched, n.raw_inserted, n.duplicates, n.rejected, n.unified_upserted, o.fetched AS was_fetched, o.raw_inserted AS was_raw_inserted, o.duplicates AS was_duplicates, o.rejected AS was_rejected, o.unified_upserted AS was_unified_upserted
    FROM new_rows AS n JOIN old_rows AS o ON o.run_id = n.run_id AND o.source = n.source
)

INSERT INTO etl_metric_sources AS m (source, failures, fetched, raw_inserted, duplicates, rejected, unified_upserted, last_success_at)
SELECT c.source,
    count(*) FILTER (WHERE c.status = 'failed' AND c.was_status IS DISTINCT FROM 'failed'),
    sum(greatest(c.fetched - coalesce(c.was_fetched, 0), 0)), sum(greatest(c.raw_inserted - coalesce(c.was_raw_inserted, 0), 0)), sum(greatest(c.duplicates - coalesce(c.was_duplicates, 0), 0)), sum(greatest(c.rejected - coalesce(c.was_rejected, 0), 0)), sum(greatest(c.unified_upserted - coalesce(c.was_unified_upserted, 0), 0)),
    max(r.finished_at) FILTER (
        WHERE c.status = 'success' AND c.was_status IS DISTINCT FROM 'success'
            AND r.status IN ('success', 'partial', 'failed')
    )
FROM changed AS c LEFT JOIN etl_runs AS r ON r.id = c.run_id
GROUP BY c.source
ON CONFLICT (source) DO UPDATE SET failures = m.failures + excluded.failures, fetched = m.fetched + excluded.fetched, raw_inserted = m.raw_inserted + excluded.raw_inserted, duplicates = m.duplicates + excluded.duplicates, rejected = m.rejected + excluded.rejected, unified_upserted = m.unified_upserted + excluded.unified_upserted,
    last_success_at = greatest(m.last_success_at, excluded.last_success_at);
    RETURN NULL;
END $$;

CREATE FUNCTION etl_metric_drift_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
INSERT INTO etl_metric_drift AS m (source, kind, events)
SELECT source, kind, count(*) FROM new_rows GROUP BY source, kind
ON CONFLICT (source, kind) DO UPDATE SET events = m.events + excluded.events;
    RETURN NULL;
END $$;

CREATE TRIGGER etl_metric_runs_insert AFTER INSERT ON etl_runs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION etl_metric_runs_inserted();

CREATE TRIGGER etl_metric_runs_update AFTER UPDATE ON etl_runs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION etl_metric_runs_updated();

CREATE TRIGGER etl_metric_sources_insert AFTER INSERT ON etl_run_sources REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION etl_metric_sources_inserted();

CREATE TRIGGER etl_metric_sources_update AFTER UPDATE ON etl_run_sources REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION etl_metric_sources_updated();

CREATE TRIGGER etl_metric_drift_insert AFTER INSERT ON etl_drift_events REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION etl_metric_drift_inserted();

WITH finished AS (SELECT * FROM etl_runs WHERE status IN ('success', 'partial', 'failed'))

, done AS (
    SELECT id, status, coalesce(finished_at, started_at) AS finished_at,
        greatest(extract(epoch FROM coalesce(finished_at, started_at) - started_at), 0)::float8
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
    SET last_success_at = greatest(m.last_success_at, excluded.last_success_at);

WITH changed AS (
    SELECT n.source, n.run_id, n.status, NULL::text AS was_status, n.fetched, n.raw_inserted, n.duplicates, n.rejected, n.unified_upserted, NULL::bigint AS was_fetched, NULL::bigint AS was_raw_inserted, NULL::bigint AS was_duplicates, NULL::bigint AS was_rejected, NULL::bigint AS was_unified_upserted
    FROM etl_run_sources AS n
)

INSERT INTO etl_metric_sources AS m (source, failures, fetched, raw_inserted, duplicates, rejected, unified_upserted, last_success_at)
SELECT c.source,
    count(*) FILTER (WHERE c.status = 'failed' AND c.was_status IS DISTINCT FROM 'failed'),
    sum(greatest(c.fetched - coalesce(c.was_fetched, 0), 0)), sum(greatest(c.raw_inserted - coalesce(c.was_raw_inserted, 0), 0)), sum(greatest(c.duplicates - coalesce(c.was_duplicates, 0), 0)), sum(greatest(c.rejected - coalesce(c.was_rejected, 0), 0)), sum(greatest(c.unified_upserted - coalesce(c.was_unified_upserted, 0), 0)),
    max(r.finished_at) FILTER (
        WHERE c.status = 'success' AND c.was_status IS DISTINCT FROM 'success'
            AND r.status IN ('success', 'partial', 'failed')
    )
FROM changed AS c LEFT JOIN etl_runs AS r ON r.id = c.run_id
GROUP BY c.source
ON CONFLICT (source) DO UPDATE SET failures = m.failures + excluded.failures, fetched = m.fetched + excluded.fetched, raw_inserted = m.raw_inserted + excluded.raw_inserted, duplicates = m.duplicates + excluded.duplicates, rejected = m.rejected + excluded.rejected, unified_upserted = m.unified_upserted + excluded.unified_upserted,
    last_success_at = greatest(m.last_success_at, excluded.last_success_at);

INSERT INTO etl_metric_drift (source, kind, events)
SELECT source, kind, count(*) FROM etl_drift_events GROUP BY source, kind;

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

CREATE TABLE unified_links (
    source TEXT NOT NULL, 
    source_key TEXT COLLATE "C" NOT NULL, 
    name TEXT COLLATE "C" NOT NULL, 
    rule TEXT NOT NULL, 
    confidence DOUBLE PRECISION NOT NULL, 
    names_seen TEXT[] NOT NULL, 
    symbol TEXT, 
    linked_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_unified_links PRIMARY KEY (source, source_key), 
    CONSTRAINT ck_unified_links_confidence CHECK (confidence >= 0 AND confidence <= 1), 
    CONSTRAINT uq_unified_links_name_source UNIQUE (name, source)
);

CREATE INDEX ix_unified_links_names_seen ON unified_links USING gin (names_seen);

INSERT INTO unified_links (source, source_key, name, rule, confidence, names_seen) SELECT source, coalesce(source_record_id, name), name, 'new', 1.0, ARRAY[name::text] FROM unified_data;

CREATE FUNCTION unified_links_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Only statements that changed a link: most batches change none.
    IF EXISTS (SELECT 1 FROM changed_rows) THEN
        UPDATE unified_version SET version = pg_current_xact_id()::text::bigint;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER unified_links_version_insert AFTER INSERT ON unified_links REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION unified_links_version_bump();

CREATE TRIGGER unified_links_version_update AFTER UPDATE ON unified_links REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION unified_links_version_bump();

CREATE TRIGGER unified_links_version_delete AFTER DELETE ON unified_links REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION unified_links_version_bump();

UPDATE alembic_version SET version_num='0006' WHERE alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

CREATE SEQUENCE unified_change_seq AS bigint;

ALTER TABLE unified_data ADD COLUMN seq bigint DEFAULT nextval('unified_change_seq') NOT NULL;

ALTER TABLE unified_data ALTER COLUMN seq DROP DEFAULT;

ALTER SEQUENCE unified_change_seq OWNED BY unified_data.seq;

CREATE INDEX ix_unified_data_seq ON unified_data (seq);

CREATE TABLE unified_removals (
    name text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    removed_at timestamptz DEFAULT now() NOT NULL,
    CONSTRAINT pk_unified_removals PRIMARY KEY (name)
);

CREATE INDEX ix_unified_removals_seq ON unified_removals (seq);

CREATE FUNCTION unified_feed_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Held to the end of the transaction: numbers are drawn in commit order.
    PERFORM pg_advisory_xact_lock(7737592561390675300);
    RETURN NULL;
END $$;

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
END $$;

CREATE FUNCTION unified_feed_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    -- A name that comes back is no longer removed (checked only while tombstones exist).
    IF EXISTS (SELECT FROM unified_removals) THEN
        DELETE FROM unified_removals r USING new_rows n WHERE r.name = n.name;
    END IF;
    SELECT min(seq), max(seq) INTO lo, hi FROM new_rows;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION unified_feed_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    SELECT min(seq) INTO lo FROM new_rows;
    IF lo IS NOT NULL THEN
        -- The statement's last number, a rename's tombstone included.
        hi := currval('unified_change_seq');
    END IF;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

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
    SELECT min(seq), max(seq) INTO lo, hi FROM gone;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION unified_feed_truncating() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7737592561390675300);
    -- Every row leaves; those written again later in the transaction lose
    -- their tombstone then.
    WITH gone AS (
        INSERT INTO unified_removals AS r (name, seq)
        SELECT name, nextval('unified_change_seq') FROM unified_data
        ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, removed_at = now()
        RETURNING r.seq
    )
    SELECT min(seq), max(seq) INTO lo, hi FROM gone;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER unified_feed_lock BEFORE INSERT OR UPDATE OR DELETE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_lock();

CREATE TRIGGER unified_feed_number BEFORE INSERT OR UPDATE ON unified_data
    FOR EACH ROW EXECUTE FUNCTION unified_feed_number();

CREATE TRIGGER unified_feed_insert AFTER INSERT ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_inserted();

CREATE TRIGGER unified_feed_update AFTER UPDATE ON unified_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_updated();

CREATE TRIGGER unified_feed_delete AFTER DELETE ON unified_data
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION unified_feed_deleted();

CREATE TRIGGER unified_feed_truncate BEFORE TRUNCATE ON unified_data
    FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_truncating();

CREATE FUNCTION etl_runs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('kasparro_events',
            json_build_object('event', 'run_started', 'id', NEW.id)::text);
    ELSIF OLD.status = 'running' AND NEW.status <> 'running' THEN
        PERFORM pg_notify('kasparro_events',
            json_build_object('event', 'run_finished', 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER etl_runs_events AFTER INSERT OR UPDATE OF status ON etl_runs
    FOR EACH ROW EXECUTE FUNCTION etl_runs_notify();

UPDATE alembic_version SET version_num='0007' WHERE alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE TABLE etl_leases (
    source TEXT NOT NULL, 
    run_id UUID NOT NULL, 
    owner TEXT NOT NULL, 
    acquired_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    renewed_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_etl_leases PRIMARY KEY (source), 
    CONSTRAINT fk_etl_leases_run_id_etl_runs FOREIGN KEY(run_id) REFERENCES etl_runs (id) ON DELETE CASCADE
);

CREATE INDEX ix_etl_leases_run_id ON etl_leases (run_id);

CREATE INDEX ix_etl_run_sources_running ON etl_run_sources (run_id) WHERE status = 'running';

CREATE FUNCTION etl_run_sources_closed_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'run % no longer holds source %', OLD.run_id, OLD.source
        USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;

CREATE TRIGGER etl_run_sources_closed BEFORE UPDATE ON etl_run_sources FOR EACH ROW WHEN (OLD.status <> 'running') EXECUTE FUNCTION etl_run_sources_closed_guard();

UPDATE alembic_version SET version_num='0008' WHERE alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

DROP INDEX ix_unified_links_names_seen;

CREATE INDEX ix_unified_links_names_seen ON unified_links USING gin (names_seen) WHERE names_seen <> ARRAY[name COLLATE "default"];

UPDATE alembic_version SET version_num='0009' WHERE alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

CREATE TABLE unified_feed (seq bigint NOT NULL, name text COLLATE "C" NOT NULL, CONSTRAINT pk_unified_feed PRIMARY KEY (seq));

INSERT INTO unified_feed (seq, name) SELECT seq, name FROM unified_data;

CREATE TABLE unified_feed_pruned (singleton boolean DEFAULT true NOT NULL, upto bigint NOT NULL, CONSTRAINT pk_unified_feed_pruned PRIMARY KEY (singleton), CONSTRAINT ck_unified_feed_pruned_singleton CHECK (singleton));

INSERT INTO unified_feed_pruned (upto) SELECT coalesce(max(seq), 0) FROM unified_feed;

CREATE OR REPLACE FUNCTION unified_feed_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    -- A name that comes back is no longer removed (checked only while tombstones exist).
    IF EXISTS (SELECT FROM unified_removals) THEN
        DELETE FROM unified_removals r USING new_rows n WHERE r.name = n.name;
    END IF;
    INSERT INTO unified_feed (seq, name) SELECT seq, name FROM new_rows;
    SELECT min(seq), max(seq) INTO lo, hi FROM new_rows;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION unified_feed_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    INSERT INTO unified_feed (seq, name) SELECT seq, name FROM new_rows;
    SELECT min(seq) INTO lo FROM new_rows;
    IF lo IS NOT NULL THEN
        -- The statement's last number, a rename's tombstone included.
        hi := currval('unified_change_seq');
    END IF;
    IF hi IS NOT NULL THEN
        PERFORM pg_notify('kasparro_events', json_build_object(
            'event', 'unified_changed', 'after', lo - 1, 'seq', hi)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION unified_feed_log_truncating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Every row leaves (its tombstone is numbered by unified_feed_truncating).
    TRUNCATE unified_feed;
    RETURN NULL;
END $$;

CREATE TRIGGER unified_feed_log_truncate BEFORE TRUNCATE ON unified_data FOR EACH STATEMENT EXECUTE FUNCTION unified_feed_log_truncating();

DROP INDEX ix_unified_data_seq;

ALTER TABLE unified_data SET (fillfactor = 90);

ALTER TABLE raw_api_data ADD CONSTRAINT uq_raw_api_data_content_hash_source UNIQUE (content_hash, source);

ALTER TABLE raw_api_data DROP CONSTRAINT uq_raw_api_data_source_content_hash;

ALTER TABLE raw_csv_data ADD CONSTRAINT uq_raw_csv_data_content_hash_source UNIQUE (content_hash, source);

ALTER TABLE raw_csv_data DROP CONSTRAINT uq_raw_csv_data_source_content_hash;

ALTER TABLE raw_third_source_data ADD CONSTRAINT uq_raw_third_source_data_content_hash_source UNIQUE (content_hash, source);

ALTER TABLE raw_third_source_data DROP CONSTRAINT uq_raw_third_source_data_source_content_hash;

UPDATE alembic_version SET version_num='0010' WHERE alembic_version.version_num = '0009';

COMMIT;

