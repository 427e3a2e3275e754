-- Write a batch of finished attempts back in one statement, each fenced by
-- the worker and the attempt it claimed: a job that was rescued, cancelled or
-- re-claimed meanwhile is left alone (and missing from RETURNING). A row
-- another transaction changed while this one waited for its lock is checked
-- again as it is now.
-- A retryable outcome with attempts left goes back to 'pending' with a
-- backoff; everything else is final. The arrays go in binary format: the
-- text format escapes every element on the client.
-- Rows are locked in whatever order the plan visits them. The lease renewal
-- (renew_leases.sql), which locks many of the same rows while their jobs run,
-- skips locked rows instead of waiting, so the two cannot deadlock. (Locking
-- the rows first in id order, in a step of its own, cost 25–35 µs of server CPU
-- per job.)
UPDATE analysis_jobs AS job
SET status = CASE WHEN o.retry AND job.attempts < job.max_attempts THEN 'pending' ELSE o.status END,
    run_at = CASE WHEN o.retry AND job.attempts < job.max_attempts
                  THEN now() + analysis_executor_retry_delay(job.attempts) ELSE job.run_at END,
    result = o.result::jsonb,
    error_message = o.error_message,
    stdout = o.stdout,
    stderr = o.stderr,
    exit_code = o.exit_code,
    worker_id = CASE WHEN o.retry AND job.attempts < job.max_attempts THEN NULL ELSE job.worker_id END,
    heartbeat_at = CASE WHEN o.retry AND job.attempts < job.max_attempts THEN NULL ELSE job.heartbeat_at END,
    completed_at = CASE WHEN o.retry AND job.attempts < job.max_attempts THEN NULL ELSE now() END,
    duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM (now() - job.started_at)) * 1000)::bigint)
FROM unnest(
    %(ids)b::uuid[], %(attempts)b::int[], %(statuses)b::text[], %(retry)b::boolean[],
    %(results)b::text[], %(errors)b::text[], %(stdouts)b::text[], %(stderrs)b::text[], %(exit_codes)b::int[]
) AS o (id, attempt, status, retry, result, error_message, stdout, stderr, exit_code)
WHERE job.id = o.id
  AND job.attempts = o.attempt
  AND job.status = 'running'
  AND job.worker_id = %(worker_id)s
RETURNING job.id, job.attempts, job.status
