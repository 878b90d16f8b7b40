//! Cursors of the post-commit sinks (`sink_cursors`): the last commit id
//! each one has forwarded, so that it resumes after it.

use sqlx::Row;

use super::{Store, StoreError};

impl Store {
    /// The commit id `sink` forwarded last, if it ever stored one.
    pub async fn sink_cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query("SELECT commit_id FROM sink_cursors WHERE name = $1")
            .bind(sink)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0).max(0) as u64))
    }

    /// Records that `sink` has forwarded every commit through `commit_id`.
    pub async fn set_sink_cursor(&self, sink: &str, commit_id: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sink_cursors (name, commit_id) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET commit_id = excluded.commit_id",
        )
        .bind(sink)
        .bind(commit_id as i64)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
