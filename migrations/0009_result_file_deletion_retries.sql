-- depends: 0008_one_step_wake_check
-- A result file that cannot be deleted no longer holds up the others.
--
-- The pruner took the oldest queued files first and stopped at the first one
-- it could not delete (a permission problem, a directory in its place), so
-- that file stayed at the head of the queue and nothing queued after it was
-- ever deleted. Now a failed deletion is retried later, with a growing delay
-- (attempts, next_attempt_at), and its reason is kept (last_error), while the
-- rest of the queue goes on being deleted.
ALTER TABLE analysis_result_file_deletions
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error text;

CREATE INDEX analysis_result_file_deletions_due_idx ON analysis_result_file_deletions (next_attempt_at);
