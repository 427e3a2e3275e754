-- This worker has run out of work: ask the next transaction that adds a
-- pending job to NOTIFY (migration 0006 clears the flag and notifies).
UPDATE analysis_workers SET waiting = true WHERE id = %(worker_id)s
