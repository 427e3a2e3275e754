-- True once no transaction is between its idle-worker check and its commit
-- (each holds this lock shared from the check to the commit; see migrations
-- 0006 and 0008). Taken exclusively without waiting, and released at once: a worker
-- must never queue ahead of submitters and stall them.
SELECT pg_try_advisory_xact_lock(7310598114230005006) AS settled
