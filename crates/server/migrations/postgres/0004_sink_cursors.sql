-- Where each post-commit sink (the Graphite export) is in the commit
-- order: every commit up to `commit_id` was forwarded, so a restart
-- neither resends nor skips.
CREATE TABLE sink_cursors (
    name TEXT PRIMARY KEY,
    commit_id BIGINT NOT NULL
);
