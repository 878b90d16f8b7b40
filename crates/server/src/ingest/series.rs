//! Series resolution: device series keys and session-local ids to the
//! database's series ids. Committed rows and bindings are cached
//! (hash maps, O(1) per lookup, bounded by [`CACHE_LIMIT`]); what a
//! transaction creates waits in [`Pending`] and joins the caches only once
//! it has committed, so a rolled-back transaction leaves no stale entry.

use std::collections::HashMap;

use widgetry_proto::{Reject, SeriesKey, SessionId};

use crate::store::write;
use crate::store::{StoreError, WriteTx};

/// Bound on each cache; past it the cache is cleared and refilled from
/// the database on demand.
pub const CACHE_LIMIT: usize = 200_000;

/// `(device, session, session-local id)`.
pub type BindingKey = (String, SessionId, u32);

/// Series rows, session bindings and keys learnt by the transaction under
/// way.
#[derive(Default)]
pub struct Pending {
    pub bindings: HashMap<BindingKey, i64>,
    pub series: HashMap<(String, String), i64>,
    /// series id → key.
    pub new_keys: HashMap<i64, String>,
    /// Series created per device.
    pub created: HashMap<String, usize>,
    /// Bindings made by this transaction, inserted before it commits
    /// ([`write::bind_session_series_many`]).
    pub new_bindings: Vec<(String, SessionId, u32, i64)>,
}

/// The caches of committed series.
pub struct SeriesResolver {
    /// Series one device may have ([`widgetry_proto::Limits`]).
    limit: usize,
    /// device → committed series count, learnt when it first creates one.
    counts: HashMap<String, usize>,
    /// (device, session, local id) → series id.
    bindings: HashMap<BindingKey, i64>,
    /// (device, series key) → series id.
    series_ids: HashMap<(String, String), i64>,
    /// series id → canonical key, for the live feed.
    keys: HashMap<i64, String>,
}

impl SeriesResolver {
    pub fn new(limit: usize) -> SeriesResolver {
        SeriesResolver {
            limit,
            counts: HashMap::new(),
            bindings: HashMap::new(),
            series_ids: HashMap::new(),
            keys: HashMap::new(),
        }
    }

    /// Adds what a committed transaction learnt.
    pub fn commit(&mut self, pending: Pending) {
        for (device, n) in pending.created {
            if let Some(c) = self.counts.get_mut(&device) {
                *c += n;
            }
        }
        if self.counts.len() > CACHE_LIMIT {
            self.counts.clear();
        }
        fn extend<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, new: HashMap<K, V>) {
            if map.len() + new.len() > CACHE_LIMIT {
                map.clear();
            }
            map.extend(new);
        }
        extend(&mut self.bindings, pending.bindings);
        extend(&mut self.series_ids, pending.series);
        extend(&mut self.keys, pending.new_keys);
    }

    /// Warms `pending` for a transaction's series definitions and
    /// session-local ids in a few multi-row statements, so that the
    /// per-item [`SeriesResolver::series_id`] and [`SeriesResolver::bound`]
    /// calls find them in memory. A fleet's first batches (every device
    /// defining its series at once) used to cost four statements per
    /// series. New series are created here in item order under the same
    /// per-device limit; a key past the limit is left for `series_id` to
    /// reject.
    pub async fn prefetch(
        &mut self,
        tx: &mut WriteTx,
        defs: &[(&str, &SeriesKey)],
        bindings: &[(&str, &SessionId, u32)],
        pending: &mut Pending,
    ) -> Result<(), StoreError> {
        let mut names: Vec<(&str, &SeriesKey, String)> = Vec::new();
        let mut wanted = std::collections::HashSet::new();
        for (device, key) in defs {
            let name = (device.to_string(), key.to_string());
            if self.series_ids.contains_key(&name) || pending.series.contains_key(&name) {
                continue;
            }
            if wanted.insert(name.clone()) {
                names.push((device, key, name.1));
            }
        }
        if !names.is_empty() {
            let pairs: Vec<(&str, &str)> = names.iter().map(|(d, _, k)| (*d, k.as_str())).collect();
            let found = write::find_series_many(tx, &pairs).await?;
            let mut uncounted: Vec<&str> = names
                .iter()
                .filter(|(d, _, k)| !found.contains_key(&(d.to_string(), k.clone())))
                .map(|(d, _, _)| *d)
                .filter(|d| !self.counts.contains_key(*d))
                .collect();
            uncounted.sort_unstable();
            uncounted.dedup();
            if !uncounted.is_empty() {
                let counts = write::count_series_many(tx, &uncounted).await?;
                for d in uncounted {
                    self.counts
                        .insert(d.to_string(), counts.get(d).copied().unwrap_or(0));
                }
            }
            let mut create: Vec<(&str, &SeriesKey)> = Vec::new();
            for (device, key, text) in &names {
                let name = (device.to_string(), text.clone());
                if let Some(id) = found.get(&name) {
                    self.learn(name, *id, pending);
                    continue;
                }
                let committed = self.counts.get(*device).copied().unwrap_or(0);
                let created = pending.created.entry(device.to_string()).or_default();
                if committed + *created < self.limit {
                    *created += 1;
                    create.push((device, key));
                }
            }
            if !create.is_empty() {
                for (name, id) in write::upsert_series_many(tx, &create).await? {
                    self.learn(name, id, pending);
                }
            }
        }
        let unknown: Vec<(&str, &SessionId, u32)> = bindings
            .iter()
            .copied()
            .filter(|(d, s, l)| {
                let b = (d.to_string(), **s, *l);
                !self.bindings.contains_key(&b) && !pending.bindings.contains_key(&b)
            })
            .collect();
        if !unknown.is_empty() {
            pending
                .bindings
                .extend(write::session_series_many(tx, &unknown).await?);
        }
        Ok(())
    }

    /// Records in `pending` a series id this transaction found or made.
    fn learn(&self, name: (String, String), id: i64, pending: &mut Pending) {
        if !self.keys.contains_key(&id) {
            pending.new_keys.insert(id, name.1.clone());
        }
        pending.series.insert(name, id);
    }

    /// The database id of a device's series, created if new, unless the
    /// device has reached its series limit (then the inner result is the
    /// reject and nothing is created).
    pub async fn series_id(
        &mut self,
        tx: &mut WriteTx,
        device: &str,
        key: &SeriesKey,
        pending: &mut Pending,
    ) -> Result<Result<i64, Reject>, StoreError> {
        let name = (device.to_string(), key.to_string());
        if let Some(g) = self
            .series_ids
            .get(&name)
            .or_else(|| pending.series.get(&name))
        {
            return Ok(Ok(*g));
        }
        let global = match write::find_series(tx, device, key).await? {
            Some(g) => g,
            None => {
                let committed = match self.counts.get(device) {
                    Some(n) => *n,
                    None => {
                        let n = write::count_series(tx, device).await?;
                        self.counts.insert(device.to_string(), n);
                        n
                    }
                };
                let created = pending.created.entry(device.to_string()).or_default();
                if committed + *created >= self.limit {
                    return Ok(Err(Reject::SeriesLimit {
                        device: device.to_string(),
                        key: widgetry_common::excerpt(&name.1),
                        limit: self.limit,
                    }));
                }
                *created += 1;
                write::upsert_series(tx, device, key).await?
            }
        };
        self.learn(name, global, pending);
        Ok(Ok(global))
    }

    /// The series a session-local id is bound to, if any.
    pub async fn bound(
        &self,
        tx: &mut WriteTx,
        binding: &BindingKey,
        pending: &mut Pending,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(g) = self
            .bindings
            .get(binding)
            .or_else(|| pending.bindings.get(binding))
        {
            return Ok(Some(*g));
        }
        let found = write::session_series(tx, &binding.0, &binding.1, binding.2).await?;
        if let Some(g) = found {
            pending.bindings.insert(binding.clone(), g);
        }
        Ok(found)
    }

    /// The key of a series id: from the cache, this transaction, or the database.
    pub async fn series_key(
        &self,
        tx: &mut WriteTx,
        id: i64,
        pending: &mut Pending,
    ) -> Result<String, StoreError> {
        if let Some(k) = self.keys.get(&id) {
            return Ok(k.clone());
        }
        if let Some(k) = pending.new_keys.get(&id) {
            return Ok(k.clone());
        }
        let key = write::series_key(tx, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("series id {id} has no row")))?;
        pending.new_keys.insert(id, key.clone());
        Ok(key)
    }
}
