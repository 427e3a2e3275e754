-- Retention: delete one batch of finished jobs created more than %(days)s days
-- ago (their attempts and stored results go with them, by foreign key; the
-- files of stored results are queued for the pruner by a trigger).
DELETE FROM analysis_jobs
WHERE id IN (
    SELECT id
    FROM analysis_jobs
    WHERE created_at < now() - make_interval(days => %(days)s)
      AND status IN ('completed', 'failed', 'timeout', 'cancelled')
    LIMIT %(batch)s
)
