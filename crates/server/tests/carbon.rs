//! The `[graphite]` export against a real Carbon: Debian's `carbon-cache`
//! (graphite-carbon) on free loopback ports with its own storage
//! directory, read back from its whisper files with `whisper-fetch`.
//! statsd packets go to the server over UDP the whole time; Carbon is
//! stopped (SIGTERM) and started again in the middle. Afterwards every
//! second Widgetry stored is in Carbon with Widgetry's value, the lines
//! Carbon confirmed are exactly the points exported (none confirmed
//! twice), and the series the filter leaves out never reached Carbon.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Stack, free_port, metric, wait_for};
use widgetry_server::config::roles::{GraphiteConfig, SeriesFilter, StatsdConfig};

const WAIT: Duration = Duration::from_secs(30);

/// A carbon-cache process with its config and storage in `dir`.
struct Carbon {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Carbon {
    fn new(dir: &Path) -> Carbon {
        let port = free_port();
        let (pickle, query) = (free_port(), free_port());
        for sub in ["conf", "storage/whisper", "storage/lists", "log", "pid"] {
            std::fs::create_dir_all(dir.join(sub)).expect("carbon dirs");
        }
        let d = dir.display();
        std::fs::write(
            dir.join("conf/carbon.conf"),
            format!(
                "[cache]\nSTORAGE_DIR = {d}/storage/\nLOCAL_DATA_DIR = {d}/storage/whisper/\n\
                 WHITELISTS_DIR = {d}/storage/lists/\nCONF_DIR = {d}/conf/\nLOG_DIR = {d}/log/\n\
                 PID_DIR = {d}/pid/\nDATABASE = whisper\nENABLE_LOGROTATION = False\n\
                 ENABLE_TAGS = False\nMAX_CACHE_SIZE = inf\nMAX_UPDATES_PER_SECOND = inf\n\
                 MAX_CREATES_PER_MINUTE = inf\nLINE_RECEIVER_INTERFACE = 127.0.0.1\n\
                 LINE_RECEIVER_PORT = {port}\nENABLE_UDP_LISTENER = False\n\
                 PICKLE_RECEIVER_INTERFACE = 127.0.0.1\nPICKLE_RECEIVER_PORT = {pickle}\n\
                 CACHE_QUERY_INTERFACE = 127.0.0.1\nCACHE_QUERY_PORT = {query}\n\
                 LOG_LISTENER_CONNECTIONS = True\n"
            ),
        )
        .expect("carbon.conf");
        std::fs::write(
            dir.join("conf/storage-schemas.conf"),
            "[all]\npattern = .*\nretentions = 1s:1d\n",
        )
        .expect("storage-schemas.conf");
        Carbon {
            dir: dir.to_path_buf(),
            port,
            child: None,
        }
    }

    async fn start(&mut self) {
        let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/carbon/carbon-drain.py");
        let log = std::fs::File::create(self.dir.join("log/console.out")).expect("log file");
        let child = Command::new("/usr/bin/python3")
            .arg(wrapper)
            .arg(format!("--config={}/conf/carbon.conf", self.dir.display()))
            .args(["--nodaemon", "start"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start carbon-cache (apt-get install graphite-carbon)");
        self.child = Some(child);
        let port = self.port;
        let dir = self.dir.clone();
        wait_for("carbon-cache listening", WAIT, || async {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            if !up && self.exited() {
                panic!("carbon-cache exited: {}", console(&dir));
            }
            up.then_some(())
        })
        .await;
    }

    fn exited(&self) -> bool {
        // try_wait needs &mut; a kill(pid, 0) probe through /proc is enough here.
        self.child
            .as_ref()
            .is_some_and(|c| !Path::new(&format!("/proc/{}", c.id())).exists())
    }

    /// SIGTERM, and wait for it to exit (the wrapper drains its cache).
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait for carbon-cache");
        assert!(
            status.success() || status.code().is_none(),
            "carbon-cache: {status}"
        );
    }

    /// Second → value of a whisper file, from `whisper-fetch --json`.
    fn fetch(&self, path: &str, from_s: i64, until_s: i64) -> Vec<(i64, f64)> {
        let file = self
            .dir
            .join("storage/whisper")
            .join(format!("{}.wsp", path.replace('.', "/")));
        assert!(
            file.exists(),
            "{} missing: {}",
            file.display(),
            console(&self.dir)
        );
        let out = Command::new("whisper-fetch")
            .args([
                &format!("--from={from_s}"),
                &format!("--until={until_s}"),
                "--json",
            ])
            .arg(&file)
            .output()
            .expect("whisper-fetch (python3-whisper)");
        assert!(out.status.success(), "whisper-fetch: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let (start, step) = (
            v["start"].as_i64().expect("start"),
            v["step"].as_i64().expect("step"),
        );
        v["values"]
            .as_array()
            .expect("values")
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.as_f64().map(|x| (start + i as i64 * step, x)))
            .collect()
    }
}

impl Drop for Carbon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log/console.out")).unwrap_or_default()
}

/// Stored points of `statsd`/`series`.
async fn points(stack: &Stack, series: &str) -> Vec<(i64, f64)> {
    let (status, body) = stack
        .get(&format!(
            "/api/v1/series?device=statsd&series={series}&from=0&to=99999999999999"
        ))
        .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{series}: {body}");
    serde_json::from_value(body["points"].clone()).expect("points")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_reaches_a_real_carbon_across_its_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut carbon = Carbon::new(tmp.path());
    carbon.start().await;
    let stack = Stack::with_statsd_and_graphite(
        StatsdConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            flush: Duration::from_millis(500),
            device: "statsd".into(),
            percentiles: widgetry_statsd::Config::default().percentiles,
        },
        GraphiteConfig {
            host: "127.0.0.1".into(),
            port: carbon.port,
            prefix: GraphiteConfig::DEFAULT_PREFIX.into(),
            flush: Duration::from_millis(300),
            max_buffered_lines: 100_000,
            filter: SeriesFilter::parse(&["statsd/ticks.*".to_string()]).expect("filter"),
        },
    )
    .await;
    let started_s = widgetry_common::now_ms() / 1000;
    let to = stack.statsd.expect("statsd on");

    // statsd traffic the whole time: a packet every 20 ms, bounded.
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let mut sent = 0u32;
            while !stop.is_cancelled() && sent < 3_000 {
                sock.send_to(b"ticks:1|c\nskipped:1|c", to)
                    .await
                    .expect("send");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    let metrics = || async { stack.get_text("/metrics").await.1 };
    wait_for("some lines confirmed by Carbon", WAIT, || async {
        (metric(&metrics().await, "widgetry_graphite_lines_sent_total") >= 6.0).then_some(())
    })
    .await;

    // Carbon restarted in the middle of the traffic.
    carbon.stop().await;
    wait_for("a failed flush while Carbon is away", WAIT, || async {
        (metric(&metrics().await, "widgetry_graphite_errors_total") >= 1.0).then_some(())
    })
    .await;
    carbon.start().await;
    let after_restart = metric(&metrics().await, "widgetry_graphite_lines_sent_total");
    wait_for("lines confirmed after the restart", WAIT, || async {
        (metric(&metrics().await, "widgetry_graphite_lines_sent_total") >= after_restart + 6.0)
            .then_some(())
    })
    .await;
    stop.cancel();
    let sent = sender.await.expect("sender");
    assert!(sent > 0);

    // Every exported point confirmed exactly once (a point of
    // ticks.count and one of ticks.rate per statsd flush).
    let (count, rate) = wait_for("every point exported", WAIT, || async {
        let count = points(&stack, "ticks.count").await;
        let rate = points(&stack, "ticks.rate").await;
        let m = metrics().await;
        let confirmed = metric(&m, "widgetry_graphite_lines_sent_total");
        let dropped = metric(&m, "widgetry_graphite_dropped_total");
        assert_eq!(dropped, 0.0, "nothing dropped: the buffer holds 100k lines");
        let exported = (count.len() + rate.len()) as f64;
        assert!(
            confirmed <= exported,
            "{confirmed} lines confirmed for {exported} points: some were confirmed twice"
        );
        (confirmed == exported && !count.is_empty()).then_some((count, rate))
    })
    .await;
    let m = metrics().await;
    eprintln!(
        "statsd points {} + {}; confirmed {}; unconfirmed (sent again) {}; errors {}",
        count.len(),
        rate.len(),
        metric(&m, "widgetry_graphite_lines_sent_total"),
        metric(&m, "widgetry_graphite_lines_unconfirmed_total"),
        metric(&m, "widgetry_graphite_errors_total"),
    );
    stack.stop().await;
    carbon.stop().await;

    // What Carbon stored: one value per second, the last one written.
    let until = widgetry_common::now_ms() / 1000 + 2;
    for (series, stored) in [("ticks.count", &count), ("ticks.rate", &rate)] {
        let in_carbon: std::collections::BTreeMap<i64, f64> = carbon
            .fetch(&format!("widgetry.statsd.{series}"), started_s - 2, until)
            .into_iter()
            .collect();
        let mut want = std::collections::BTreeMap::new();
        for (ts_ms, v) in stored.iter() {
            want.insert(ts_ms.div_euclid(1000), *v);
        }
        let missing: Vec<_> = want
            .iter()
            .filter(|(s, v)| in_carbon.get(s) != Some(v))
            .collect();
        assert!(
            missing.is_empty(),
            "{series}: Carbon lacks or differs at {missing:?} (Carbon has {in_carbon:?})"
        );
        assert_eq!(
            in_carbon.len(),
            want.len(),
            "{series}: Carbon has seconds Widgetry never stored: {in_carbon:?} vs {want:?}"
        );
    }
    assert!(
        !tmp.path()
            .join("storage/whisper/widgetry/statsd/skipped")
            .exists(),
        "the filter keeps `skipped` out of Carbon"
    );
}
