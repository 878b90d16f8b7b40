//! Rules and alerts (`rules`, `alerts`; crates/server/src/rules).

use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreError};

/// A stored rule: its JSON spec and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRule {
    pub name: String,
    pub spec: String,
    /// `config` or `api`.
    pub source: String,
}

impl StoredRule {
    /// The stored form of `spec`, from `source` (`config` or `api`).
    pub fn new(spec: &crate::rules::RuleSpec, source: &str) -> Result<StoredRule, StoreError> {
        Ok(StoredRule {
            name: spec.name.clone(),
            spec: serde_json::to_string(spec)
                .map_err(|e| StoreError::Sql(sqlx::Error::Encode(Box::new(e))))?,
            source: source.into(),
        })
    }
}

/// An alert row, as `GET /api/v1/alerts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertRow {
    pub id: i64,
    pub rule: String,
    pub device: String,
    /// The series key (`""` for presence rules).
    pub series: String,
    pub severity: String,
    /// `pending`, `firing` or `resolved`.
    pub state: String,
    pub value: Option<f64>,
    pub pending_ms: i64,
    pub firing_ms: Option<i64>,
    pub resolved_ms: Option<i64>,
}

/// Filters of `GET /api/v1/alerts`.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub device: Option<String>,
    pub rule: Option<String>,
    pub state: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub limit: i64,
}

const ALERT_COLUMNS: &str =
    "id, rule, device, series, severity, state, value, pending_ms, firing_ms, resolved_ms";

fn alert_row(r: &sqlx::any::AnyRow) -> AlertRow {
    AlertRow {
        id: r.get(0),
        rule: r.get(1),
        device: r.get(2),
        series: r.get(3),
        severity: r.get(4),
        state: r.get(5),
        value: r.get(6),
        pending_ms: r.get(7),
        firing_ms: r.get(8),
        resolved_ms: r.get(9),
    }
}

impl Store {
    /// Every stored rule, by name.
    pub async fn rules(&self) -> Result<Vec<StoredRule>, StoreError> {
        let rows = sqlx::query("SELECT name, spec, source FROM rules ORDER BY name")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredRule {
                name: r.get(0),
                spec: r.get(1),
                source: r.get(2),
            })
            .collect())
    }

    /// Stores (or replaces) a rule.
    pub async fn put_rule(&self, rule: &StoredRule, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rules (name, spec, source, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source,
               updated_ms = excluded.updated_ms",
        )
        .bind(&rule.name)
        .bind(&rule.spec)
        .bind(&rule.source)
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deletes a rule; false if there was none of that name.
    pub async fn delete_rule(&self, name: &str) -> Result<bool, StoreError> {
        let res = sqlx::query("DELETE FROM rules WHERE name = $1")
            .bind(name)
            .execute(&self.writer)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    /// Makes the config file's rules the stored `config` rules: those no
    /// longer in the file are deleted, the others stored.
    pub async fn sync_config_rules(
        &self,
        rules: &[StoredRule],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for old in self.rules().await? {
            if old.source == "config" && !rules.iter().any(|r| r.name == old.name) {
                self.delete_rule(&old.name).await?;
            }
        }
        for r in rules {
            self.put_rule(r, now_ms).await?;
        }
        Ok(())
    }

    /// The alerts that are pending or firing.
    pub async fn open_alerts(&self) -> Result<Vec<AlertRow>, StoreError> {
        let sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE state <> 'resolved'");
        // Only the fixed column list is formatted in.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(alert_row).collect())
    }

    /// Stores a new open alert and returns its id.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_alert(
        &self,
        rule: &str,
        device: &str,
        series: &str,
        severity: &str,
        state: &str,
        value: Option<f64>,
        pending_ms: i64,
        firing_ms: Option<i64>,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO alerts (rule, device, series, severity, state, value, pending_ms, firing_ms, updated_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(rule)
        .bind(device)
        .bind(series)
        .bind(severity)
        .bind(state)
        .bind(value)
        .bind(pending_ms)
        .bind(firing_ms)
        .bind(widgetry_common::now_ms())
        .fetch_one(&self.writer)
        .await?;
        Ok(row.get(0))
    }

    /// Moves alert `id` to `state` (firing or resolved).
    pub async fn update_alert(
        &self,
        id: i64,
        state: &str,
        value: Option<f64>,
        firing_ms: Option<i64>,
        resolved_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE alerts SET state = $1, value = COALESCE($2, value),
               firing_ms = COALESCE($3, firing_ms), resolved_ms = $4, updated_ms = $5 WHERE id = $6",
        )
        .bind(state)
        .bind(value)
        .bind(firing_ms)
        .bind(resolved_ms)
        .bind(widgetry_common::now_ms())
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Alerts matching `f`, newest first.
    pub async fn alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE ($1 IS NULL OR device = $1) AND ($2 IS NULL OR rule = $2)
               AND ($3 IS NULL OR state = $3 OR ($3 = 'open' AND state <> 'resolved')) AND pending_ms >= $4 AND pending_ms <= $5
             ORDER BY pending_ms DESC, id DESC LIMIT $6"
        );
        // Only the fixed column list is formatted in.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.device.as_deref())
            .bind(f.rule.as_deref())
            .bind(f.state.as_deref())
            .bind(f.from.unwrap_or(i64::MIN))
            .bind(f.to.unwrap_or(i64::MAX))
            .bind(f.limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(alert_row).collect())
    }
}
