-- A batch of result files (relative to RESULT_STORAGE_DIR) that no row refers
-- to any more, queued by the triggers of migration 0005.
SELECT location
FROM analysis_result_file_deletions
ORDER BY queued_at
LIMIT %(batch)s
