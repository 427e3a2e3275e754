INSERT INTO analysis_workers (id, host, pid, version, concurrency)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(concurrency)s)
ON CONFLICT (id) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version, concurrency = EXCLUDED.concurrency,
    started_at = now(), last_seen_at = now(), jobs_processed = 0, draining = false, waiting = false
