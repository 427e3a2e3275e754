-- One slice of a stored result's compressed content (offset counts from 1).
-- The content is stored EXTERNAL (migration 0005), so only the TOAST chunks
-- of the slice are read. The checksum pins the row the reader started with:
-- if a later attempt replaced it meanwhile, no row comes back.
SELECT substring(content FROM %(offset)s FOR %(length)s)
FROM analysis_result_storage
WHERE job_id = %(id)s
  AND checksum = %(checksum)s
