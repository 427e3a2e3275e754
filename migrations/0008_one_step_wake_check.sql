-- depends: 0007_quiet_attempt_trigger
-- The idle-worker check of 0006 in one function instead of two.
--
-- 0006's trigger function ran with the submitter's rights and reached the
-- SECURITY DEFINER check through a dynamic EXECUTE, which PostgreSQL parses
-- and plans again at every commit: 55-60 µs of every submitting
-- transaction, measured with track_functions, against 22-26 µs for the same
-- check as one SECURITY DEFINER trigger function. Its search_path is fixed to
-- the schema the migration ran in, then pg_temp (searched last, not first:
-- otherwise a submitter's temporary table named analysis_workers would be
-- read, and its triggers run, with the function owner's rights), so neither
-- the submitter's search_path nor its rights matter. Semantics are those of
-- 0006 unchanged: once per
-- transaction, at commit; above READ COMMITTED always notify; otherwise hold
-- the settle lock shared until commit, and only if a worker is waiting clear
-- the flags and NOTIFY.

CREATE OR REPLACE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    -- Runs for every pending row: only the first of a transaction checks.
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- An older snapshot could miss a flag set since: always notify.
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN NULL;
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
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION analysis_jobs_wake_idle_workers() SET search_path = %I, pg_temp', current_schema()
    );
END
$$;

-- Only as this table's trigger (firing needs no EXECUTE right): nobody may
-- attach it, with its owner's rights, to a table of their own.
REVOKE EXECUTE ON FUNCTION analysis_jobs_wake_idle_workers() FROM PUBLIC;

DROP FUNCTION analysis_executor_wake_idle_workers();
