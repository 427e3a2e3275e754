-- A job's status alone: what a refused cancel reports, even for a job whose
-- other columns cannot be loaded (see jobs.JobDataTooDeep).
SELECT status
FROM analysis_jobs
WHERE id = %(id)s
