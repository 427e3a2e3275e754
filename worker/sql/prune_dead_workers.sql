-- Registry rows of workers not seen for a while (killed without a goodbye).
DELETE FROM analysis_workers
WHERE last_seen_at < now() - make_interval(secs => %(max_silence_seconds)s)
