DROP INDEX analysis_result_file_deletions_due_idx;

ALTER TABLE analysis_result_file_deletions
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN last_error;
