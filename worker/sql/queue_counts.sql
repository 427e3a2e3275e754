-- Counts by status over the last %(hours)s hours (the created_at index bounds the scan).
SELECT status, count(*)
FROM analysis_jobs
WHERE created_at > now() - make_interval(hours => %(hours)s)
GROUP BY status
ORDER BY status
