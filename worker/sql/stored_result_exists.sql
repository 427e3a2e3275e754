-- Does a committed row refer to this result file? (Asked before removing a
-- file whose write reported nothing: its first try may have committed.)
SELECT 1 FROM analysis_result_storage WHERE job_id = %(job_id)s AND location = %(location)s
