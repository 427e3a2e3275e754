-- Back to 0006's two functions: the trigger function with the submitter's
-- rights calling the SECURITY DEFINER check.

-- The check itself, once per transaction. SECURITY DEFINER: a submitter
-- that may only INSERT into analysis_jobs needs no rights on
-- analysis_workers, and the search_path is the one the migration ran with.
CREATE FUNCTION analysis_executor_wake_idle_workers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- An older snapshot could miss a flag set since: always notify.
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN;
    END IF;
    -- Held until this transaction commits; see worker/sql/submitters_settled.sql.
    PERFORM pg_advisory_xact_lock_shared(7310598114230005006);
    IF EXISTS (SELECT 1 FROM analysis_workers WHERE waiting) THEN
        -- SKIP LOCKED: a submitter never waits for a worker's row (its
        -- heartbeat may hold it); a flag left set only means one more NOTIFY.
        UPDATE analysis_workers SET waiting = false
        WHERE id IN (SELECT id FROM analysis_workers WHERE waiting FOR UPDATE SKIP LOCKED);
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
END
$$;

-- Runs for every pending row, so it only makes sure the check above runs
-- once per transaction: the first row calls it, the rest return at once.
CREATE OR REPLACE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    -- Qualified with the table's schema: the submitter's search_path may not include it.
    EXECUTE format('SELECT %I.analysis_executor_wake_idle_workers()', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

-- 0006 as shipped let pg_temp come first on the check's search_path; do not
-- bring that back on the way down.
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION analysis_executor_wake_idle_workers() SET search_path = %I, pg_temp', current_schema()
    );
END
$$;

GRANT EXECUTE ON FUNCTION analysis_jobs_wake_idle_workers() TO PUBLIC;
