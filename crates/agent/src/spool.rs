//! The agent's bounded on-disk spool: every batch is appended here before
//! it is published and forgotten only when the server acknowledges it.
//!
//! Layout: a directory of segment files `seg-<id>.log`, each a sequence of
//! records `[len u32][crc32 u32][body]` (little-endian). A body is either a
//! batch (`1`, session, seq, samples, min/max ts, encoded `Batch`) or an
//! acknowledgement (`2`, session, seq). A segment is deleted once every
//! batch in it is acknowledged. On open, a record that is short or fails
//! its checksum (a torn write from a crash or power cut) ends its segment:
//! the file is truncated there and everything before it is kept.
//!
//! When the spool would exceed its size, the oldest segment is deleted and
//! its unacknowledged batches become [`Gap`]s: never dropped silently.
//! Only batch metadata stays in memory; payloads are read back from disk.
//!
//! The bookkeeping happens here, on the event loop, and is immediate; the
//! file work (writes, fsyncs, reads for sending, deletes) is queued to the
//! disk thread of [`crate::disk`], which also defines what is durable when.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use widgetry_proto::SessionId;

use crate::disk::{Cmd, Disk, DiskEvent, Kind, MAX_QUEUED_BYTES};

const KIND_BATCH: u8 = 1;
const KIND_ACK: u8 = 2;
const HEADER: usize = 8;
/// Largest record accepted when reading back (a batch is at most 1 MiB).
const MAX_RECORD: usize = 2 << 20;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "spool {path}: the disk has not kept up: {queued} bytes still wait to be written; the batch is dropped (reported as a gap)"
    )]
    Backlog { path: String, queued: u64 },
    #[error("spool {path}: the disk thread has stopped")]
    DiskGone { path: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Batches lost because the spool was full (the wire type of gap reports).
pub use widgetry_proto::Gap;

/// One spooled, unacknowledged batch.
#[derive(Debug, Clone)]
pub struct Entry {
    pub session: SessionId,
    pub seq: u64,
    pub samples: u32,
    pub min_ts: i64,
    pub max_ts: i64,
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    /// Payload bytes.
    pub len: u32,
}

impl Entry {
    /// This batch reported as lost.
    pub fn as_gap(&self) -> Gap {
        Gap {
            session: self.session,
            from_seq: self.seq,
            to_seq: self.seq,
            samples: u64::from(self.samples),
            from_ts_ms: self.min_ts,
            to_ts_ms: self.max_ts,
        }
    }
}

struct Segment {
    path: PathBuf,
    size: u64,
    /// Unacknowledged batches stored in this segment.
    live: usize,
}

/// What opening the spool found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacknowledged batches found on disk (to be sent again).
    pub batches: usize,
    /// Bytes discarded from torn record tails.
    pub torn_bytes: u64,
}

/// The spool; see the module docs.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: BTreeMap<u64, Segment>,
    active_id: u64,
    /// Unacknowledged batches in spool order (and acknowledged ones not
    /// yet dropped from it: `entries` is the truth).
    order: VecDeque<(SessionId, u64)>,
    entries: HashMap<(SessionId, u64), Entry>,
    total: u64,
    disk: Disk,
}

/// CRC-32 (IEEE), bitwise: records are small and written once a second.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:020}.log"))
}

fn encode_record(body: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(HEADER + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32(body).to_le_bytes());
    rec.extend_from_slice(body);
    rec
}

enum Record {
    Batch {
        session: SessionId,
        seq: u64,
        samples: u32,
        min_ts: i64,
        max_ts: i64,
        /// Offset of the payload within the segment, and its length.
        payload: (u64, u32),
    },
    Ack {
        session: SessionId,
        seq: u64,
    },
}

fn parse_body(body: &[u8], body_offset: u64) -> Option<Record> {
    let (&kind, rest) = body.split_first()?;
    let session = SessionId(rest.get(..16)?.try_into().ok()?);
    let seq = u64::from_le_bytes(rest.get(16..24)?.try_into().ok()?);
    match kind {
        KIND_ACK if rest.len() == 24 => Some(Record::Ack { session, seq }),
        KIND_BATCH => {
            let samples = u32::from_le_bytes(rest.get(24..28)?.try_into().ok()?);
            let min_ts = i64::from_le_bytes(rest.get(28..36)?.try_into().ok()?);
            let max_ts = i64::from_le_bytes(rest.get(36..44)?.try_into().ok()?);
            let payload_len = rest.len().checked_sub(44)? as u32;
            Some(Record::Batch {
                session,
                seq,
                samples,
                min_ts,
                max_ts,
                payload: (body_offset + 1 + 44, payload_len),
            })
        }
        _ => None,
    }
}

/// Parses a segment; returns its records and the length of its valid prefix.
fn parse_segment(data: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos + HEADER <= data.len() {
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let start = pos + HEADER;
        if len > MAX_RECORD || start + len > data.len() {
            break;
        }
        let body = &data[start..start + len];
        if crc32(body) != crc {
            break;
        }
        match parse_body(body, start as u64) {
            Some(r) => records.push(r),
            None => break,
        }
        pos = start + len;
    }
    (records, pos)
}

impl Spool {
    /// Opens (creating) the spool in `dir`, holding at most `max_bytes`
    /// in segments of about `segment_bytes`.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Spool, Recovery), SpoolError> {
        Spool::open_with(dir, max_bytes, segment_bytes, Duration::ZERO)
    }

    /// [`Spool::open`], with `test_sync_delay` added to every fsync (a
    /// test hook standing for a slow disk).
    pub fn open_with(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        test_sync_delay: Duration,
    ) -> Result<(Spool, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut ids: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut order = VecDeque::new();
        let mut entries = HashMap::new();
        let mut acks = Vec::new();
        for id in &ids {
            let path = segment_path(dir, *id);
            let data = fs::read(&path).map_err(io_err(&path))?;
            let (records, valid) = parse_segment(&data);
            if valid < data.len() {
                recovery.torn_bytes += (data.len() - valid) as u64;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(valid as u64).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            for r in records {
                match r {
                    Record::Batch {
                        session,
                        seq,
                        samples,
                        min_ts,
                        max_ts,
                        payload,
                    } => {
                        if entries.contains_key(&(session, seq)) {
                            continue;
                        }
                        order.push_back((session, seq));
                        entries.insert(
                            (session, seq),
                            Entry {
                                session,
                                seq,
                                samples,
                                min_ts,
                                max_ts,
                                segment: *id,
                                offset: payload.0,
                                len: payload.1,
                            },
                        );
                    }
                    Record::Ack { session, seq } => acks.push((session, seq)),
                }
            }
            segments.insert(
                *id,
                Segment {
                    path,
                    size: valid as u64,
                    live: 0,
                },
            );
        }
        for key in acks {
            entries.remove(&key);
        }
        order.retain(|k| entries.contains_key(k));
        for e in entries.values() {
            if let Some(s) = segments.get_mut(&e.segment) {
                s.live += 1;
            }
        }
        recovery.batches = order.len();
        // Always append to a fresh segment (created by its first write):
        // old ones are never written again.
        let active_id = ids.last().map_or(0, |i| i + 1);
        let active_path = segment_path(dir, active_id);
        let disk = Disk::start(dir, test_sync_delay).map_err(io_err(dir))?;
        segments.insert(
            active_id,
            Segment {
                path: active_path,
                size: 0,
                live: 0,
            },
        );
        let total = segments.values().map(|s| s.size).sum();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            segments,
            active_id,
            order,
            entries,
            total,
            disk,
        };
        spool.remove_dead_segments()?;
        Ok((spool, recovery))
    }

    /// Appends a batch durably (fsync). Returns the gaps created by dropping
    /// the oldest segments to make room.
    pub fn append(
        &mut self,
        session: SessionId,
        seq: u64,
        samples: u32,
        ts_range: (i64, i64),
        payload: &[u8],
    ) -> Result<Vec<Gap>, SpoolError> {
        let mut body = Vec::with_capacity(45 + payload.len());
        body.push(KIND_BATCH);
        body.extend_from_slice(&session.0);
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&samples.to_le_bytes());
        body.extend_from_slice(&ts_range.0.to_le_bytes());
        body.extend_from_slice(&ts_range.1.to_le_bytes());
        body.extend_from_slice(payload);
        let rec = encode_record(&body);
        let queued = self.disk.queued_bytes();
        if queued > MAX_QUEUED_BYTES {
            return Err(SpoolError::Backlog {
                path: self.dir.display().to_string(),
                queued,
            });
        }
        if self.active_size() > 0 && self.active_size() + rec.len() as u64 > self.segment_bytes {
            self.roll()?;
        }
        let gaps = self.make_room(rec.len() as u64)?;
        let offset = self.active_size() + HEADER as u64 + 1 + 44;
        self.write_active(rec, Kind::Batch((session, seq)))?;
        self.order.push_back((session, seq));
        self.entries.insert(
            (session, seq),
            Entry {
                session,
                seq,
                samples,
                min_ts: ts_range.0,
                max_ts: ts_range.1,
                segment: self.active_id,
                offset,
                len: payload.len() as u32,
            },
        );
        if let Some(s) = self.segments.get_mut(&self.active_id) {
            s.live += 1;
        }
        Ok(gaps)
    }

    /// Records that the server committed `(session, seq)`; returns false if
    /// the batch was not (or no longer) spooled.
    pub fn ack(&mut self, session: SessionId, seq: u64) -> Result<bool, SpoolError> {
        let Some(entry) = self.entries.remove(&(session, seq)) else {
            return Ok(false);
        };
        self.compact_order();
        let mut body = Vec::with_capacity(25);
        body.push(KIND_ACK);
        body.extend_from_slice(&session.0);
        body.extend_from_slice(&seq.to_le_bytes());
        // An ack record lost in a crash only causes a resend, which the
        // server deduplicates: no fsync needed.
        self.write_active(encode_record(&body), Kind::Ack((session, seq)))?;
        if let Some(s) = self.segments.get_mut(&entry.segment) {
            s.live = s.live.saturating_sub(1);
        }
        self.remove_dead_segments()?;
        Ok(true)
    }

    /// Asks the disk thread for a batch's payload; it arrives as a
    /// [`DiskEvent::Read`].
    pub fn request_read(&self, entry: &Entry) -> Result<(), SpoolError> {
        let sent = self.disk.send(Cmd::Read {
            segment: entry.segment,
            offset: entry.offset,
            len: entry.len,
            key: (entry.session, entry.seq),
        });
        sent.then_some(()).ok_or_else(|| self.gone())
    }

    fn gone(&self) -> SpoolError {
        SpoolError::DiskGone {
            path: self.dir.display().to_string(),
        }
    }

    /// The disk thread's reports (taken once, by the event loop).
    pub fn take_events(&mut self) -> Option<UnboundedReceiver<DiskEvent>> {
        self.disk.take_events()
    }

    /// Blocks until every write so far is on disk and fsynced.
    pub fn flush(&self) {
        self.disk.flush();
    }

    /// [`Spool::flush`] without blocking the caller's thread.
    pub async fn flushed(&self) {
        self.disk.flushed().await;
    }

    /// Fsyncs done by the disk thread, and the time they took.
    pub fn syncs(&self) -> (u64, Duration) {
        self.disk.syncs()
    }

    /// A write or fsync of `segment` failed: forgets `batches` (they are
    /// not durable: the caller reports them as gaps) and moves to a new
    /// segment. Returns the entries forgotten.
    pub fn on_failed(
        &mut self,
        segment: u64,
        batches: &[(SessionId, u64)],
    ) -> Result<Vec<Entry>, SpoolError> {
        let mut lost = Vec::new();
        for key in batches {
            if let Some(e) = self.entries.remove(key) {
                if let Some(s) = self.segments.get_mut(&e.segment) {
                    s.live = s.live.saturating_sub(1);
                }
                lost.push(e);
            }
        }
        if !lost.is_empty() {
            self.order.retain(|k| self.entries.contains_key(k));
        }
        if segment == self.active_id {
            self.roll()?;
        } else {
            self.remove_dead_segments()?;
        }
        Ok(lost)
    }

    /// Reads back a spooled batch's payload, blocking: for tests and for
    /// the rare read of an earlier run's series table.
    pub fn read(&self, entry: &Entry) -> Result<Vec<u8>, SpoolError> {
        let seg = self
            .segments
            .get(&entry.segment)
            .map(|s| s.path.clone())
            .unwrap_or_else(|| segment_path(&self.dir, entry.segment));
        let f = File::open(&seg).map_err(io_err(&seg))?;
        let mut buf = vec![0u8; entry.len as usize];
        f.read_exact_at(&mut buf, entry.offset)
            .map_err(io_err(&seg))?;
        Ok(buf)
    }

    /// Unacknowledged batches in the order they were spooled.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.order.iter().filter_map(|k| self.entries.get(k))
    }

    /// The entry of `(session, seq)`, if spooled.
    pub fn get(&self, session: SessionId, seq: u64) -> Option<&Entry> {
        self.entries.get(&(session, seq))
    }

    /// Number of unacknowledged batches.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is waiting for acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// `order` keeps acknowledged keys until they reach its front (an ack
    /// is O(1), not a scan of everything spooled; a reconnect after a long
    /// outage acknowledges thousands of batches); it is rebuilt when more
    /// than half of it is stale.
    fn compact_order(&mut self) {
        while let Some(k) = self.order.front() {
            if self.entries.contains_key(k) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.entries.len() + 64 {
            self.order.retain(|k| self.entries.contains_key(k));
        }
    }

    fn active_size(&self) -> u64 {
        self.segments.get(&self.active_id).map_or(0, |s| s.size)
    }

    fn write_active(&mut self, rec: Vec<u8>, kind: Kind) -> Result<(), SpoolError> {
        let len = rec.len() as u64;
        let sent = self.disk.send(Cmd::Write {
            segment: self.active_id,
            rec,
            kind,
        });
        if !sent {
            return Err(self.gone());
        }
        if let Some(s) = self.segments.get_mut(&self.active_id) {
            s.size += len;
        }
        self.total += len;
        Ok(())
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        self.active_id += 1;
        let path = segment_path(&self.dir, self.active_id);
        self.segments.insert(
            self.active_id,
            Segment {
                path,
                size: 0,
                live: 0,
            },
        );
        self.remove_dead_segments()
    }

    /// Drops the oldest segments until `extra` more bytes fit.
    fn make_room(&mut self, extra: u64) -> Result<Vec<Gap>, SpoolError> {
        let mut gaps: Vec<Gap> = Vec::new();
        while self.total + extra > self.max_bytes {
            let Some((&oldest, _)) = self.segments.iter().next() else {
                break;
            };
            if oldest == self.active_id {
                if self.active_size() == 0 {
                    break;
                }
                self.roll()?;
                continue;
            }
            let dropped: Vec<Entry> = self
                .order
                .iter()
                .filter_map(|k| self.entries.get(k))
                .filter(|e| e.segment == oldest)
                .cloned()
                .collect();
            for e in &dropped {
                self.entries.remove(&(e.session, e.seq));
                match gaps.last_mut() {
                    Some(g) if g.session == e.session && g.to_seq + 1 == e.seq => {
                        g.to_seq = e.seq;
                        g.samples += u64::from(e.samples);
                        g.from_ts_ms = g.from_ts_ms.min(e.min_ts);
                        g.to_ts_ms = g.to_ts_ms.max(e.max_ts);
                    }
                    _ => gaps.push(e.as_gap()),
                }
            }
            self.order.retain(|k| self.entries.contains_key(k));
            if let Some(seg) = self.segments.remove(&oldest) {
                self.total -= seg.size;
                self.remove_file(oldest)?;
            }
        }
        Ok(gaps)
    }

    fn remove_dead_segments(&mut self) -> Result<(), SpoolError> {
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| **id != self.active_id && s.live == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            if let Some(seg) = self.segments.remove(&id) {
                self.total -= seg.size;
                self.remove_file(id)?;
            }
        }
        Ok(())
    }

    fn remove_file(&self, segment: u64) -> Result<(), SpoolError> {
        if self.disk.send(Cmd::Remove(segment)) {
            Ok(())
        } else {
            Err(self.gone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SessionId = SessionId([3; 16]);

    fn payload(seq: u64) -> Vec<u8> {
        format!("batch-{seq}-{}", "x".repeat(100)).into_bytes()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn survives_reopen_and_forgets_acked_batches() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, rec) = Spool::open(dir.path(), 1 << 20, 4096).expect("open");
        assert_eq!(rec, Recovery::default());
        for seq in 1..=50 {
            assert!(
                s.append(S, seq, 3, (seq as i64, seq as i64), &payload(seq))
                    .expect("append")
                    .is_empty()
            );
        }
        for seq in 1..=20 {
            assert!(s.ack(S, seq).expect("ack"));
        }
        assert!(!s.ack(S, 20).expect("ack twice"), "already acknowledged");
        drop(s);
        let (s, rec) = Spool::open(dir.path(), 1 << 20, 4096).expect("reopen");
        assert_eq!(rec.batches, 30);
        let seqs: Vec<u64> = s.pending().map(|e| e.seq).collect();
        assert_eq!(seqs, (21..=50).collect::<Vec<_>>(), "order is kept");
        for e in s.pending() {
            assert_eq!(s.read(e).expect("read"), payload(e.seq));
        }
        // Fully acknowledged segments were deleted.
        let files = fs::read_dir(dir.path()).expect("ls").count();
        assert!(files < 10, "{files} segment files left");
    }

    #[test]
    fn torn_tail_is_discarded_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        for seq in 1..=5 {
            s.append(S, seq, 1, (0, 0), &payload(seq)).expect("append");
        }
        drop(s);
        let seg = segment_path(dir.path(), 0);
        let full = fs::metadata(&seg).expect("meta").len();
        // A power cut in the middle of the last record.
        let f = OpenOptions::new().write(true).open(&seg).expect("open seg");
        f.set_len(full - 20).expect("truncate");
        drop(f);
        let (s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(rec.batches, 4);
        assert!(rec.torn_bytes > 0);
        assert_eq!(
            s.pending().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // A corrupted byte inside a record: the record and what follows go.
        drop(s);
        let mut data = fs::read(&seg).expect("read");
        let idx = data.len() / 2;
        data[idx] ^= 0xff;
        fs::write(&seg, &data).expect("write");
        let (s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert!(rec.batches < 4 && rec.torn_bytes > 0, "{rec:?}");
        for e in s.pending() {
            assert_eq!(
                s.read(e).expect("read"),
                payload(e.seq),
                "kept records are intact"
            );
        }
    }

    #[test]
    fn a_slow_fsync_does_not_hold_up_appends_or_acks() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, _) =
            Spool::open_with(dir.path(), 1 << 20, 1 << 20, Duration::from_secs(2)).expect("open");
        let started = std::time::Instant::now();
        for seq in 1..=5 {
            s.append(S, seq, 1, (0, 0), &payload(seq)).expect("append");
            std::thread::sleep(crate::disk::SYNC_AFTER);
        }
        assert!(s.ack(S, 1).expect("ack"));
        assert!(
            started.elapsed() < 5 * crate::disk::SYNC_AFTER + Duration::from_secs(1),
            "appends waited for the disk: {:?}",
            started.elapsed()
        );
        drop(s);
        let (s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(rec.batches, 4, "closing the spool wrote and synced all");
        assert_eq!(
            s.pending().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
    }

    #[test]
    fn acks_in_any_order_keep_the_rest_in_spool_order() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, _) = Spool::open(dir.path(), 64 << 20, 1 << 20).expect("open");
        let n = 5_000u64;
        for seq in 1..=n {
            s.append(S, seq, 1, (0, 0), b"x").expect("append");
        }
        // Every odd seq, newest first, then a stretch from the front.
        for seq in (1..=n).rev().filter(|q| q % 2 == 1) {
            assert!(s.ack(S, seq).expect("ack"));
        }
        for seq in (2..=1000).step_by(2) {
            assert!(s.ack(S, seq).expect("ack"));
        }
        let left: Vec<u64> = s.pending().map(|e| e.seq).collect();
        assert_eq!(left, (1002..=n).step_by(2).collect::<Vec<_>>());
        assert_eq!(s.len(), left.len());
        drop(s);
        let (s, rec) = Spool::open(dir.path(), 64 << 20, 1 << 20).expect("reopen");
        assert_eq!(rec.batches, left.len());
        assert_eq!(s.pending().map(|e| e.seq).collect::<Vec<_>>(), left);
    }

    #[test]
    fn a_batch_acknowledged_before_its_fsync_is_not_fsynced() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        s.append(S, 1, 1, (0, 0), &payload(1)).expect("append");
        s.ack(S, 1).expect("ack");
        s.flush();
        assert_eq!(s.syncs().0, 0, "the server holds it: no fsync");
        s.append(S, 2, 1, (0, 0), &payload(2)).expect("append");
        s.flush();
        assert_eq!(s.syncs().0, 1, "an unacknowledged batch is fsynced");
        let e = s.get(S, 2).cloned().expect("spooled");
        assert_eq!(s.read(&e).expect("read"), payload(2));
    }

    #[test]
    fn full_spool_drops_oldest_segment_as_a_gap() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut s, _) = Spool::open(dir.path(), 2000, 600).expect("open");
        let mut gaps = Vec::new();
        for seq in 1..=40 {
            gaps.extend(
                s.append(
                    S,
                    seq,
                    2,
                    (1000 + seq as i64, 1000 + seq as i64),
                    &payload(seq),
                )
                .expect("append"),
            );
            assert!(s.bytes() <= 2000, "spool exceeded its bound: {}", s.bytes());
        }
        assert!(!gaps.is_empty());
        let lost: u64 = gaps.iter().map(|g| g.to_seq - g.from_seq + 1).sum();
        assert_eq!(
            lost as usize + s.len(),
            40,
            "every batch is kept or reported"
        );
        assert_eq!(gaps[0].from_seq, 1, "oldest first");
        assert_eq!(gaps[0].from_ts_ms, 1001);
        let samples: u64 = gaps.iter().map(|g| g.samples).sum();
        assert_eq!(samples, lost * 2);
        let first_kept = s.pending().next().map(|e| e.seq).expect("some kept");
        assert_eq!(gaps.last().map(|g| g.to_seq + 1), Some(first_kept));
    }
}
