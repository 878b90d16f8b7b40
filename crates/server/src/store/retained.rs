//! The embedded broker's retained messages, kept across restarts of
//! `serve`: read once at start, written as they change (see
//! `broker::retained`). Nothing else reads or writes this table.

use sqlx::Row;

use super::{Store, StoreError};

/// A retained message: topic, payload, QoS.
pub type Retained = (String, Vec<u8>, u8);

/// A change to apply: a message set (payload, QoS) or cleared (None).
pub type RetainedUpdate = (String, Option<(Vec<u8>, u8)>);

impl Store {
    /// Every retained message, by topic.
    pub async fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        let rows = sqlx::query("SELECT topic, payload, qos FROM retained ORDER BY topic")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                let qos: i64 = r.try_get(2)?;
                Ok((r.try_get(0)?, r.try_get(1)?, qos.clamp(0, 2) as u8))
            })
            .collect()
    }

    /// Applies `updates` in one transaction.
    pub async fn apply_retained(&self, updates: &[RetainedUpdate]) -> Result<(), StoreError> {
        let now = widgetry_common::now_ms();
        let mut tx = self.begin().await?;
        for (topic, message) in updates {
            match message {
                Some((payload, qos)) => {
                    sqlx::query(
                        "INSERT INTO retained (topic, payload, qos, updated_ms) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload,
                             qos = excluded.qos, updated_ms = excluded.updated_ms",
                    )
                    .bind(topic)
                    .bind(&payload[..])
                    .bind(*qos as i64)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM retained WHERE topic = $1")
                        .bind(topic)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
