-- Files that could not be deleted: try again later, 5 minutes after the first
-- failure, doubling up to a day, and keep the reason for whoever looks.
UPDATE analysis_result_file_deletions AS queued
SET attempts = queued.attempts + 1,
    last_error = failed.error,
    next_attempt_at = now() + LEAST(interval '5 minutes' * power(2, LEAST(queued.attempts, 10)), interval '1 day')
FROM unnest(%(locations)s::text[], %(errors)s::text[]) AS failed (location, error)
WHERE queued.location = failed.location
