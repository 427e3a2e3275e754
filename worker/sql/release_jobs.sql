-- Hand attempts this worker could not finish back to the queue, as if never
-- claimed: the attempt is not spent. Fenced by worker, attempt and claim (its
-- started_at): a claim that rolled back did not spend the attempt either, so
-- the same worker may hold the same attempt again, from a later claim.
UPDATE analysis_jobs AS job
SET status = 'pending',
    attempts = GREATEST(job.attempts - 1, 0),
    worker_id = NULL,
    started_at = NULL,
    heartbeat_at = NULL
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(started_ats)s::timestamptz[]) AS mine (id, attempt, started_at)
WHERE job.id = mine.id
  AND job.attempts = mine.attempt
  AND job.started_at = mine.started_at
  AND job.status = 'running'
  AND job.worker_id = %(worker_id)s
