-- The documented way to cancel: the trigger analysis_jobs_on_cancel stamps
-- the row and tells the worker running it to stop.
UPDATE analysis_jobs
SET status = 'cancelled'
WHERE id = %(id)s
  AND status IN ('pending', 'running')
RETURNING id, status
