ALTER TABLE analysis_schedules
    DROP CONSTRAINT analysis_schedules_next_run_at_in_range,
    DROP CONSTRAINT analysis_schedules_last_run_at_in_range,
    DROP CONSTRAINT analysis_schedules_created_at_in_range,
    DROP CONSTRAINT analysis_schedules_updated_at_in_range;

ALTER TABLE analysis_jobs
    DROP CONSTRAINT analysis_jobs_run_at_in_range,
    DROP CONSTRAINT analysis_jobs_created_at_in_range,
    DROP CONSTRAINT analysis_jobs_started_at_in_range,
    DROP CONSTRAINT analysis_jobs_completed_at_in_range,
    DROP CONSTRAINT analysis_jobs_heartbeat_at_in_range,
    DROP CONSTRAINT analysis_jobs_scheduled_for_in_range;

DROP FUNCTION analysis_executor_timestamp_in_range(timestamptz);

-- Back to 0008's check, which waits for the shared advisory lock.
CREATE OR REPLACE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(7310598114230005006);
    IF EXISTS (SELECT 1 FROM analysis_workers WHERE waiting) THEN
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

CREATE OR REPLACE FUNCTION analysis_executor_retry_delay(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => least(300, power(2, greatest(attempt, 1) - 1)) * (0.5 + random()))
$$;
