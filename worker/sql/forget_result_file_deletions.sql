-- The files were deleted (or were already gone): drop them from the queue.
DELETE FROM analysis_result_file_deletions
WHERE location = ANY(%(locations)s::text[])
