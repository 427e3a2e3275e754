-- The rows of jobs the lease renewal skipped, as they are now: still this
-- attempt's (only locked by another transaction), or cancelled, rescued,
-- deleted. The lease's age comes as a number.
SELECT id::text, status, worker_id, attempts,
       CASE WHEN isfinite(heartbeat_at) THEN EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 END AS lease_age
FROM analysis_jobs
WHERE id = ANY(%(ids)s::uuid[])
