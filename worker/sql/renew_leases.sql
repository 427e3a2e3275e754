-- Renew the lease of every attempt this worker still runs, in one statement,
-- and learn which of them are no longer ours (cancelled, rescued, deleted).
-- Fenced by worker and attempt, like every write about a job.
UPDATE analysis_jobs AS job
SET heartbeat_at = now()
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS mine (id, attempt)
WHERE job.id = mine.id
  AND job.attempts = mine.attempt
  AND job.status = 'running'
  AND job.worker_id = %(worker_id)s
RETURNING job.id
