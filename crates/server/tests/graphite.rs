//! The `[graphite]` export against a stand-in Carbon (a TCP listener that
//! records the plaintext lines it receives): statsd packets sent over UDP
//! arrive as `path value timestamp` lines after one flush; Carbon going
//! away and coming back on the same port: nothing resent, nothing skipped.

mod common;

use std::time::Duration;

use common::{Stack, metric, wait_for};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use widgetry_server::config::roles::{GraphiteConfig, StatsdConfig};

const WAIT: Duration = Duration::from_secs(20);

/// A plaintext Carbon listener that forwards every line it receives.
struct Carbon {
    port: u16,
    lines: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Carbon {
    async fn start(port: u16) -> Carbon {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the stand-in Carbon");
        let port = listener.local_addr().expect("addr").port();
        let (tx, lines) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            // Connections live in this task: aborting it closes them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                let tx = tx.clone();
                conns.spawn(async move {
                    let mut reader = tokio::io::BufReader::new(stream).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        let _ = tx.send(line);
                    }
                });
            }
        });
        Carbon { port, lines, task }
    }

    /// Stops listening and closes every connection.
    async fn stop(self) -> Vec<String> {
        self.task.abort();
        let _ = self.task.await;
        let mut lines = self.lines;
        let mut out = Vec::new();
        while let Ok(l) = lines.try_recv() {
            out.push(l);
        }
        out
    }

    /// Waits for a line starting with `start`; returns every line so far.
    async fn wait_line(&mut self, start: &str, seen: &mut Vec<String>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !seen.iter().any(|l| l.starts_with(start)) {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => seen.push(l),
                _ => panic!("no line starting {start:?} reached Carbon; got {seen:?}"),
            }
        }
    }
}

/// A stack whose statsd listener flushes every 200 ms and whose export
/// flushes every 100 ms to Carbon on `port`.
async fn stack(port: u16) -> Stack {
    Stack::with_statsd_and_graphite(
        StatsdConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            flush: Duration::from_millis(200),
            device: "statsd".into(),
            percentiles: widgetry_statsd::Config::default().percentiles,
        },
        GraphiteConfig {
            host: "127.0.0.1".into(),
            port,
            prefix: GraphiteConfig::DEFAULT_PREFIX.into(),
            flush: Duration::from_millis(100),
            max_buffered_lines: 10_000,
            filter: Default::default(),
        },
    )
    .await
}

fn send(stack: &Stack, packet: &str) {
    let to = stack.statsd.expect("statsd on");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP client");
    sock.send_to(packet.as_bytes(), to).expect("send a packet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_reaches_carbon_once_across_a_carbon_restart() {
    let mut carbon = Carbon::start(0).await;
    let port = carbon.port;
    let stack = stack(port).await;
    let started_s = widgetry_common::now_ms() / 1000;
    send(&stack, "orders:3|c\nrequests:2|c|#env:prod");
    let mut first = Vec::new();
    carbon
        .wait_line("widgetry.statsd.orders.count ", &mut first)
        .await;
    carbon
        .wait_line("widgetry.statsd.requests.count;env=prod ", &mut first)
        .await;
    let line = first
        .iter()
        .find(|l| l.starts_with("widgetry.statsd.orders.count "))
        .expect("the line");
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 3, "path value timestamp: {line}");
    assert_eq!(parts[1], "3", "{line}");
    let ts: i64 = parts[2].parse().expect("timestamp in seconds");
    assert!(
        (started_s - 1..=started_s + 60).contains(&ts),
        "timestamp {ts} is the flush time in seconds (started {started_s})"
    );

    // Carbon goes away; the next flush cannot be written.
    first.extend(carbon.stop().await);
    send(&stack, "orders:5|c");
    wait_for("a failed write or connect counted", WAIT, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_graphite_errors_total") >= 1.0).then_some(())
    })
    .await;
    // Back on the same port: the held lines arrive, the old ones are not
    // sent again.
    let mut carbon = Carbon::start(port).await;
    let mut second = Vec::new();
    carbon
        .wait_line("widgetry.statsd.orders.count 5 ", &mut second)
        .await;
    let count =
        |lines: &[String], start: &str| lines.iter().filter(|l| l.starts_with(start)).count();
    assert_eq!(
        count(&first, "widgetry.statsd.orders.count 3 "),
        1,
        "{first:?}"
    );
    assert_eq!(
        count(&second, "widgetry.statsd.orders.count 3 "),
        0,
        "nothing resent after Carbon came back: {second:?}"
    );
    let (_, m) = stack.get_text("/metrics").await;
    assert!(
        metric(&m, "widgetry_graphite_lines_sent_total") >= 5.0,
        "{m}"
    );
    assert_eq!(metric(&m, "widgetry_graphite_dropped_total"), 0.0);
    assert!(metric(&m, "widgetry_graphite_last_flush_timestamp_seconds") >= started_s as f64);
    // The cursor in the database is where the export got to, so a
    // restart resumes after the last line it wrote.
    let running = stack.running.as_ref().expect("running");
    let last = running.store.last_commit_id().await.expect("last commit");
    wait_for("the cursor stored after the write", WAIT, || async {
        let cursor = running
            .store
            .sink_cursor(widgetry_server::sinks::graphite::CURSOR)
            .await
            .expect("read the cursor");
        (cursor == Some(last)).then_some(())
    })
    .await;
    stack.stop().await;
    carbon.stop().await;
}

/// A Carbon that shuts down with a flush unread in its socket buffer
/// (the kernel answers with a reset): the export must not count that
/// flush as sent, and sends it again to the next Carbon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_carbon_never_read_is_sent_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    let carbon = tokio::spawn(async move {
        // The first connection: wait until the flush is in the buffer,
        // then close without reading it (SO_LINGER 0: a reset).
        let (first, _) = listener.accept().await.expect("accept");
        let mut peek = [0u8; 1];
        first.peek(&mut peek).await.expect("peek");
        socket2::SockRef::from(&first)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(first);
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let _ = tx.send(line);
                }
            });
        }
    });
    let stack = stack(port).await;
    send(&stack, "orders:7|c");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.starts_with("widgetry.statsd.orders.count 7 "))
    {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(l)) => seen.push(l),
            _ => panic!("the reset flush never reached the next connection: {seen:?}"),
        }
    }
    let (_, m) = stack.get_text("/metrics").await;
    assert!(
        metric(&m, "widgetry_graphite_lines_unconfirmed_total") >= 1.0,
        "the reset flush is counted as unconfirmed: {m}"
    );
    assert!(metric(&m, "widgetry_graphite_errors_total") >= 1.0, "{m}");
    stack.stop().await;
    carbon.abort();
}
