//! The Graphite export (`[graphite]`): committed samples, in commit order,
//! as Carbon plaintext lines (`path value timestamp\n`) over TCP. It
//! follows the commit ids from its own cursor in the database
//! (`sink_cursors`, name [`CURSOR`]), advanced only after Carbon confirmed
//! it read the lines of those commits (see [`Export::send`]), so a restart
//! neither resends nor skips (a first start begins at the newest commit:
//! history is not exported). Only series that pass the `filter` globs are
//! exported.
//!
//! It must never hold more than `max_buffered_lines` lines: while Carbon
//! is away it keeps reading commits and drops the oldest lines, counted;
//! it retries with a jittered backoff and never slows the ingestor (it
//! only reads the batch log, from the reader pool).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use widgetry_common::{backoff, now_ms};
use widgetry_proto::SeriesKey;

use crate::config::roles::GraphiteConfig;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// This sink's name in `sink_cursors`.
pub const CURSOR: &str = "graphite";

/// Commits read from the database at a time.
const FETCH: i64 = 500;

/// Longest wait between connection attempts.
const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// Longest one flush (connect, write, Carbon's confirmation) may take
/// before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes handed to one write of a flush.
const WRITE_CHUNK: usize = 64 * 1024;

/// Series paths remembered at most (then the cache starts again).
const PATH_CACHE: usize = 100_000;

/// The export's state between flushes.
struct Export {
    cfg: GraphiteConfig,
    store: Store,
    metrics: Arc<Metrics>,
    /// Every commit through this one was written to Carbon.
    cursor: u64,
    /// Every commit through this one is in `lines` (or was dropped).
    read: u64,
    lines: VecDeque<String>,
    /// Series id → Graphite path, or None when the filter leaves it out.
    paths: HashMap<i64, Option<String>>,
    failures: u32,
    next_attempt: Instant,
}

/// Runs the export until `shutdown`, then flushes what it holds once more
/// unless Carbon is in its retry backoff.
pub async fn run(
    cfg: GraphiteConfig,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    metrics.graphite.enabled.store(true, Ordering::Relaxed);
    let cursor = match store.sink_cursor(CURSOR).await? {
        Some(c) => c,
        None => {
            let c = store.last_commit_id().await?;
            store.set_sink_cursor(CURSOR, c).await?;
            c
        }
    };
    info!(carbon = %format!("{}:{}", cfg.host, cfg.port), cursor, "graphite export started");
    let mut tick = tokio::time::interval(cfg.flush);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut export = Export {
        cfg,
        store,
        metrics,
        cursor,
        read: cursor,
        lines: VecDeque::new(),
        paths: HashMap::new(),
        failures: 0,
        next_attempt: Instant::now(),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = export.read_commits().await {
            warn!(error = %e, "graphite export cannot read commits; retrying at the next flush");
            continue;
        }
        export.send().await;
    }
    // One last flush unless Carbon is in its backoff.
    if export.read_commits().await.is_ok() {
        export.send().await;
    }
    info!(
        cursor = export.cursor,
        unsent = export.lines.len(),
        "graphite export stopped"
    );
    Ok(())
}

impl Export {
    /// Turns the commits after `read` into lines.
    async fn read_commits(&mut self) -> Result<(), StoreError> {
        loop {
            let commits = self.store.commits_after(self.read, FETCH).await?;
            let Some(last) = commits.last().map(|c| c.commit_id) else {
                return Ok(());
            };
            let unknown: Vec<i64> = commits
                .iter()
                .flat_map(|c| c.runs.iter().map(|r| r.0))
                .filter(|id| !self.paths.contains_key(id))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !unknown.is_empty() {
                if self.paths.len() > PATH_CACHE {
                    self.paths.clear();
                }
                for (id, device, key) in self.store.series_names(&unknown).await? {
                    let path = self
                        .cfg
                        .filter
                        .admits(&device, &key)
                        .then(|| path(&self.cfg.prefix, &device, &key));
                    self.paths.insert(id, path);
                }
            }
            for commit in &commits {
                for (id, points) in &commit.runs {
                    let Some(Some(path)) = self.paths.get(id) else {
                        continue;
                    };
                    for (ts_ms, value) in points {
                        if !value.is_finite() {
                            continue;
                        }
                        self.lines
                            .push_back(format!("{path} {value} {}\n", ts_ms.div_euclid(1000)));
                    }
                }
            }
            self.read = last;
            let over = self.lines.len().saturating_sub(self.cfg.max_buffered_lines);
            if over > 0 {
                self.lines.drain(..over);
                self.metrics
                    .graphite
                    .dropped
                    .fetch_add(over as u64, Ordering::Relaxed);
                warn!(
                    dropped = over,
                    "graphite export buffer full while Carbon is away: oldest lines dropped"
                );
            }
            if (commits.len() as i64) < FETCH {
                return Ok(());
            }
        }
    }

    /// Writes every held line on a connection of its own, then moves the
    /// cursor to `read` once Carbon confirmed it read them all.
    ///
    /// The plaintext protocol has no acknowledgement, and a write that the
    /// kernel took is not a line Carbon read: when Carbon shuts down, what
    /// sits unread in its socket buffer is thrown away. So each flush
    /// half-closes its connection after the last line and waits for
    /// Carbon's end of stream: Carbon (like go-carbon and carbon-c-relay)
    /// closes only after reading everything up to our FIN, so the end of
    /// stream confirms every line. Anything else (a reset, a timeout) leaves
    /// the lines held for the next flush; Carbon may have stored some of
    /// them, and a whisper file keeps one value per timestamp, so sending
    /// them again rewrites the same points.
    async fn send(&mut self) {
        if self.read == self.cursor && self.lines.is_empty() {
            return;
        }
        if Instant::now() < self.next_attempt {
            return;
        }
        let held = self.lines.len() as u64;
        match tokio::time::timeout(IO_TIMEOUT, self.deliver()).await {
            Ok(Ok(())) => {
                self.lines.clear();
                self.failures = 0;
                let m = &self.metrics.graphite;
                m.lines_sent.fetch_add(held, Ordering::Relaxed);
                m.last_flush_s.store(now_ms() / 1000, Ordering::Relaxed);
                self.cursor = self.read;
                if let Err(e) = self.store.set_sink_cursor(CURSOR, self.cursor).await {
                    warn!(error = %e, cursor = self.cursor, "graphite export cannot store its cursor; a restart may resend");
                }
            }
            Ok(Err(Failure::Connect(e))) => self.failed(&format!("connect failed: {e}")),
            Ok(Err(Failure::Unconfirmed(what))) => {
                self.metrics
                    .graphite
                    .unconfirmed
                    .fetch_add(held, Ordering::Relaxed);
                self.failed(&format!(
                    "{what}; the {held} lines of this flush are sent again at the next"
                ));
            }
            Err(_) => {
                self.metrics
                    .graphite
                    .unconfirmed
                    .fetch_add(held, Ordering::Relaxed);
                self.failed(&format!(
                    "no confirmation within {IO_TIMEOUT:?}; the {held} lines of this flush are sent again at the next"
                ));
            }
        }
    }

    /// One flush: connect, write every held line, half-close, wait for
    /// Carbon's end of stream.
    async fn deliver(&self) -> Result<(), Failure> {
        let addr = (self.cfg.host.as_str(), self.cfg.port);
        let mut conn = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
        let mut text = String::with_capacity(WRITE_CHUNK + 256);
        for line in &self.lines {
            text.push_str(line);
            if text.len() >= WRITE_CHUNK {
                conn.write_all(text.as_bytes())
                    .await
                    .map_err(|e| Failure::Unconfirmed(format!("write failed: {e}")))?;
                text.clear();
            }
        }
        conn.write_all(text.as_bytes())
            .await
            .map_err(|e| Failure::Unconfirmed(format!("write failed: {e}")))?;
        conn.shutdown()
            .await
            .map_err(|e| Failure::Unconfirmed(format!("half-close failed: {e}")))?;
        // Carbon never sends; whatever it might is read and ignored until
        // its end of stream.
        let mut sink = [0u8; 512];
        loop {
            match conn.read(&mut sink).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => {
                    return Err(Failure::Unconfirmed(format!(
                        "Carbon did not confirm the flush: {e}"
                    )));
                }
            }
        }
    }

    fn failed(&mut self, what: &str) {
        self.metrics.graphite.errors.fetch_add(1, Ordering::Relaxed);
        let wait = backoff(self.failures, RECONNECT_CAP);
        self.failures = self.failures.saturating_add(1);
        self.next_attempt = Instant::now() + wait;
        warn!(
            carbon = %format!("{}:{}", self.cfg.host, self.cfg.port),
            retry_in = ?wait,
            held = self.lines.len(),
            "graphite export: {what}"
        );
    }
}

/// Why a flush did not reach Carbon.
enum Failure {
    /// No connection: nothing was sent.
    Connect(std::io::Error),
    /// Lines were (maybe partly) sent, but Carbon did not confirm them.
    Unconfirmed(String),
}

/// The Graphite path of `device`'s series `key` (its text form):
/// `prefix` with `{device}` and `{series}` replaced, then its labels as
/// tags, `;k=v` in key order. Characters Graphite reads as syntax
/// (spaces, `;`, `=` in a name) become `_`.
pub fn path(prefix: &str, device: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let (name, labels) = match SeriesKey::parse(key) {
        Ok(k) => (k.name, k.labels),
        Err(_) => (key.to_string(), Default::default()),
    };
    let mut out = prefix
        .replace("{device}", &clean(device))
        .replace("{series}", &clean(&name));
    for (k, v) in labels {
        out.push(';');
        out.push_str(&clean(&k));
        out.push('=');
        out.push_str(&clean(&v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_prefix_with_labels_as_tags() {
        let p = GraphiteConfig::DEFAULT_PREFIX;
        assert_eq!(
            path(p, "d-1", "cpu.usage_pct"),
            "widgetry.d-1.cpu.usage_pct"
        );
        assert_eq!(
            path(p, "web", "requests.count{env=prod,region=eu}"),
            "widgetry.web.requests.count;env=prod;region=eu"
        );
        assert_eq!(path("apps.{series}", "x", "a/b c"), "apps.a_b_c");
    }
}
