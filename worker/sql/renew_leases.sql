-- Renew the lease of every attempt this worker still runs, in one statement;
-- the ones missing from the answer may be no longer ours (cancelled, rescued,
-- deleted) or only locked (see below).
-- Fenced by worker and attempt, like every write about a job. A row another
-- transaction has locked (the recorder writing its outcome, a user's open
-- transaction) is skipped, not waited for: this statement never waits for a
-- row, so it can never take part in a deadlock, and one locked row never
-- holds up the other leases. A skipped row is missing from the answer; the
-- heartbeat then checks whether it is still ours.
WITH mine AS (
    SELECT job.id
    FROM analysis_jobs AS job
    JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS claimed (id, attempt)
      ON job.id = claimed.id AND job.attempts = claimed.attempt
    WHERE job.status = 'running'
      AND job.worker_id = %(worker_id)s
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE analysis_jobs AS job
SET heartbeat_at = now()
FROM mine
WHERE job.id = mine.id
RETURNING job.id, job.attempts
