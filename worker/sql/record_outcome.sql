-- Write one finished job back, fenced by the attempt this worker claimed:
-- if the job was rescued, cancelled or re-claimed meanwhile, nothing changes.
UPDATE analysis_jobs
SET status = %(status)s,
    result = %(result)s::jsonb,
    error_message = %(error_message)s,
    stdout = %(stdout)s,
    stderr = %(stderr)s,
    exit_code = %(exit_code)s,
    completed_at = now(),
    duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM (now() - started_at)) * 1000)::bigint)
WHERE id = %(id)s
  AND status = 'running'
  AND worker_id = %(worker_id)s
  AND attempts = %(attempt)s
RETURNING id, duration_ms
