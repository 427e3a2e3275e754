-- depends: 0009_result_file_deletion_retries
-- Rows a worker can always read, and submitters nobody can stall.
--
-- 1. Timestamps within the years 1..9999. PostgreSQL holds +-infinity and
--    years far outside that range, which Python's datetime (and so every
--    worker) cannot load: a single such run_at or created_at stopped every
--    claim. Each timestamp column a worker reads is now checked, after
--    existing rows are clamped into the range (-infinity becomes the earliest
--    allowed instant, infinity the latest). The bounds keep a day's margin
--    so that any time zone offset still lands within year 1..9999.
-- 2. The idle-worker check of 0006/0008 took its advisory lock shared with a
--    waiting call, so any session (a dependency query included) holding that
--    lock exclusively blocked every submitting commit. It now only tries the
--    lock; a submitter that cannot take it notifies, which is always safe.

CREATE FUNCTION analysis_executor_timestamp_in_range(moment timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT moment >= '0001-01-02 00:00:00+00'::timestamptz AND moment < '9999-12-31 00:00:00+00'::timestamptz
$$;

COMMENT ON FUNCTION analysis_executor_timestamp_in_range(timestamptz) IS
    'True for timestamps every worker can load (0001-01-02 to 9999-12-31 UTC, exclusive); NULL for NULL.';

CREATE FUNCTION analysis_executor_clamp_timestamp(moment timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT LEAST(GREATEST(moment, '0001-01-02 00:00:00+00'::timestamptz),
                 '9999-12-30 23:59:59.999999+00'::timestamptz)
$$;

UPDATE analysis_jobs
SET run_at = analysis_executor_clamp_timestamp(run_at),
    created_at = analysis_executor_clamp_timestamp(created_at),
    started_at = analysis_executor_clamp_timestamp(started_at),
    completed_at = analysis_executor_clamp_timestamp(completed_at),
    heartbeat_at = analysis_executor_clamp_timestamp(heartbeat_at),
    scheduled_for = analysis_executor_clamp_timestamp(scheduled_for)
WHERE NOT (analysis_executor_timestamp_in_range(run_at)
           AND analysis_executor_timestamp_in_range(created_at)
           AND coalesce(analysis_executor_timestamp_in_range(started_at), true)
           AND coalesce(analysis_executor_timestamp_in_range(completed_at), true)
           AND coalesce(analysis_executor_timestamp_in_range(heartbeat_at), true)
           AND coalesce(analysis_executor_timestamp_in_range(scheduled_for), true));

UPDATE analysis_schedules
SET next_run_at = analysis_executor_clamp_timestamp(next_run_at),
    last_run_at = analysis_executor_clamp_timestamp(last_run_at),
    created_at = analysis_executor_clamp_timestamp(created_at),
    updated_at = analysis_executor_clamp_timestamp(updated_at)
WHERE NOT (coalesce(analysis_executor_timestamp_in_range(next_run_at), true)
           AND coalesce(analysis_executor_timestamp_in_range(last_run_at), true)
           AND analysis_executor_timestamp_in_range(created_at)
           AND analysis_executor_timestamp_in_range(updated_at));

-- NOT VALID, then VALIDATE: the check of existing rows does not block writers.
ALTER TABLE analysis_jobs
    ADD CONSTRAINT analysis_jobs_run_at_in_range
        CHECK (analysis_executor_timestamp_in_range(run_at)) NOT VALID,
    ADD CONSTRAINT analysis_jobs_created_at_in_range
        CHECK (analysis_executor_timestamp_in_range(created_at)) NOT VALID,
    ADD CONSTRAINT analysis_jobs_started_at_in_range
        CHECK (analysis_executor_timestamp_in_range(started_at)) NOT VALID,
    ADD CONSTRAINT analysis_jobs_completed_at_in_range
        CHECK (analysis_executor_timestamp_in_range(completed_at)) NOT VALID,
    ADD CONSTRAINT analysis_jobs_heartbeat_at_in_range
        CHECK (analysis_executor_timestamp_in_range(heartbeat_at)) NOT VALID,
    ADD CONSTRAINT analysis_jobs_scheduled_for_in_range
        CHECK (analysis_executor_timestamp_in_range(scheduled_for)) NOT VALID;

ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_run_at_in_range;
ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_created_at_in_range;
ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_started_at_in_range;
ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_completed_at_in_range;
ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_heartbeat_at_in_range;
ALTER TABLE analysis_jobs VALIDATE CONSTRAINT analysis_jobs_scheduled_for_in_range;

ALTER TABLE analysis_schedules
    ADD CONSTRAINT analysis_schedules_next_run_at_in_range
        CHECK (analysis_executor_timestamp_in_range(next_run_at)) NOT VALID,
    ADD CONSTRAINT analysis_schedules_last_run_at_in_range
        CHECK (analysis_executor_timestamp_in_range(last_run_at)) NOT VALID,
    ADD CONSTRAINT analysis_schedules_created_at_in_range
        CHECK (analysis_executor_timestamp_in_range(created_at)) NOT VALID,
    ADD CONSTRAINT analysis_schedules_updated_at_in_range
        CHECK (analysis_executor_timestamp_in_range(updated_at)) NOT VALID;

ALTER TABLE analysis_schedules VALIDATE CONSTRAINT analysis_schedules_next_run_at_in_range;
ALTER TABLE analysis_schedules VALIDATE CONSTRAINT analysis_schedules_last_run_at_in_range;
ALTER TABLE analysis_schedules VALIDATE CONSTRAINT analysis_schedules_created_at_in_range;
ALTER TABLE analysis_schedules VALIDATE CONSTRAINT analysis_schedules_updated_at_in_range;

DROP FUNCTION analysis_executor_clamp_timestamp(timestamptz);

-- 0008's function with the advisory lock tried instead of waited for.
CREATE OR REPLACE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    -- Runs for every pending row: only the first of a transaction checks.
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    -- An older snapshot could miss a flag set since (above READ COMMITTED), or
    -- another session holds the settle lock exclusively (a worker settling for
    -- a moment, or anyone holding it on purpose): notify rather than wait.
    IF current_setting('transaction_isolation') <> 'read committed'
       OR NOT pg_try_advisory_xact_lock_shared(7310598114230005006) THEN
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN NULL;
    END IF;
    -- Held until this transaction commits; see worker/sql/submitters_settled.sql.
    IF EXISTS (SELECT 1 FROM analysis_workers WHERE waiting) THEN
        -- SKIP LOCKED: a submitter never waits for a worker's row (its
        -- heartbeat may hold it); a flag left set only means one more NOTIFY.
        UPDATE analysis_workers SET waiting = false
        WHERE id IN (SELECT id FROM analysis_workers WHERE waiting FOR UPDATE SKIP LOCKED);
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
    RETURN NULL;
END
$$;

-- CREATE OR REPLACE resets the function's settings: fix its search_path again (as 0008 did).
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION analysis_jobs_wake_idle_workers() SET search_path = %I, pg_temp', current_schema()
    );
END
$$;

-- The retry backoff of 0003 with its exponent bounded: power(2, attempts)
-- overflowed for a row with a huge attempts count, which failed the whole
-- statement (the rescuer's, for every lost job at once). Same delays as before.
CREATE OR REPLACE FUNCTION analysis_executor_retry_delay(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => least(300, power(2, least(greatest(attempt, 1) - 1, 16))) * (0.5 + random()))
$$;
