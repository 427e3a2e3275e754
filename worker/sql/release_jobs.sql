-- Hand attempts this worker could not finish back to the queue, as if never
-- claimed: the attempt is not spent. Fenced by worker and attempt.
UPDATE analysis_jobs AS job
SET status = 'pending',
    attempts = GREATEST(job.attempts - 1, 0),
    worker_id = NULL,
    started_at = NULL,
    heartbeat_at = NULL
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS mine (id, attempt)
WHERE job.id = mine.id
  AND job.attempts = mine.attempt
  AND job.status = 'running'
  AND job.worker_id = %(worker_id)s
