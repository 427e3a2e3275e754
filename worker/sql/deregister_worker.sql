DELETE FROM analysis_workers WHERE id = %(id)s
