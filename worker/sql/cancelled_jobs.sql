-- Of these jobs, the ones whose row says they were cancelled. A cancel
-- notification is only a hint (any session can send one): a running job is
-- stopped for what its row says, never for the notification alone.
SELECT id::text
FROM analysis_jobs
WHERE id = ANY(%(ids)s::uuid[])
  AND status = 'cancelled'
