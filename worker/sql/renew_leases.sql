-- Renew the lease of every job this worker still runs, in one statement, and
-- learn which of them are no longer ours (cancelled, rescued, deleted).
UPDATE analysis_jobs
SET heartbeat_at = now()
WHERE id = ANY(%(ids)s::uuid[])
  AND status = 'running'
  AND worker_id = %(worker_id)s
RETURNING id
