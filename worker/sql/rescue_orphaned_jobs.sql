-- Jobs whose worker stopped renewing the lease: back to 'pending' (with a
-- backoff) while attempts remain, otherwise 'failed'. Any worker may run
-- this; SKIP LOCKED keeps two rescuers from fighting over a row.
WITH lost AS (
    SELECT id
    FROM analysis_jobs
    WHERE status = 'running'
      AND coalesce(heartbeat_at, started_at, created_at) < now() - make_interval(secs => %(lease_seconds)s)
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE analysis_jobs AS job
SET status = CASE WHEN job.attempts < job.max_attempts THEN 'pending' ELSE 'failed' END,
    run_at = CASE WHEN job.attempts < job.max_attempts
                  THEN now() + analysis_executor_retry_delay(job.attempts) ELSE job.run_at END,
    error_message = format('worker lost: %%s stopped renewing its lease during attempt %%s of %%s',
                           coalesce(job.worker_id, 'unknown worker'), job.attempts, job.max_attempts),
    worker_id = CASE WHEN job.attempts < job.max_attempts THEN NULL ELSE job.worker_id END,
    heartbeat_at = NULL,
    completed_at = CASE WHEN job.attempts < job.max_attempts THEN NULL ELSE now() END
FROM lost
WHERE job.id = lost.id
RETURNING job.id, job.status, job.attempts
