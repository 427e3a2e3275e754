-- Renew the lease of every attempt this worker still runs, in one statement,
-- and learn which of them are no longer ours (cancelled, rescued, deleted).
-- Fenced by worker and attempt, like every write about a job. Rows are locked
-- in id order; the worker never runs this while it records outcomes
-- (record_outcomes.sql), so the two never deadlock.
WITH mine AS (
    SELECT job.id
    FROM analysis_jobs AS job
    JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS claimed (id, attempt)
      ON job.id = claimed.id AND job.attempts = claimed.attempt
    WHERE job.status = 'running'
      AND job.worker_id = %(worker_id)s
    ORDER BY job.id
    FOR NO KEY UPDATE
)
UPDATE analysis_jobs AS job
SET heartbeat_at = now()
FROM mine
WHERE job.id = mine.id
RETURNING job.id, job.attempts
