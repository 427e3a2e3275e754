-- Pause or resume; resuming re-arms the schedule (the trigger clears next_run_at).
UPDATE analysis_schedules SET is_active = %(active)s WHERE id = %(id)s RETURNING id
