//! Helpers for the integration tests: free ports, an in-process `serve`,
//! a tiny HTTP client, in-process agents, and waiting on conditions with a
//! deadline (never sleeping as synchronisation).

#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use widgetry_server::config::{
    BrokerSource, DEFAULT_BROKER_TOML, Database, ListenOverride, parse_broker_config,
};
use widgetry_server::{Running, ServeConfig, start_serve};

/// A port that was free a moment ago, for a child process that must come
/// back on the same port after a restart (anything else binds port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Default retention with no compactor: most tests read the batch log
/// directly.
fn no_compactor() -> widgetry_server::config::ingest::Retention {
    widgetry_server::config::ingest::Retention {
        compact_every: None,
        ..Default::default()
    }
}

/// Environment variable naming a PostgreSQL server (an admin URL such as
/// `postgres://postgres@127.0.0.1:5432/postgres`). When set, tests that use
/// [`test_database`] run against a fresh database on it instead of SQLite;
/// the test command sets it for a second run of the storage and API tests.
pub const POSTGRES_ENV: &str = "WIDGETRY_TEST_POSTGRES";

/// The database a test should use: a SQLite file in `dir`, or, with
/// `WIDGETRY_TEST_POSTGRES` set, a new empty database on that server.
pub async fn test_database(dir: &std::path::Path) -> Database {
    let Ok(admin) = std::env::var(POSTGRES_ENV) else {
        return Database::Sqlite(dir.join("widgetry.db"));
    };
    sqlx::any::install_default_drivers();
    let name = format!("widgetry_test_{:016x}", rand::random::<u64>());
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("{POSTGRES_ENV}={admin}: cannot connect: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create a test database");
    pool.close().await;
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("admin URL ends in /database");
    Database::Postgres(format!("{base}/{name}"))
}

/// A running in-process `widgetry serve` on free ports with its database in
/// a temporary directory (or on PostgreSQL, see [`test_database`]).
/// The `widgetry-server` password of test stacks (tests that act as the
/// server, e.g. to take over the ingestor's client id, log in with it).
pub const TEST_SERVER_PASSWORD: &str = "test-server-password-0123456789";

pub struct Stack {
    pub running: Option<Running>,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// The MQTT 5 listener.
    pub mqtt5: SocketAddr,
    /// The statsd listener's UDP address, for stacks made by
    /// [`Stack::with_statsd`].
    pub statsd: Option<SocketAddr>,
    pub db: Database,
    pub dir: tempfile::TempDir,
    /// What it was started with ([`Stack::restart`] starts it again).
    pub cfg: ServeConfig,
}

impl Stack {
    /// A stack with `[[rules]]` and `[alerts]` set to `alerting`.
    pub async fn with_alerting(alerting: widgetry_server::config::roles::AlertingConfig) -> Stack {
        Stack::with_options_and(
            Default::default(),
            DEFAULT_BROKER_TOML,
            Default::default(),
            None,
            None,
            alerting,
            no_compactor(),
        )
        .await
    }

    /// A stack whose compactor runs every 200 ms (others have none).
    pub async fn with_compaction(limits: widgetry_proto::Limits, broker_toml: &str) -> Stack {
        Stack::with_options_and(
            limits,
            broker_toml,
            Default::default(),
            None,
            None,
            Default::default(),
            widgetry_server::config::ingest::Retention {
                compact_every: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        )
        .await
    }

    /// A stack with no periodic retention pass (nor compactor), for tests
    /// that store old data and prune it themselves: the pass that runs
    /// at start could otherwise remove it before the test looks.
    pub async fn without_retention() -> Stack {
        Stack::with_options_and(
            Default::default(),
            DEFAULT_BROKER_TOML,
            Default::default(),
            None,
            None,
            Default::default(),
            widgetry_server::config::ingest::Retention {
                raw: None,
                minute: None,
                hour: None,
                compact_every: None,
                ..Default::default()
            },
        )
        .await
    }

    /// Stops serve cleanly and starts it again on the same database (new
    /// ports).
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            r.wait().await.expect("serve stops cleanly");
        }
        let running = start_serve(self.cfg.clone(), CancellationToken::new())
            .await
            .expect("serve starts again");
        self.http = running.http_addr;
        self.mqtt = running.mqtt_addr;
        self.mqtt5 = running.mqtt5_addr.expect("MQTT 5 listener");
        self.statsd = running.statsd_addr;
        self.running = Some(running);
    }

    pub async fn start() -> Stack {
        Stack::with_limits(Default::default()).await
    }

    /// A stack whose ingestor enforces `limits` (e.g. a small payload
    /// limit, so that the broker passes oversize payloads on to it).
    pub async fn with_limits(limits: widgetry_proto::Limits) -> Stack {
        Stack::with(limits, DEFAULT_BROKER_TOML).await
    }

    /// A stack whose embedded broker runs `broker_toml` (its first [v4.*]
    /// listener moved to a free port).
    pub async fn with(limits: widgetry_proto::Limits, broker_toml: &str) -> Stack {
        Stack::with_auth(limits, broker_toml, Default::default()).await
    }

    /// A stack with `serve --auth` set to `auth`.
    pub async fn with_auth(
        limits: widgetry_proto::Limits,
        broker_toml: &str,
        auth: widgetry_server::config::roles::AuthMode,
    ) -> Stack {
        Stack::with_options(limits, broker_toml, auth, None, None).await
    }

    /// A stack with `serve --statsd` on (`statsd.listen` may use port 0:
    /// [`Stack::statsd`] says which port was bound).
    pub async fn with_statsd(statsd: widgetry_server::config::roles::StatsdConfig) -> Stack {
        Stack::with_options(
            Default::default(),
            DEFAULT_BROKER_TOML,
            Default::default(),
            Some(statsd),
            None,
        )
        .await
    }

    /// A stack with `serve --statsd` and a `[graphite]` export.
    pub async fn with_statsd_and_graphite(
        statsd: widgetry_server::config::roles::StatsdConfig,
        graphite: widgetry_server::config::roles::GraphiteConfig,
    ) -> Stack {
        Stack::with_options(
            Default::default(),
            DEFAULT_BROKER_TOML,
            Default::default(),
            Some(statsd),
            Some(graphite),
        )
        .await
    }

    async fn with_options(
        limits: widgetry_proto::Limits,
        broker_toml: &str,
        auth: widgetry_server::config::roles::AuthMode,
        statsd: Option<widgetry_server::config::roles::StatsdConfig>,
        graphite: Option<widgetry_server::config::roles::GraphiteConfig>,
    ) -> Stack {
        Stack::with_options_and(
            limits,
            broker_toml,
            auth,
            statsd,
            graphite,
            Default::default(),
            no_compactor(),
        )
        .await
    }

    async fn with_options_and(
        limits: widgetry_proto::Limits,
        broker_toml: &str,
        auth: widgetry_server::config::roles::AuthMode,
        statsd: Option<widgetry_server::config::roles::StatsdConfig>,
        graphite: Option<widgetry_server::config::roles::GraphiteConfig>,
        alerting: widgetry_server::config::roles::AlertingConfig,
        retention: widgetry_server::config::ingest::Retention,
    ) -> Stack {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = test_database(dir.path()).await;
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let listen = ListenOverride {
            v4: Some(any_port),
            v5: Some(any_port),
        };
        let broker = parse_broker_config(&BrokerSource::BuiltIn, broker_toml, listen)
            .expect("test broker.toml is valid");
        let cfg = ServeConfig {
            broker,
            http_listen: "127.0.0.1:0".parse().expect("addr"),
            http_tls: None,
            database: db.clone(),
            retention,
            limits,
            server_password: Some(TEST_SERVER_PASSWORD.into()),
            auth,
            api_token: None,
            statsd,
            graphite,
            ws_bridges: Vec::new(),
            alerting,
            presence: Default::default(),
        };
        let running = start_serve(cfg.clone(), CancellationToken::new())
            .await
            .expect("serve starts");
        let http = running.http_addr;
        let mqtt = running.mqtt_addr;
        let mqtt5 = running
            .mqtt5_addr
            .expect("the test broker has an MQTT 5 listener");
        let statsd = running.statsd_addr;
        Stack {
            running: Some(running),
            http,
            mqtt,
            mqtt5,
            statsd,
            db,
            dir,
            cfg,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        http_get_json(self.http, path).await
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let addr = self.http;
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get(addr, &path))
            .await
            .expect("join")
    }

    /// Batches the ingestor recognised as redeliveries so far (`/metrics`).
    pub async fn duplicates(&self) -> f64 {
        let (status, text) = self.get_text("/metrics").await;
        assert_eq!(status, 200, "{text}");
        metric(&text, "widgetry_ingest_batches_duplicate_total")
    }

    /// Counts rows with a SQL query on a separate read-only connection.
    pub async fn count(&self, sql: &str) -> i64 {
        let running = self.running.as_ref().expect("running");
        let row: (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(running.store.reader())
            .await
            .expect("count query");
        row.0
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            r.wait().await.expect("serve stops cleanly");
        }
    }
}

/// Plain HTTP/1.0 request with an optional JSON body; returns status and
/// body.
pub fn http_send(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the web service");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let headers = match body {
        Some(b) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ),
        None => String::new(),
    };
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: test\r\n{headers}\r\n{body}"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Plain HTTP/1.0 GET; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_send(addr, "GET", path, None)
}

/// The agent inputs the tests run with (`--inputs`): whole-machine CPU and
/// memory give the same series on every machine, unlike per-core CPU,
/// disks, mounts or interfaces.
pub const INPUTS: &str = "cpu,mem";

/// [`INPUTS`] for an in-process agent's config.
pub fn test_inputs() -> Vec<widgetry_agent::system::Input> {
    widgetry_agent::system::Input::parse_list(INPUTS).expect("test inputs")
}

/// The series an agent with [`INPUTS`] sends, sorted.
pub const SERIES: [&str; 5] = [
    "cpu.iowait_pct",
    "cpu.usage_pct",
    "mem.available_bytes",
    "mem.total_bytes",
    "mem.used_bytes",
];

/// Every point of `device`'s `series` (none while the device or series
/// does not exist yet).
pub async fn series_points(http: SocketAddr, device: &str, series: &str) -> Vec<(i64, f64)> {
    let (status, body) = http_get_json(
        http,
        &format!("/api/v1/series?device={device}&series={series}&from=0&max_points=100000"),
    )
    .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["points"].clone()).expect("points")
}

pub async fn http_get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let p = path.to_string();
    let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, &p))
        .await
        .expect("join");
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: body is not JSON ({e}): {body}"));
    (status, value)
}

/// A sample time `ago` before now, in whole seconds (ms). Tests use recent
/// times: a fixed date falls out of the default 30-day raw retention, and
/// the retention pass that runs when a server starts would remove what a
/// test just stored.
pub fn recent_ts(ago: Duration) -> i64 {
    (widgetry_common::now_ms() - ago.as_millis() as i64) / 1000 * 1000
}

/// Sends the in-process server's warnings and errors (or what `RUST_LOG`
/// asks for) to the test's captured output, so that a failing test shows
/// what the server said.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent running in this process until dropped or stopped.
pub struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<widgetry_agent::Report, widgetry_agent::AgentError>>,
    pub spool: tempfile::TempDir,
}

impl Agent {
    pub fn start(mqtt: SocketAddr, device: &str) -> Agent {
        let spool = tempfile::tempdir().expect("spool dir");
        let mut cfg = widgetry_agent::AgentConfig::new("127.0.0.1", mqtt.port(), device);
        cfg.interval = Duration::from_millis(200);
        cfg.batch_max_wait = Duration::from_millis(200);
        cfg.spool_dir = spool.path().to_path_buf();
        cfg.inputs = test_inputs();
        Agent::with_config(cfg, spool)
    }

    pub fn with_config(cfg: widgetry_agent::AgentConfig, spool: tempfile::TempDir) -> Agent {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(widgetry_agent::run(
            cfg,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        ));
        Agent {
            stop: Some(tx),
            handle,
            spool,
        }
    }

    pub async fn stop(mut self) -> widgetry_agent::Report {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.handle)
            .await
            .expect("agent task")
            .expect("agent ran")
    }
}

/// Path of a binary of this workspace, next to the test executable's
/// directory (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Whether an external tool is installed (the test command installs them).
pub fn require_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: run the README's test command (scripts/test.sh), which installs it")
    })
}

/// `widgetry serve` as a child process (so it can be SIGKILLed), on fixed
/// ports chosen by the caller and a database in `dir`.
pub struct ServeProc {
    pub child: std::process::Child,
    pub http: SocketAddr,
}

impl ServeProc {
    pub async fn start(mqtt: u16, http: u16, dir: &std::path::Path) -> ServeProc {
        let http: SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
        let child = std::process::Command::new(workspace_bin("widgetry"))
            .current_dir(dir)
            .args(["serve", "--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
            .args(["--mqtt5-listen", "127.0.0.1:0"])
            .args(["--http-listen", &http.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start widgetry serve");
        wait_for(
            "serve's ingestor is subscribed",
            Duration::from_secs(20),
            || async {
                tokio::task::spawn_blocking(move || {
                    TcpStream::connect(http)
                        .ok()
                        .map(|_| http_get(http, "/metrics"))
                })
                .await
                .ok()
                .flatten()
                .filter(|(s, body)| *s == 200 && body.contains("widgetry_ingest_subscribed 1"))
            },
        )
        .await;
        ServeProc { child, http }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A child process that is killed when the guard drops (also on panic).
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Plain HTTP GET from async code; returns status and body.
pub async fn http_get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let p = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &p))
        .await
        .expect("join")
}

/// The value of one series (`name` or `name{labels}`, exactly as
/// rendered) in a Prometheus text exposition; panics if it is absent, so
/// a renamed or vanished counter fails the test that reads it.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{series} is not on /metrics:\n{text}"))
}

/// The sum of every series of metric `name` (all label sets); panics if
/// there is none.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.parse().ok()).flatten()
        })
        .collect();
    assert!(!values.is_empty(), "{name} is not on /metrics:\n{text}");
    values.iter().sum()
}

/// Runs a mosquitto tool to completion (each invocation is bounded by its
/// own -W timeout or by publishing one message).
pub fn mosquitto(tool: &str, args: &[&str]) -> Output {
    Command::new(require_tool(tool))
        .args(["-h", "127.0.0.1"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}

/// Publishes each line of `lines` as one message on `topic` with one
/// `mosquitto_pub -l` (one connection, as fast as the broker takes them).
pub fn mosquitto_lines(port: u16, topic: &str, qos: u8, lines: &str) {
    let mut child = Command::new(require_tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            &qos.to_string(),
        ])
        .args(["-t", topic, "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run mosquitto_pub");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write lines");
    assert!(child.wait().expect("mosquitto_pub ends").success());
}

/// One `mosquitto_pub -V 311 -q 1` of `message` on `topic` (retained with
/// `retain`); panics naming the output if it fails.
pub fn mosquitto_pub(port: u16, topic: &str, message: &str, retain: bool) {
    let port = port.to_string();
    let mut args = vec![
        "-V", "311", "-p", &port, "-q", "1", "-t", topic, "-m", message,
    ];
    if retain {
        args.push("-r");
    }
    let out = mosquitto("mosquitto_pub", &args);
    assert!(
        out.status.success(),
        "mosquitto_pub on {topic}: {}",
        text(&out)
    );
}

/// A tool's exit status and output, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether a tool's stderr contains `needle`.
pub fn stderr_says(o: &Output, needle: &str) -> bool {
    String::from_utf8_lossy(&o.stderr).contains(needle)
}

/// Whether a tool's stderr, lowercased, contains `needle` (lowercase): for
/// messages whose case differs between MQTT versions.
pub fn stderr_says_lower(o: &Output, needle: &str) -> bool {
    String::from_utf8_lossy(&o.stderr)
        .to_lowercase()
        .contains(needle)
}

/// A Mosquitto broker on `127.0.0.1:port` (anonymous, no persistence,
/// never dropping queued messages), stopped when the guard drops.
pub async fn start_mosquitto(dir: &std::path::Path, port: u16) -> ChildGuard {
    let bin = require_tool("mosquitto");
    let conf = dir.join("mosquitto.conf");
    let mut f = std::fs::File::create(&conf).expect("conf");
    writeln!(
        f,
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0"
    )
    .expect("write conf");
    let guard = ChildGuard(
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    wait_for("mosquitto listening", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    guard
}

/// `widgetry ingest` as a process against a broker on `127.0.0.1:port`,
/// in shared-subscription group `widgetry-ingest` with client id `id`.
pub fn start_ingest(port: u16, db: &widgetry_server::config::Database, id: &str) -> ChildGuard {
    ChildGuard(
        std::process::Command::new(workspace_bin("widgetry"))
            .args(["ingest", "--broker", &format!("127.0.0.1:{port}")])
            .arg("--database")
            .arg(db.to_arg())
            .args(["--client-id", id, "--shared-group", "widgetry-ingest"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start widgetry ingest"),
    )
}
