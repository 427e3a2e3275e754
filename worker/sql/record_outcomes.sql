-- Write a batch of finished attempts back in one statement, each fenced by
-- the worker and the attempt it claimed: a job that was rescued, cancelled or
-- re-claimed meanwhile is left alone (and missing from RETURNING).
-- A retryable outcome with attempts left goes back to 'pending' with a
-- backoff; everything else is final. Rows are locked in id order, as the
-- heartbeat locks them, so the two never deadlock. The arrays go in binary
-- format: the text format escapes every element on the client.
WITH outcome AS (
    SELECT *
    FROM unnest(
        %(ids)b::uuid[], %(attempts)b::int[], %(statuses)b::text[], %(retry)b::boolean[],
        %(results)b::text[], %(errors)b::text[], %(stdouts)b::text[], %(stderrs)b::text[], %(exit_codes)b::int[]
    ) AS o (id, attempt, status, retry, result, error_message, stdout, stderr, exit_code)
),
mine AS (
    SELECT job.id, job.attempts < job.max_attempts AS attempts_left
    FROM analysis_jobs AS job
    JOIN outcome ON outcome.id = job.id AND outcome.attempt = job.attempts
    WHERE job.status = 'running'
      AND job.worker_id = %(worker_id)s
    ORDER BY job.id
    FOR NO KEY UPDATE OF job
)
UPDATE analysis_jobs AS job
SET status = CASE WHEN o.retry AND mine.attempts_left THEN 'pending' ELSE o.status END,
    run_at = CASE WHEN o.retry AND mine.attempts_left
                  THEN now() + analysis_executor_retry_delay(job.attempts) ELSE job.run_at END,
    result = o.result::jsonb,
    error_message = o.error_message,
    stdout = o.stdout,
    stderr = o.stderr,
    exit_code = o.exit_code,
    worker_id = CASE WHEN o.retry AND mine.attempts_left THEN NULL ELSE job.worker_id END,
    heartbeat_at = CASE WHEN o.retry AND mine.attempts_left THEN NULL ELSE job.heartbeat_at END,
    completed_at = CASE WHEN o.retry AND mine.attempts_left THEN NULL ELSE now() END,
    duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM (now() - job.started_at)) * 1000)::bigint)
FROM mine
JOIN outcome AS o ON o.id = mine.id
WHERE job.id = mine.id
RETURNING job.id, job.status
