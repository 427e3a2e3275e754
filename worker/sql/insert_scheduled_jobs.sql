-- Enqueue one job per (schedule, tick) with the schedule's parameters. The
-- unique key on (schedule_id, scheduled_for) turns a tick that already has its
-- job into a no-op; RETURNING lists only the jobs really inserted. The insert
-- trigger notifies the workers as for any other job.
INSERT INTO analysis_jobs (analysis_id, parameters, triggered_by, schedule_id, scheduled_for)
SELECT schedule.analysis_id, schedule.parameters, 'schedule:' || schedule.id, schedule.id, tick.scheduled_for
FROM unnest(%(schedule_ids)s::uuid[], %(ticks)s::timestamptz[]) AS tick (schedule_id, scheduled_for)
JOIN analysis_schedules AS schedule ON schedule.id = tick.schedule_id
ORDER BY tick.scheduled_for
ON CONFLICT (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL DO NOTHING
RETURNING id, schedule_id, scheduled_for
