-- depends: 0002_pending_run_at_index
-- Reliability: retries of script errors (opt-in per analysis), the live
-- workers registry, per-attempt history, cancellation and completion
-- notifications.
--
-- Channels:
--   analysis_jobs_cancel    payload: the job id; sent when a running job is cancelled
--   analysis_jobs_finished  payload: {"id": ..., "status": ...}; sent when a job reaches a final status

ALTER TABLE analyses
    ADD COLUMN retry_script_errors boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN analyses.retry_script_errors IS
    'Retry jobs whose script failed or timed out (up to the job''s max_attempts). Infrastructure failures are always retried.';

CREATE TABLE analysis_workers (
    id              text PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    version         text NOT NULL,
    concurrency     integer NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    jobs_processed  bigint NOT NULL DEFAULT 0,
    draining        boolean NOT NULL DEFAULT false
);

CREATE TABLE analysis_job_attempts (
    job_id         uuid NOT NULL REFERENCES analysis_jobs (id) ON DELETE CASCADE,
    attempt        integer NOT NULL,
    worker_id      text,
    started_at     timestamptz,
    finished_at    timestamptz NOT NULL DEFAULT now(),
    outcome        text NOT NULL,
    error_message  text,
    PRIMARY KEY (job_id, attempt)
);

-- Exponential backoff with jitter for retried attempts: ~1 s, 2 s, 4 s ... capped at 5 minutes.
CREATE FUNCTION analysis_executor_retry_delay(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => least(300, power(2, greatest(attempt, 1) - 1)) * (0.5 + random()))
$$;

-- Cancelling is a plain UPDATE:
--   UPDATE analysis_jobs SET status = 'cancelled' WHERE id = '...' AND status IN ('pending', 'running');
-- This trigger stamps the row and, for a running job, tells its worker to kill it.
CREATE FUNCTION analysis_jobs_on_cancel() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.completed_at := coalesce(NEW.completed_at, now());
    -- 'cancelled', unless the cancelling UPDATE gave its own reason (an earlier
    -- attempt's error must not read as the reason for the cancel).
    IF NEW.error_message IS NOT DISTINCT FROM OLD.error_message THEN
        NEW.error_message := 'cancelled';
    END IF;
    IF OLD.status = 'running' THEN
        NEW.duration_ms := greatest(0, (EXTRACT(EPOCH FROM (NEW.completed_at - OLD.started_at)) * 1000)::bigint);
        PERFORM pg_notify('analysis_jobs_cancel', OLD.id::text);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER analysis_jobs_on_cancel
    BEFORE UPDATE OF status ON analysis_jobs
    FOR EACH ROW
    WHEN (NEW.status = 'cancelled' AND OLD.status IN ('pending', 'running'))
    EXECUTE FUNCTION analysis_jobs_on_cancel();

-- When an attempt ends (the row leaves 'running'), keep its outcome, unless
-- it is a first attempt that completed (the job row tells that whole story)
-- or a graceful hand-back that did not spend the attempt.
CREATE FUNCTION analysis_jobs_record_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.attempts < OLD.attempts OR (NEW.status = 'completed' AND OLD.attempts = 1) THEN
        RETURN NULL;
    END IF;
    INSERT INTO analysis_job_attempts (job_id, attempt, worker_id, started_at, outcome, error_message)
    VALUES (OLD.id, OLD.attempts, OLD.worker_id, OLD.started_at,
            CASE WHEN NEW.status = 'pending' THEN 'retried' ELSE NEW.status END, NEW.error_message)
    ON CONFLICT (job_id, attempt) DO UPDATE
        SET worker_id = EXCLUDED.worker_id, started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
            outcome = EXCLUDED.outcome, error_message = EXCLUDED.error_message;
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_jobs_record_attempt
    AFTER UPDATE OF status ON analysis_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION analysis_jobs_record_attempt();

CREATE FUNCTION analysis_jobs_notify_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('analysis_jobs_finished', json_build_object('id', NEW.id, 'status', NEW.status)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_jobs_notify_finished
    AFTER UPDATE OF status ON analysis_jobs
    FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'timeout', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION analysis_jobs_notify_finished();
