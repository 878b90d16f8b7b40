//! Statements run inside the ingestor's write transaction: series and
//! session bindings, the batch log, ack watermarks, gaps, events, device
//! presence. They never commit: the caller commits, then acknowledges.

use sqlx::{AnyConnection, Row};
use widgetry_proto::json::Status;
use widgetry_proto::{DecodedBatch, SeriesKey, SessionId};

use super::StoreError;
use super::rollup::Rollups;

/// Returns the id of `key` on `device`, creating the series if new.
pub async fn upsert_series(
    conn: &mut AnyConnection,
    device: &str,
    key: &SeriesKey,
) -> Result<i64, StoreError> {
    let text = key.to_string();
    // Never store a series without its labels: an encoding failure fails
    // the transaction (the device resends) instead of writing `{}`.
    let labels = serde_json::to_string(&key.labels)
        .map_err(|e| StoreError::Sql(sqlx::Error::Encode(Box::new(e))))?;
    let row = sqlx::query(
        "INSERT INTO series (device, key, name, labels) VALUES ($1, $2, $3, $4)
         ON CONFLICT (device, key) DO UPDATE SET name = excluded.name
         RETURNING id",
    )
    .bind(device)
    .bind(&text)
    .bind(&key.name)
    .bind(labels)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.get(0))
}

/// Rows per multi-row series statement.
const SERIES_PER_STATEMENT: usize = 200;

/// [`upsert_series`] for many keys (each `(device, key)` named once):
/// their ids by `(device, canonical key)`.
pub async fn upsert_series_many(
    conn: &mut AnyConnection,
    keys: &[(&str, &SeriesKey)],
) -> Result<std::collections::HashMap<(String, String), i64>, StoreError> {
    let backend = super::Backend::of(conn);
    let mut ids = std::collections::HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(SERIES_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 4);
        // Only placeholders are formatted in.
        let sql = format!(
            "INSERT INTO series (device, key, name, labels) VALUES {}
             ON CONFLICT (device, key) DO UPDATE SET name = excluded.name
             RETURNING device, key, id",
            values
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, key) in chunk {
            // As in upsert_series: never a series without its labels.
            let labels = serde_json::to_string(&key.labels)
                .map_err(|e| StoreError::Sql(sqlx::Error::Encode(Box::new(e))))?;
            q = q
                .bind(*device)
                .bind(key.to_string())
                .bind(key.name.clone())
                .bind(labels);
        }
        for r in q.fetch_all(&mut *conn).await? {
            ids.insert((r.get::<String, _>(0), r.get::<String, _>(1)), r.get(2));
        }
    }
    Ok(ids)
}

/// The ids of those of `keys` (`(device, canonical key)`) that exist.
pub async fn find_series_many(
    conn: &mut AnyConnection,
    keys: &[(&str, &str)],
) -> Result<std::collections::HashMap<(String, String), i64>, StoreError> {
    let backend = super::Backend::of(conn);
    let mut ids = std::collections::HashMap::new();
    for chunk in keys.chunks(SERIES_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 2);
        // The key list drives the join: one unique-index search per key.
        let sql = format!(
            "SELECT s.device, s.key, s.id FROM (VALUES {}) AS k CROSS JOIN series AS s
              WHERE s.device = k.column1 AND s.key = k.column2",
            values
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, key) in chunk {
            q = q.bind(*device).bind(*key);
        }
        for r in q.fetch_all(&mut *conn).await? {
            ids.insert((r.get::<String, _>(0), r.get::<String, _>(1)), r.get(2));
        }
    }
    Ok(ids)
}

/// How many series each of `devices` has (devices with none are absent).
pub async fn count_series_many(
    conn: &mut AnyConnection,
    devices: &[&str],
) -> Result<std::collections::HashMap<String, usize>, StoreError> {
    let backend = super::Backend::of(conn);
    let mut counts = std::collections::HashMap::new();
    for chunk in devices.chunks(SERIES_PER_STATEMENT) {
        let sql = format!(
            "SELECT device, COUNT(*) FROM series WHERE device IN {} GROUP BY device",
            super::params(backend, 1, chunk.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for device in chunk {
            q = q.bind(*device);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let n: i64 = r.get(1);
            counts.insert(r.get::<String, _>(0), usize::try_from(n).unwrap_or(0));
        }
    }
    Ok(counts)
}

/// The series each of `bindings` (`(device, session, local id)`) is bound
/// to, for those that are bound.
pub async fn session_series_many(
    conn: &mut AnyConnection,
    bindings: &[(&str, &SessionId, u32)],
) -> Result<std::collections::HashMap<(String, SessionId, u32), i64>, StoreError> {
    let backend = super::Backend::of(conn);
    let mut found = std::collections::HashMap::new();
    for chunk in bindings.chunks(SERIES_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 3);
        let sql = format!(
            "SELECT t.device, t.session, t.local_id, t.series_id
               FROM (VALUES {}) AS k CROSS JOIN session_series AS t
              WHERE t.device = k.column1 AND t.session = k.column2 AND t.local_id = k.column3",
            values
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, session, local) in chunk {
            q = q.bind(*device).bind(&session.0[..]).bind(i64::from(*local));
        }
        for r in q.fetch_all(&mut *conn).await? {
            let session: &[u8] = r.get(1);
            let session =
                SessionId::from_slice(session).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let local = u32::try_from(r.get::<i64, _>(2))
                .map_err(|_| StoreError::Corrupt("a session-local series id exceeds u32".into()))?;
            found.insert((r.get::<String, _>(0), session, local), r.get(3));
        }
    }
    Ok(found)
}

/// [`bind_session_series`] for many bindings: `(device, session, local id,
/// series id)`.
pub async fn bind_session_series_many(
    conn: &mut AnyConnection,
    bindings: &[(String, SessionId, u32, i64)],
) -> Result<(), StoreError> {
    let backend = super::Backend::of(conn);
    for chunk in bindings.chunks(SERIES_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 4);
        let sql = format!(
            "INSERT INTO session_series (device, session, local_id, series_id) VALUES {}
             ON CONFLICT DO NOTHING",
            values
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, session, local, series) in chunk {
            q = q
                .bind(device.as_str())
                .bind(&session.0[..])
                .bind(i64::from(*local))
                .bind(*series);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A device's series by key, if it exists.
pub async fn find_series(
    conn: &mut AnyConnection,
    device: &str,
    key: &SeriesKey,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query("SELECT id FROM series WHERE device = $1 AND key = $2")
        .bind(device)
        .bind(key.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// How many series a device has.
pub async fn count_series(conn: &mut AnyConnection, device: &str) -> Result<usize, StoreError> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM series WHERE device = $1")
        .bind(device)
        .fetch_one(&mut *conn)
        .await?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The series a session-local id was bound to, if any.
pub async fn session_series(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query(
        "SELECT series_id FROM session_series WHERE device = $1 AND session = $2 AND local_id = $3",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(local_id as i64)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Binds a session-local id to a series.
pub async fn bind_session_series(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
    series_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO session_series (device, session, local_id, series_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(local_id as i64)
    .bind(series_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The highest commit id used so far (0 when none): the log's, or the
/// highest ever removed from it (compaction, retention), whichever is
/// higher, so commit ids never repeat once the log empties.
pub const MAX_COMMIT_SQL: &str = "SELECT MAX(m) FROM (
       SELECT MAX(commit_id) AS m FROM batches
       UNION ALL SELECT value AS m FROM store_meta WHERE key = 'commit_floor') t";

/// The highest commit id used so far (see [`MAX_COMMIT_SQL`]).
pub async fn max_commit_id(conn: &mut AnyConnection) -> Result<u64, StoreError> {
    let (max,): (Option<i64>,) = sqlx::query_as(MAX_COMMIT_SQL).fetch_one(&mut *conn).await?;
    Ok(max.unwrap_or(0).max(0) as u64)
}

/// The canonical key of a series id, if it exists.
pub async fn series_key(
    conn: &mut AnyConnection,
    series_id: i64,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT key FROM series WHERE id = $1")
        .bind(series_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// A batch the writer will insert at the end of its transaction
/// ([`insert_batches`]), owned.
pub struct NewBatch {
    pub commit_id: u64,
    pub device: String,
    pub session: SessionId,
    pub seq: u64,
    pub received_ms: i64,
    pub min_ts: i64,
    pub max_ts: i64,
    pub samples: i64,
    pub payload: Vec<u8>,
}

/// Rows per multi-row statement (9 values each).
const BATCH_ROWS_PER_STATEMENT: usize = 100;
/// Rows per multi-row upsert of devices or sessions (4 values each).
const UPSERT_ROWS_PER_STATEMENT: usize = 200;
/// Keys per lookup statement (3 values each).
const KEYS_PER_STATEMENT: usize = 300;

/// Which of `keys` are already stored: in the log, below their session's
/// `compacted` watermark, or among the kept keys of compacted batches
/// (`store/compact.rs`). Three statements per few hundred keys, so the
/// writer pays round trips per transaction, not per batch (PostgreSQL
/// fell behind at 2,000 small batches/s with several statements each).
/// Inside the writer's transaction, which excludes other writers, the
/// answer stays true until it commits.
pub async fn stored_keys(
    conn: &mut AnyConnection,
    keys: &[(String, SessionId, u64)],
) -> Result<std::collections::HashSet<(String, SessionId, u64)>, StoreError> {
    let backend = super::Backend::of(conn);
    let mut found = std::collections::HashSet::new();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let triples = super::rows(backend, chunk.len(), 3);
        for table in ["batches", "batch_keys"] {
            // The key list drives the join (SQLite's CROSS JOIN keeps it
            // the outer loop), so each key is one primary-key search.
            // `(…) IN (VALUES …)` was planned as a scan of the whole table
            // per statement, which grew with the uncompacted log.
            // Only a fixed table name and placeholders are formatted in.
            let sql = format!(
                "SELECT t.device, t.session, t.seq FROM (VALUES {}) AS k CROSS JOIN {table} AS t
                  WHERE t.device = k.column1 AND t.session = k.column2 AND t.seq = k.column3",
                triples
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (d, sess, seq) in chunk {
                q = q.bind(d.as_str()).bind(&sess.0[..]).bind(*seq as i64);
            }
            for r in q.fetch_all(&mut *conn).await? {
                let session: &[u8] = r.get(1);
                let session = SessionId::from_slice(session)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                found.insert((r.get::<String, _>(0), session, r.get::<i64, _>(2) as u64));
            }
        }
        let mut sessions: Vec<(&str, &SessionId)> = chunk
            .iter()
            .map(|(d, sess, _)| (d.as_str(), sess))
            .collect();
        sessions.sort_unstable();
        sessions.dedup();
        let pairs = super::rows(backend, sessions.len(), 2);
        let sql = format!(
            "SELECT s.device, s.session, s.compacted FROM (VALUES {}) AS k CROSS JOIN sessions AS s
              WHERE s.device = k.column1 AND s.session = k.column2 AND s.compacted > 0",
            pairs
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (d, sess) in &sessions {
            q = q.bind(*d).bind(&sess.0[..]);
        }
        let mut compacted = std::collections::HashMap::new();
        for r in q.fetch_all(&mut *conn).await? {
            let session: &[u8] = r.get(1);
            let session =
                SessionId::from_slice(session).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            compacted.insert((r.get::<String, _>(0), session), r.get::<i64, _>(2) as u64);
        }
        for (d, sess, seq) in chunk {
            if compacted.get(&(d.clone(), *sess)).is_some_and(|c| seq <= c) {
                found.insert((d.clone(), *sess, *seq));
            }
        }
    }
    Ok(found)
}

/// Inserts the writer's new batches with multi-row statements. Their keys
/// were checked by [`stored_keys`] under the write lock, so a conflict is
/// an error that fails the transaction (nothing is acknowledged), never a
/// silent skip.
pub async fn insert_batches(conn: &mut AnyConnection, rows: &[NewBatch]) -> Result<(), StoreError> {
    let backend = super::Backend::of(conn);
    for chunk in rows.chunks(BATCH_ROWS_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 9);
        let sql = format!(
            "INSERT INTO batches (device, session, seq, received_ms, min_ts, max_ts, samples, payload, commit_id)
             VALUES {}",
            values
        );
        // Only placeholders are formatted in.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in chunk {
            q = q
                .bind(b.device.as_str())
                .bind(&b.session.0[..])
                .bind(b.seq as i64)
                .bind(b.received_ms)
                .bind(b.min_ts)
                .bind(b.max_ts)
                .bind(b.samples)
                .bind(&b.payload[..])
                .bind(b.commit_id as i64);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Appends a batch whose series ids are database ids: numbers it with the
/// transaction's next commit id (`*next_commit`, read from the log on
/// first use and advanced) and, only when it is newly stored, adds its
/// samples to `rollups`. Returns its commit id, or `None` for a batch
/// already stored (nothing written). `import` appends through here, one
/// batch at a time; the ingest writer follows the same rule for a whole
/// transaction ([`stored_keys`] once, [`insert_batches`] at the end), and
/// both recognise stored batches through [`stored_keys`] alone.
pub async fn append_batch(
    conn: &mut AnyConnection,
    device: &str,
    batch: &DecodedBatch,
    received_ms: i64,
    next_commit: &mut Option<u64>,
    rollups: &mut Rollups,
) -> Result<Option<u64>, StoreError> {
    let key = (device.to_string(), batch.session, batch.seq);
    if !stored_keys(conn, std::slice::from_ref(&key))
        .await?
        .is_empty()
    {
        return Ok(None);
    }
    let (min_ts, max_ts) = batch.ts_range().unwrap_or((received_ms, received_ms));
    let commit_id = match *next_commit {
        Some(c) => c,
        None => max_commit_id(conn).await? + 1,
    };
    insert_batches(
        conn,
        &[NewBatch {
            commit_id,
            device: device.to_string(),
            session: batch.session,
            seq: batch.seq,
            received_ms,
            min_ts,
            max_ts,
            samples: batch.sample_count() as i64,
            payload: batch.encode(),
        }],
    )
    .await?;
    *next_commit = Some(commit_id + 1);
    for run in &batch.runs {
        let id = i64::from(run.series_id);
        for (ts, v) in run.ts_ms.iter().zip(&run.values) {
            rollups.add(id, *ts, *v);
        }
    }
    Ok(Some(commit_id))
}

/// The stored ack watermark of a session, if the session is known.
pub async fn session_through(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
) -> Result<Option<u64>, StoreError> {
    let row = sqlx::query("SELECT through FROM sessions WHERE device = $1 AND session = $2")
        .bind(device)
        .bind(&session.0[..])
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get::<i64, _>(0) as u64))
}

/// Stored seqs of a session above `through`, ascending.
pub async fn seqs_above(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    through: u64,
) -> Result<Vec<u64>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq FROM batches WHERE device = $1 AND session = $2 AND seq > $3 ORDER BY seq",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(through as i64)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(|r| r.get::<i64, _>(0) as u64).collect())
}

/// Records a session's ack watermark.
pub async fn set_session_through(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    through: u64,
    now_ms: i64,
) -> Result<(), StoreError> {
    set_sessions_through(conn, &[(device, session, through)], now_ms).await
}

/// [`set_session_through`] for many sessions (each named once), a few
/// hundred per statement.
pub async fn set_sessions_through(
    conn: &mut AnyConnection,
    sessions: &[(&str, &SessionId, u64)],
    now_ms: i64,
) -> Result<(), StoreError> {
    let backend = super::Backend::of(conn);
    for chunk in sessions.chunks(UPSERT_ROWS_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 4);
        // Only placeholders are formatted in.
        let sql = format!(
            "INSERT INTO sessions (device, session, through, started_ms) VALUES {}
             ON CONFLICT (device, session) DO UPDATE SET through =
               CASE WHEN excluded.through > sessions.through THEN excluded.through ELSE sessions.through END",
            values
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, session, through) in chunk {
            q = q
                .bind(*device)
                .bind(&session.0[..])
                .bind(*through as i64)
                .bind(now_ms);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Records a gap report, counting only batches of its range that were
/// never stored (a batch may reach the server and then be dropped from the
/// device's spool before its ack arrived). Returns the samples really lost,
/// or `None` if the report was already recorded or nothing was lost.
pub async fn insert_gap(
    conn: &mut AnyConnection,
    device: &str,
    gap: &widgetry_proto::Gap,
    now_ms: i64,
) -> Result<Option<i64>, StoreError> {
    let (stored_batches, stored_samples): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(samples), 0) AS BIGINT) FROM batches
         WHERE device = $1 AND session = $2 AND seq BETWEEN $3 AND $4",
    )
    .bind(device)
    .bind(&gap.session.0[..])
    .bind(gap.from_seq as i64)
    .bind(gap.to_seq as i64)
    .fetch_one(&mut *conn)
    .await?;
    let batches = (gap.to_seq - gap.from_seq + 1) as i64 - stored_batches;
    let samples = (gap.samples.min(i64::MAX as u64) as i64 - stored_samples).max(0);
    if batches <= 0 {
        return Ok(None);
    }
    let res = sqlx::query(
        "INSERT INTO gaps (device, session, from_seq, to_seq, batches, samples, from_ts, to_ts, reported_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )
    .bind(device)
    .bind(&gap.session.0[..])
    .bind(gap.from_seq as i64)
    .bind(gap.to_seq as i64)
    .bind(batches)
    .bind(samples)
    .bind(gap.from_ts_ms)
    .bind(gap.to_ts_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok((res.rows_affected() == 1).then_some(samples))
}

/// Stores one event; returns false if it was already stored.
pub async fn insert_event(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    seq: u64,
    idx: usize,
    event: &widgetry_proto::json::Event,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT INTO events (device, session, seq, idx, ts, name, body) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT DO NOTHING",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(seq as i64)
    .bind(idx as i64)
    .bind(event.ts_ms)
    .bind(&event.name)
    .bind(serde_json::Value::Object(event.body.clone()).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Marks a device as seen at `now_ms`, adding `rejects` to its count, and
/// learns its cadence (`interval_ms`, see [`crate::presence`]) from the time
/// since it was last seen: arrivals closer than
/// [`crate::presence::MIN_LEARNED_GAP_MS`] (a replayed backlog, several
/// batches in one commit) teach nothing, nor do gaps under a quarter of the
/// estimate (a resend, a burst); a longer gap moves the estimate halfway
/// towards it, counted as at most 4 intervals (one outage does not make a
/// fast device look slow), a shorter one by 1/8. So the estimate errs on
/// the slow side: a device looks stale late rather than falsely (seen with
/// 10,000 devices at 0.1 Hz, whose first gap was a 1 s resend).
pub async fn touch_device(
    conn: &mut AnyConnection,
    device: &str,
    now_ms: i64,
    rejects: i64,
) -> Result<(), StoreError> {
    touch_devices(conn, &[(device, now_ms, rejects)]).await
}

/// [`touch_device`] for many devices (each named once): `(device, seen at,
/// rejects)`, a few hundred per statement.
pub async fn touch_devices(
    conn: &mut AnyConnection,
    devices: &[(&str, i64, i64)],
) -> Result<(), StoreError> {
    let backend = super::Backend::of(conn);
    for chunk in devices.chunks(UPSERT_ROWS_PER_STATEMENT) {
        let values = super::rows(backend, chunk.len(), 4);
        // Only placeholders and an integer constant are formatted in (a
        // `$N` among `?` placeholders is left unbound on SQLite).
        let sql = format!(
            "INSERT INTO devices (device, first_seen_ms, last_seen_ms, rejects) VALUES {values}
             ON CONFLICT (device) DO UPDATE SET
               interval_ms = CASE
                 WHEN excluded.last_seen_ms - devices.last_seen_ms < {gap} THEN devices.interval_ms
                 WHEN devices.interval_ms IS NULL THEN excluded.last_seen_ms - devices.last_seen_ms
                 WHEN 4 * (excluded.last_seen_ms - devices.last_seen_ms) < devices.interval_ms
                   THEN devices.interval_ms
                 WHEN excluded.last_seen_ms - devices.last_seen_ms < devices.interval_ms
                   THEN (devices.interval_ms * 7 + (excluded.last_seen_ms - devices.last_seen_ms)) / 8
                 WHEN excluded.last_seen_ms - devices.last_seen_ms > 4 * devices.interval_ms
                   THEN (devices.interval_ms * 5) / 2
                 ELSE (devices.interval_ms + (excluded.last_seen_ms - devices.last_seen_ms)) / 2 END,
               last_seen_ms = CASE WHEN excluded.last_seen_ms > devices.last_seen_ms
                              THEN excluded.last_seen_ms ELSE devices.last_seen_ms END,
               rejects = devices.rejects + excluded.rejects",
            values = values,
            gap = crate::presence::MIN_LEARNED_GAP_MS,
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (device, at, rejects) in chunk {
            q = q.bind(*device).bind(*at).bind(*at).bind(*rejects);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Records a device's presence from its status message.
pub async fn set_status(
    conn: &mut AnyConnection,
    device: &str,
    status: &Status,
    now_ms: i64,
) -> Result<(), StoreError> {
    touch_device(conn, device, now_ms, 0).await?;
    sqlx::query(
        "UPDATE devices SET state = $1, session = COALESCE($2, session), agent = COALESCE($3, agent),
           host = COALESCE($4, host), status_ms = $5 WHERE device = $6",
    )
    .bind(status.state.as_str())
    .bind(status.session.map(|s| s.to_string()))
    .bind(status.agent.as_deref())
    .bind(status.host.as_deref())
    .bind(now_ms)
    .bind(device)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, session: SessionId, seq: u64, commit_id: u64) -> NewBatch {
        NewBatch {
            commit_id,
            device: device.into(),
            session,
            seq,
            received_ms: 1,
            min_ts: 1,
            max_ts: 1,
            samples: 1,
            payload: vec![1, 2, 3],
        }
    }

    #[tokio::test]
    async fn stored_keys_finds_logged_and_compacted_batches() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            super::super::Store::open(&crate::config::Database::Sqlite(dir.path().join("w.db")))
                .await
                .expect("open");
        let (a, b) = (SessionId([1; 16]), SessionId([2; 16]));
        let mut tx = store.begin().await.expect("begin");
        // A content-named seq above i64::MAX is stored as a negative integer.
        let big = u64::MAX - 7;
        insert_batches(&mut tx, &[row("d", a, 1, 1), row("d", a, big, 2)])
            .await
            .expect("insert");
        set_session_through(&mut tx, "d", &b, 9, 1)
            .await
            .expect("through");
        sqlx::query("UPDATE sessions SET compacted = 9")
            .execute(&mut *tx)
            .await
            .expect("compacted");
        let keys = vec![
            ("d".to_string(), a, 1),
            ("d".to_string(), a, big),
            ("d".to_string(), a, 2),
            ("d".to_string(), b, 9),
            ("d".to_string(), b, 10),
            ("e".to_string(), a, 1),
        ];
        let found = stored_keys(&mut tx, &keys).await.expect("lookup");
        let mut found: Vec<_> = found.into_iter().collect();
        found.sort_by_key(|k| (k.0.clone(), k.1.0, k.2));
        assert_eq!(
            found,
            vec![
                ("d".to_string(), a, 1),
                ("d".to_string(), a, big),
                ("d".to_string(), b, 9)
            ]
        );
        tx.commit().await.expect("commit");
    }
}
