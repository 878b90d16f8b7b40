//! The spool's disk thread: every write, fsync, read and delete of a spool
//! segment happens here, so a slow disk (an fsync of seconds on flash is
//! normal) never stalls the agent's event loop: keep-alives, ack
//! handling, statsd and the local protocol go on while the disk works.
//!
//! Commands run in the order they were sent (a read sees every write sent
//! before it). A batch record is fsynced [`SYNC_AFTER`] after it was
//! written unless its acknowledgement record arrives first: the server
//! then holds the batch durably, and the fsync would buy nothing. Batches
//! waiting for their fsync share one (group commit). What a power cut can
//! lose is therefore: batches sealed in the last `SYNC_AFTER` (plus the
//! fsync's own time) that the server had not acknowledged, the same
//! exposure as samples not yet sealed into a batch; never a batch the
//! server acknowledged.
//!
//! A failed write or fsync fails its segment: the batches written to it
//! since its last good fsync are reported back (and become gaps), later
//! writes to it are refused, and the spool moves on to a new segment.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use widgetry_proto::SessionId;

/// A spooled batch: (session, seq).
pub type Key = (SessionId, u64);

/// How long an unacknowledged batch record may wait for its fsync.
pub const SYNC_AFTER: Duration = Duration::from_millis(200);

/// Most bytes of records queued for the disk thread; beyond it a batch is
/// refused (and becomes a gap) instead of growing memory without bound.
pub const MAX_QUEUED_BYTES: u64 = 4 << 20;

/// What a write record is, for the fsync policy.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A batch: fsynced unless acknowledged within `SYNC_AFTER`.
    Batch(Key),
    /// The acknowledgement of a batch: never fsynced (losing it only
    /// makes the batch go out again, which the server deduplicates).
    Ack(Key),
}

pub enum Cmd {
    Write {
        segment: u64,
        rec: Vec<u8>,
        kind: Kind,
    },
    Remove(u64),
    Read {
        segment: u64,
        offset: u64,
        len: u32,
        key: Key,
    },
    /// Fsync everything written, then answer.
    Barrier(mpsc::Sender<()>),
}

/// What the disk thread reports back to the event loop.
#[derive(Debug)]
pub enum DiskEvent {
    /// The payload of a batch asked for with a read.
    Read {
        key: Key,
        result: Result<Vec<u8>, io::Error>,
    },
    /// A write or fsync of `segment` failed: `batches` are not durable.
    Failed {
        segment: u64,
        batches: Vec<Key>,
        error: String,
    },
    /// A segment could not be deleted (it is retried at the next start).
    Problem(String),
}

/// The event loop's side of the disk thread.
pub struct Disk {
    tx: Option<mpsc::Sender<Cmd>>,
    queued: Arc<AtomicU64>,
    events: Option<UnboundedReceiver<DiskEvent>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Syncs done, and the time they took in total (shared with the thread).
    stats: Arc<Stats>,
}

#[derive(Default)]
pub struct Stats {
    pub syncs: AtomicU64,
    pub sync_micros: AtomicU64,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:020}.log"))
}

impl Disk {
    /// Starts the disk thread for the segments in `dir`. `test_sync_delay`
    /// is added to every fsync (tests use it to stand for a slow disk).
    pub fn start(dir: &Path, test_sync_delay: Duration) -> io::Result<Disk> {
        let (tx, rx) = mpsc::channel();
        let (ev_tx, ev_rx) = unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Stats::default());
        let mut worker = Worker {
            dir: dir.to_path_buf(),
            files: HashMap::new(),
            failed: HashSet::new(),
            unsynced: HashMap::new(),
            deadline: None,
            dir_dirty: false,
            delay: test_sync_delay,
            events: ev_tx,
            queued: queued.clone(),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("spool-disk".into())
            .spawn(move || worker.run(rx))?;
        Ok(Disk {
            tx: Some(tx),
            queued,
            events: Some(ev_rx),
            thread: Some(thread),
            stats,
        })
    }

    /// Sends a command; false if the thread is gone (it only ends when
    /// the spool is dropped, or by a panic).
    pub fn send(&self, cmd: Cmd) -> bool {
        if let Cmd::Write { rec, .. } = &cmd {
            self.queued.fetch_add(rec.len() as u64, Ordering::Relaxed);
        }
        self.tx.as_ref().is_some_and(|tx| tx.send(cmd).is_ok())
    }

    /// Bytes of records sent but not yet written.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// The receiver of the thread's reports (taken once, by the event loop).
    pub fn take_events(&mut self) -> Option<UnboundedReceiver<DiskEvent>> {
        self.events.take()
    }

    /// Fsyncs done so far and their total time.
    pub fn syncs(&self) -> (u64, Duration) {
        (
            self.stats.syncs.load(Ordering::Relaxed),
            Duration::from_micros(self.stats.sync_micros.load(Ordering::Relaxed)),
        )
    }

    /// Blocks until everything sent so far is written and fsynced.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Cmd::Barrier(tx)) {
            let _ = rx.recv();
        }
    }

    /// [`Disk::flush`] for async callers: the wait runs on a blocking
    /// thread, so the caller's runtime goes on meanwhile.
    pub async fn flushed(&self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Cmd::Barrier(tx)) {
            let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
        }
    }
}

impl Drop for Disk {
    /// Writes and fsyncs what is queued before the agent exits.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    dir: PathBuf,
    files: HashMap<u64, File>,
    failed: HashSet<u64>,
    /// Batch records written but not fsynced, per segment.
    unsynced: HashMap<u64, Vec<Key>>,
    /// When the oldest unsynced batch must be fsynced.
    deadline: Option<Instant>,
    /// A segment file was created since the directory's last fsync.
    dir_dirty: bool,
    delay: Duration,
    events: UnboundedSender<DiskEvent>,
    queued: Arc<AtomicU64>,
    stats: Arc<Stats>,
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let cmd = match self.deadline {
                None => rx.recv().ok(),
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync_all();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            let Some(cmd) = cmd else {
                // The spool is closing: make what it wrote durable.
                self.sync_all();
                return;
            };
            self.handle(cmd);
            if self.deadline.is_some_and(|at| Instant::now() >= at) {
                self.sync_all();
            }
        }
    }

    fn report(&self, ev: DiskEvent) {
        let _ = self.events.send(ev);
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Write { segment, rec, kind } => {
                self.queued.fetch_sub(rec.len() as u64, Ordering::Relaxed);
                self.write(segment, &rec, kind);
            }
            Cmd::Remove(segment) => {
                self.files.remove(&segment);
                self.unsynced.remove(&segment);
                self.failed.remove(&segment);
                let path = segment_path(&self.dir, segment);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => self.report(DiskEvent::Problem(format!(
                        "spool {}: cannot delete: {e}",
                        path.display()
                    ))),
                }
                self.rearm();
            }
            Cmd::Read {
                segment,
                offset,
                len,
                key,
            } => {
                let result = self.read(segment, offset, len);
                self.report(DiskEvent::Read { key, result });
            }
            Cmd::Barrier(done) => {
                self.sync_all();
                let _ = done.send(());
            }
        }
    }

    fn write(&mut self, segment: u64, rec: &[u8], kind: Kind) {
        if self.failed.contains(&segment) {
            if let Kind::Batch(key) = kind {
                self.report(DiskEvent::Failed {
                    segment,
                    batches: vec![key],
                    error: "an earlier write to this segment failed".into(),
                });
            }
            return;
        }
        let path = segment_path(&self.dir, segment);
        let result = match self.files.entry(segment) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut().write_all(rec),
            std::collections::hash_map::Entry::Vacant(v) => {
                match OpenOptions::new().create(true).append(true).open(&path) {
                    Ok(f) => {
                        self.dir_dirty = true;
                        v.insert(f).write_all(rec)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match (result, kind) {
            (Ok(()), Kind::Batch(key)) => {
                self.unsynced.entry(segment).or_default().push(key);
                self.deadline
                    .get_or_insert_with(|| Instant::now() + SYNC_AFTER);
            }
            (Ok(()), Kind::Ack(key)) => {
                // The batch may sit in an older segment than its ack.
                for keys in self.unsynced.values_mut() {
                    keys.retain(|k| *k != key);
                }
                self.unsynced.retain(|_, keys| !keys.is_empty());
                self.rearm();
            }
            (Err(e), kind) => {
                let mut batches = self.unsynced.remove(&segment).unwrap_or_default();
                if let Kind::Batch(key) = kind {
                    batches.push(key);
                }
                self.fail(segment, batches, format!("{}: {e}", path.display()));
            }
        }
    }

    fn fail(&mut self, segment: u64, batches: Vec<Key>, error: String) {
        self.failed.insert(segment);
        self.files.remove(&segment);
        self.rearm();
        self.report(DiskEvent::Failed {
            segment,
            batches,
            error,
        });
    }

    /// No deadline when nothing waits for an fsync.
    fn rearm(&mut self) {
        if self.unsynced.is_empty() {
            self.deadline = None;
        }
    }

    fn read(&self, segment: u64, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        match self.files.get(&segment) {
            Some(f) => f.read_exact_at(&mut buf, offset)?,
            None => {
                File::open(segment_path(&self.dir, segment))?.read_exact_at(&mut buf, offset)?
            }
        }
        Ok(buf)
    }

    /// Fsyncs every segment holding unsynced batches (one fsync for all of
    /// a segment's batches), then closes all files but the newest.
    fn sync_all(&mut self) {
        let pending: Vec<(u64, Vec<Key>)> = self.unsynced.drain().collect();
        self.deadline = None;
        if !pending.is_empty() && self.dir_dirty {
            // New segment files must survive a power cut too.
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
            self.dir_dirty = false;
        }
        for (segment, batches) in pending {
            let Some(f) = self.files.get(&segment) else {
                continue;
            };
            let started = Instant::now();
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            let r = f.sync_data();
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.stats
                .sync_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            if let Err(e) = r {
                let path = segment_path(&self.dir, segment);
                self.fail(segment, batches, format!("{}: fsync: {e}", path.display()));
            }
        }
        if let Some(&newest) = self.files.keys().max() {
            self.files.retain(|id, _| *id == newest);
        }
    }
}
