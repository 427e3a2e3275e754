-- This worker has run out of work: ask the next transaction that adds a
-- pending job to NOTIFY (migrations 0006, 0008: it clears the flag and notifies).
-- Committed without waiting for the WAL flush: the flag is visible at once,
-- and one lost in a crash matters to nobody (the worker restarts anyway).
UPDATE analysis_workers
SET waiting = true
WHERE id = %(worker_id)s
  AND set_config('synchronous_commit', 'off', true) IS NOT NULL
