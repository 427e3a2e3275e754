-- Workers holding running jobs right now, by the jobs they hold.
SELECT worker_id, count(*) AS running_jobs, max(heartbeat_at) AS last_heartbeat
FROM analysis_jobs
WHERE status = 'running'
GROUP BY worker_id
ORDER BY worker_id
