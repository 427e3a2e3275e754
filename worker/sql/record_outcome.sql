-- Write one finished attempt back, fenced by the attempt this worker claimed:
-- if the job was rescued, cancelled or re-claimed meanwhile, nothing changes.
-- A retryable outcome (%(retry)s) with attempts left goes back to 'pending'
-- with a backoff; everything else is final.
UPDATE analysis_jobs
SET status = CASE WHEN %(retry)s AND attempts < max_attempts THEN 'pending' ELSE %(status)s END,
    run_at = CASE WHEN %(retry)s AND attempts < max_attempts
                  THEN now() + analysis_executor_retry_delay(attempts) ELSE run_at END,
    result = %(result)s::jsonb,
    error_message = %(error_message)s,
    stdout = %(stdout)s,
    stderr = %(stderr)s,
    exit_code = %(exit_code)s,
    worker_id = CASE WHEN %(retry)s AND attempts < max_attempts THEN NULL ELSE worker_id END,
    heartbeat_at = CASE WHEN %(retry)s AND attempts < max_attempts THEN NULL ELSE heartbeat_at END,
    completed_at = CASE WHEN %(retry)s AND attempts < max_attempts THEN NULL ELSE now() END,
    duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM (now() - started_at)) * 1000)::bigint)
WHERE id = %(id)s
  AND status = 'running'
  AND worker_id = %(worker_id)s
  AND attempts = %(attempt)s
RETURNING id, status
