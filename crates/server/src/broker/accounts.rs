//! Checking MQTT passwords: the accounts of broker.toml's
//! `[v4.*.connections.auth]` tables (plaintext, compared in constant time)
//! and those made with `widgetry device add` (argon2id hashes in the
//! database, reloaded when they change).
//!
//! An argon2id check costs ~20 ms of a core by design, so what a flood of
//! logins can cost is bounded: one check runs at a time, at most
//! [`MAX_WAITING`] wait for it (the rest are refused at once), and a
//! password that was verified is remembered as a keyed SHA-256 digest, so
//! a fleet reconnecting after a restart of the network pays one check per
//! device per server run, not per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};

use crate::store::accounts::{Account, AccountKind};

/// Logins that may wait for the one running password check.
pub const MAX_WAITING: usize = 64;

/// The argon2id hash of `password` as a PHC string (random salt).
pub fn hash_password(password: &str) -> String {
    let salt =
        SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes are a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2id with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches the PHC string `phc` (false for a malformed one).
pub fn verify_password(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A new random password: 24 random bytes as 32 URL-safe characters.
pub fn generate_password() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 24] = rand::random();
    // 24 bytes = 192 bits = 32 six-bit characters.
    let mut out = String::with_capacity(32);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32;
        for shift in [18, 12, 6, 0] {
            out.push(ALPHABET[(n >> shift) as usize & 63] as char);
        }
    }
    out
}

/// Compares two secrets in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A hash and the keyed digest of the password verified against it.
type Verified = (Arc<str>, [u8; 32]);

#[derive(Debug)]
struct Stored {
    kind: AccountKind,
    phc: Arc<str>,
}

/// Every account the broker knows.
#[derive(Debug)]
pub struct Accounts {
    /// From broker.toml: username → password.
    plain: HashMap<String, String>,
    /// From the database (replaced whole by [`Accounts::replace_stored`]).
    stored: RwLock<Arc<HashMap<String, Stored>>>,
    /// Stored accounts whose password was rotated or that were removed,
    /// with the broker's login serial at that moment: connections of
    /// theirs that logged in at or before it are no longer let in.
    revoked: RwLock<Arc<HashMap<String, u64>>>,
    /// Username → (hash, keyed digest of the password verified against it).
    verified: Mutex<HashMap<String, Verified>>,
    digest_key: [u8; 32],
    checking: tokio::sync::Semaphore,
    waiting: AtomicUsize,
}

impl Accounts {
    pub fn new(plain: HashMap<String, String>, stored: &[Account]) -> Accounts {
        let accounts = Accounts {
            plain,
            stored: RwLock::default(),
            revoked: RwLock::default(),
            verified: Mutex::default(),
            digest_key: rand::random(),
            checking: tokio::sync::Semaphore::new(1),
            waiting: AtomicUsize::new(0),
        };
        accounts.replace_stored(stored, 0);
        accounts
    }

    /// Takes the database's accounts as they are now. Those whose password
    /// changed or that are gone are revoked as of `login` (the broker's
    /// latest login serial, read by the caller before this call): their
    /// connections that logged in up to it are cut off (see
    /// [`Accounts::revoked`]). Returns how many were revoked.
    pub fn replace_stored(&self, accounts: &[Account], login: u64) -> usize {
        let map: HashMap<String, Stored> = accounts
            .iter()
            .map(|a| {
                let stored = Stored {
                    kind: a.kind,
                    phc: a.phc.as_str().into(),
                };
                (a.name.clone(), stored)
            })
            .collect();
        let old = self.snapshot();
        let gone: Vec<&String> = old
            .iter()
            .filter(|(name, was)| {
                !self.plain.contains_key(*name)
                    && map.get(*name).is_none_or(|now| now.phc != was.phc)
            })
            .map(|(name, _)| name)
            .collect();
        if !gone.is_empty() {
            let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
            let mut next = HashMap::clone(&revoked);
            for name in &gone {
                next.insert((*name).clone(), login);
            }
            *revoked = Arc::new(next);
        }
        *self.stored.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        gone.len()
    }

    /// Whether a connection of `name` that logged in with serial `login`
    /// used credentials revoked since (a rotated password, a removed
    /// account). Cheap: it runs for every publish.
    pub fn revoked(&self, name: &str, login: u64) -> bool {
        let revoked = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        !revoked.is_empty() && revoked.get(name).is_some_and(|&at| login <= at)
    }

    fn snapshot(&self) -> Arc<HashMap<String, Stored>> {
        self.stored
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `name` has an account.
    pub fn contains(&self, name: &str) -> bool {
        self.plain.contains_key(name) || self.snapshot().contains_key(name)
    }

    /// Whether `name` is a stored observer account.
    pub fn is_observer(&self, name: &str) -> bool {
        self.snapshot()
            .get(name)
            .is_some_and(|s| s.kind == AccountKind::Observer)
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        let stored = self.snapshot();
        self.plain.len()
            + stored
                .keys()
                .filter(|k| !self.plain.contains_key(*k))
                .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn digest(&self, phc: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.digest_key);
        h.update((phc.len() as u64).to_le_bytes());
        h.update(phc.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Checks `username`'s password. broker.toml's accounts win over
    /// stored ones of the same name.
    pub async fn check(&self, username: &str, password: &str) -> bool {
        if let Some(p) = self.plain.get(username) {
            return same(password, p);
        }
        let Some(phc) = self.snapshot().get(username).map(|s| s.phc.clone()) else {
            return false;
        };
        let digest = self.digest(&phc, password);
        {
            let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((h, d)) = cache.get(username)
                && **h == *phc
            {
                return *d == digest;
            }
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let permit = self.checking.acquire().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(_permit) = permit else { return false };
        let (hash, pass) = (phc.clone(), password.to_string());
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &pass))
            .await
            .unwrap_or(false);
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(username.to_string(), (phc, digest));
        }
        ok
    }
}

/// Keeps the policy's stored accounts equal to the database's: polls the
/// accounts' version every second and reloads them when it changed, so a
/// device added, rotated or removed with `widgetry device` takes effect
/// without a restart: for its next CONNECT, and the connections that
/// logged in with a rotated or removed account's old credentials are
/// disconnected by the broker (`revalidator`).
pub async fn follow(
    policy: Arc<super::policy::Policy>,
    store: crate::store::Store,
    revalidator: rumqttd::Revalidator,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), crate::store::StoreError> {
    let Some(accounts) = policy.accounts() else {
        // Authentication is off: nothing to follow until shutdown.
        shutdown.cancelled().await;
        return Ok(());
    };
    let mut seen = store.accounts_version().await?;
    // A revalidation the router could not take yet (its queue was full).
    let mut kick_pending = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        if kick_pending {
            kick_pending = !revalidator.revalidate();
        }
        // A failed read (a busy or briefly missing database) is retried at
        // the next tick with the accounts as they were.
        let version = match store.accounts_version().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the accounts' version; keeping the accounts as they are");
                continue;
            }
        };
        if version != seen {
            match store.accounts().await {
                Ok(all) => {
                    let revoked = accounts.replace_stored(&all, rumqttd::latest_login());
                    seen = version;
                    tracing::info!(
                        accounts = all.len(),
                        revoked,
                        "MQTT accounts reloaded from the database"
                    );
                    if revoked > 0 {
                        kick_pending = !revalidator.revalidate();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the MQTT accounts; keeping the accounts as they are")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, password: &str, kind: AccountKind) -> Account {
        Account {
            name: name.into(),
            kind,
            phc: hash_password(password),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn generated_passwords_are_long_random_and_url_safe() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn hashes_are_salted_argon2id_and_verify_only_their_password() {
        let (h1, h2) = (hash_password("pw"), hash_password("pw"));
        assert!(h1.starts_with("$argon2id$"), "{h1}");
        assert_ne!(h1, h2, "a random salt each time");
        assert!(verify_password(&h1, "pw"));
        assert!(!verify_password(&h1, "pW"));
        assert!(!verify_password("not a hash", "pw"));
    }

    #[tokio::test]
    async fn stored_accounts_check_rotate_and_disappear() {
        let plain = HashMap::from([("t".to_string(), "toml-pw".to_string())]);
        let accounts = Accounts::new(plain, &[stored("d1", "one", AccountKind::Device)]);
        assert!(accounts.check("t", "toml-pw").await);
        assert!(!accounts.check("t", "toml-p").await);
        assert!(accounts.check("d1", "one").await);
        // Remembered now: a wrong password is still refused.
        assert!(!accounts.check("d1", "two").await);
        assert!(!accounts.check("nobody", "one").await);
        // Rotated: the old password stops working at once.
        assert!(!accounts.revoked("d1", 5));
        let d1 = stored("d1", "two", AccountKind::Device);
        assert_eq!(accounts.replace_stored(std::slice::from_ref(&d1), 7), 1);
        assert!(!accounts.check("d1", "one").await);
        assert!(accounts.check("d1", "two").await);
        // Logins up to serial 7 used the old password; later ones the new.
        assert!(accounts.revoked("d1", 5) && accounts.revoked("d1", 7));
        assert!(!accounts.revoked("d1", 8));
        // The same accounts again revoke nothing more.
        assert_eq!(accounts.replace_stored(&[d1], 9), 0);
        assert!(!accounts.revoked("d1", 8));
        // broker.toml's accounts are never revoked by the database.
        assert!(!accounts.revoked("t", 1));
        let o = stored("o", "eye", AccountKind::Observer);
        assert_eq!(accounts.replace_stored(&[o], 12), 1);
        assert!(accounts.revoked("d1", 10), "removed after login 10");
        assert!(!accounts.check("d1", "two").await, "removed");
        assert!(accounts.is_observer("o") && !accounts.is_observer("t"));
        assert_eq!(accounts.len(), 2);
    }
}
