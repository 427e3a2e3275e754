DELETE FROM analysis_schedules WHERE id = %(id)s RETURNING id
