-- A job's result as the readers need it: the job row's result (inline, or the
-- stub of a stored one) and, if there is one, its analysis_result_storage row
-- without the content itself (read in slices by read_stored_result_slice).
SELECT job.id, job.status, job.result::text AS result,
       storage.size_bytes, storage.checksum, storage.content_type, storage.compression,
       storage.backend, storage.location
FROM analysis_jobs AS job
LEFT JOIN analysis_result_storage AS storage ON storage.job_id = job.id
WHERE job.id = %(id)s
