-- A batch of result files (relative to RESULT_STORAGE_DIR) that no row refers
-- to any more, queued by the triggers of migration 0005; a file whose deletion
-- failed waits for its next attempt (postpone_result_file_deletions.sql).
SELECT location
FROM analysis_result_file_deletions
WHERE next_attempt_at <= now()
ORDER BY next_attempt_at
LIMIT %(batch)s
