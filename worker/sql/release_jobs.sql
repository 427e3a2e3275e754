-- Hand jobs this worker could not finish back to the queue, as if never
-- claimed: the attempt is not spent. Fenced by worker_id.
UPDATE analysis_jobs
SET status = 'pending',
    attempts = GREATEST(attempts - 1, 0),
    worker_id = NULL,
    started_at = NULL,
    heartbeat_at = NULL
WHERE id = ANY(%(ids)s::uuid[])
  AND status = 'running'
  AND worker_id = %(worker_id)s
