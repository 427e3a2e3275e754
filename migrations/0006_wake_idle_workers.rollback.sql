DROP TRIGGER analysis_jobs_notify_requeued ON analysis_jobs;
DROP TRIGGER analysis_jobs_notify_pending ON analysis_jobs;
DROP FUNCTION analysis_jobs_wake_idle_workers();
DROP FUNCTION analysis_executor_wake_idle_workers();

CREATE FUNCTION analysis_jobs_notify_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted_jobs WHERE status = 'pending') THEN
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_jobs_notify_pending
    AFTER INSERT ON analysis_jobs
    REFERENCING NEW TABLE AS inserted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION analysis_jobs_notify_pending();

ALTER TABLE analysis_workers DROP COLUMN waiting;
