-- The worker is alive: refresh its registry row (re-creating it if it aged out).
INSERT INTO analysis_workers (id, host, pid, version, concurrency, jobs_processed, draining)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(concurrency)s, %(jobs_processed)s, %(draining)s)
ON CONFLICT (id) DO UPDATE
SET last_seen_at = now(), jobs_processed = EXCLUDED.jobs_processed, draining = EXCLUDED.draining
