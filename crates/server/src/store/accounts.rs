//! MQTT accounts (devices and read-only observers) with their argon2id
//! hashes, written by `widgetry device …` (also while `serve` runs: every
//! change bumps `accounts_version`, which `serve` polls) and read by the
//! broker's login check through [`crate::broker::accounts`].

use sqlx::Row;

use super::{Store, StoreError};

/// What an account may do on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    /// Publishes under its own `widgetry/v1/{name}/`, reads its own acks.
    Device,
    /// Subscribes to anything, publishes nothing.
    Observer,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Device => "device",
            AccountKind::Observer => "observer",
        }
    }

    fn parse(s: &str) -> AccountKind {
        // The table's CHECK allows only these two.
        if s == "observer" {
            AccountKind::Observer
        } else {
            AccountKind::Device
        }
    }
}

/// One account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub kind: AccountKind,
    /// The argon2id hash as a PHC string.
    pub phc: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Store {
    /// Every account, by name.
    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, kind, phc, created_ms, updated_ms FROM accounts ORDER BY name",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(1)?;
                Ok(Account {
                    name: r.try_get(0)?,
                    kind: AccountKind::parse(&kind),
                    phc: r.try_get(2)?,
                    created_ms: r.try_get(3)?,
                    updated_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// A number that changes whenever an account is added, removed or
    /// given a new password.
    pub async fn accounts_version(&self) -> Result<i64, StoreError> {
        let (v,): (i64,) = sqlx::query_as("SELECT version FROM accounts_version WHERE id = 1")
            .fetch_one(&self.reader)
            .await?;
        Ok(v)
    }

    /// Adds an account; false when one with that name exists (unchanged).
    pub async fn add_account(
        &self,
        name: &str,
        kind: AccountKind,
        phc: &str,
    ) -> Result<bool, StoreError> {
        let now = widgetry_common::now_ms();
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO accounts (name, kind, phc, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(kind.as_str())
        .bind(phc)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        bump_and_commit(tx, done).await
    }

    /// Replaces an account's hash; false when there is no such account.
    pub async fn set_account_hash(&self, name: &str, phc: &str) -> Result<bool, StoreError> {
        let now = widgetry_common::now_ms();
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE accounts SET phc = $1, updated_ms = $2 WHERE name = $3")
            .bind(phc)
            .bind(now)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        bump_and_commit(tx, done).await
    }

    /// Removes an account; false when there was none.
    pub async fn remove_account(&self, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM accounts WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        bump_and_commit(tx, done).await
    }
}

/// Ends an account change: the version moves in the same transaction, so
/// a running `serve` sees the change with its next poll.
async fn bump_and_commit(mut tx: super::WriteTx, changed: bool) -> Result<bool, StoreError> {
    sqlx::query("UPDATE accounts_version SET version = version + 1 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(changed)
}
