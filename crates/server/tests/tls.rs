//! TLS with certificates made here by test CAs (openssl). MQTT over TLS
//! on the embedded broker: a listener with `[v4.*.tls]` serves
//! `mosquitto_pub --cafile`, refuses plain MQTT and clients that do not
//! trust the certificate, and a client that stalls the handshake delays
//! nobody and is dropped after the connection timeout. End to end, with
//! the real binaries: `widgetry-agent --ca-file` → the broker's TLS
//! listener → `widgetry serve --http-tls-cert/--http-tls-key`, read back
//! over HTTPS and wss by clients that trust only the test CA.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use widgetry_server::config::DEFAULT_BROKER_TOML;

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new(require_tool("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
}

/// A CA (`{name}-ca.pem`) and a server certificate for `localhost` signed
/// by it (`{name}-cert.pem`, `{name}-key.pem`). (Not for the IP address:
/// the broker's rustls 0.22 refuses a ClientHello whose SNI is an IP
/// address, which mosquitto sends when connecting to one.)
fn make_certs(dir: &Path, name: &str) {
    let ca_key = format!("{name}-ca-key.pem");
    let ca = format!("{name}-ca.pem");
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    let cert = format!("{name}-cert.pem");
    let subj = format!("/CN=widgetry test CA {name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &ca_key, "-out", &ca,
            "-days", "2", "-subj", &subj,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=localhost",
        ],
    );
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), "subjectAltName=DNS:localhost\n").expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_serves_trusting_clients_and_a_stalled_handshake_delays_nobody() {
    let certs = tempfile::tempdir().expect("dir");
    make_certs(certs.path(), "good");
    make_certs(certs.path(), "other");
    let path = |f: &str| certs.path().join(f).display().to_string();
    let toml = format!(
        "{DEFAULT_BROKER_TOML}\n[v4.2]\nname = \"v4-tls\"\nlisten = \"127.0.0.1:0\"\nnext_connection_delay_ms = 0\n\n[v4.2.tls]\ncertpath = {:?}\nkeypath = {:?}\n\n[v4.2.connections]\nconnection_timeout_ms = 2000\nmax_payload_size = 1114112\nmax_inflight_count = 500\ndynamic_filters = true\n",
        path("good-cert.pem"),
        path("good-key.pem")
    );
    let stack = Stack::with(Default::default(), &toml).await;
    let tls = stack.running.as_ref().expect("running").mqtt_tls_addrs[0];
    let port = tls.port().to_string();

    // A client that connects and never starts the handshake.
    let mut stalled = std::net::TcpStream::connect(tls).expect("connect");
    let stalled_at = Instant::now();

    let publish = |extra: &[&str], value: u32| {
        let body = format!("{{\"series\":\"t\",\"value\":{value}}}");
        let mut args = vec!["-h", "localhost", "-p", &port, "-q", "1"];
        args.extend_from_slice(&["-t", "widgetry/v1/tls-dev/samples/json", "-m", &body]);
        args.extend_from_slice(extra);
        Command::new(require_tool("mosquitto_pub"))
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run mosquitto_pub")
    };
    let good_ca = path("good-ca.pem");
    let other_ca = path("other-ca.pem");
    let ok = publish(&["--cafile", &good_ca], 1);
    assert!(ok.status.success(), "with the CA: {}", text(&ok));
    assert!(
        stalled_at.elapsed() < Duration::from_secs(2),
        "served while a handshake was stalled"
    );
    let untrusted = publish(&["--cafile", &other_ca], 2);
    assert!(
        !untrusted.status.success(),
        "another CA: {}",
        text(&untrusted)
    );
    let plain = publish(&["-W", "5"], 3);
    assert!(!plain.status.success(), "plain MQTT: {}", text(&plain));
    wait_for(
        "the TLS client's sample is stored",
        Duration::from_secs(20),
        || async {
            let (code, body) = stack
                .get("/api/v1/series?device=tls-dev&series=t&from=0&to=9999999999999")
                .await;
            (code == 200
                && body.to_string().contains("\"points\"")
                && body["points"].as_array()?.len() == 1)
                .then_some(())
        },
    )
    .await;

    // The stalled client is dropped after the connection timeout (2 s).
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(
        stalled_at.elapsed() < Duration::from_secs(15),
        "dropped after {:?}",
        stalled_at.elapsed()
    );
    stack.stop().await;
}

/// A TLS client configuration that trusts only the CA certificate in
/// `ca_pem` (not the system's roots).
fn trusting(ca_pem: &Path) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(ca_pem).expect("read the test CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.expect("PEM")).expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `localhost:port`, verified by `tls`.
async fn tls_connect(tls: &tokio_rustls::TlsConnector, port: u16) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name");
    tls.connect(name, tcp).await
}

/// HTTPS GET of `path` (HTTP/1.0, so the body ends at close): status, body.
async fn https_get(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tls_connect(tls, port).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Lines of a child's stderr, collected by a thread (for the assertion
/// messages and for waiting on a line).
fn collect_stderr(child: &mut std::process::Child) -> Arc<std::sync::Mutex<Vec<String>>> {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines").push(line);
        }
    });
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_broker_and_dashboard_over_tls_with_the_real_binaries() {
    let dir = tempfile::tempdir().expect("dir");
    make_certs(dir.path(), "good");
    make_certs(dir.path(), "other");
    let path = |f: &str| dir.path().join(f).display().to_string();
    let (mqtt_tls, http) = (free_port(), free_port());
    let broker_toml = dir.path().join("broker.toml");
    std::fs::write(
        &broker_toml,
        format!(
            "{DEFAULT_BROKER_TOML}\n[v4.2]\nname = \"v4-tls\"\nlisten = \"127.0.0.1:{mqtt_tls}\"\nnext_connection_delay_ms = 0\n\n[v4.2.tls]\ncertpath = {:?}\nkeypath = {:?}\n\n[v4.2.connections]\nconnection_timeout_ms = 5000\nmax_payload_size = 1114112\nmax_inflight_count = 500\ndynamic_filters = true\n",
            path("good-cert.pem"),
            path("good-key.pem")
        ),
    )
    .expect("write broker.toml");
    let mut serve = Command::new(workspace_bin("widgetry"));
    serve
        .current_dir(dir.path())
        .args(["--log-format", "json", "serve"])
        .arg("--broker-config")
        .arg(&broker_toml)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--http-tls-cert", &path("good-cert.pem")])
        .args(["--http-tls-key", &path("good-key.pem")])
        .args(["--database", &path("w.db")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut serve = ChildGuard(serve.spawn().expect("start widgetry serve"));
    let serve_log = collect_stderr(&mut serve.0);

    let good = trusting(&dir.path().join("good-ca.pem"));
    wait_for(
        "serve answers over HTTPS with its ingestor subscribed",
        Duration::from_secs(30),
        || async {
            let m = https_get(&good, http, "/metrics").await.ok();
            m.filter(|(s, b)| *s == 200 && b.contains("widgetry_ingest_subscribed 1"))
                .map(|_| ())
        },
    )
    .await;

    // A client that opens TCP and sends nothing delays nobody.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", http)).expect("connect");
    let stalled_at = Instant::now();
    let started = Instant::now();
    let (status, body) = https_get(&good, http, "/healthz")
        .await
        .expect("a second client is served while one stalls its handshake");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the second client waited {:?}",
        started.elapsed()
    );

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", http)).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(plain, "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // A client that trusts another CA does not get through.
    let other = trusting(&dir.path().join("other-ca.pem"));
    let refused = https_get(&other, http, "/healthz").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("UnknownIssuer")),
        "a client trusting another CA: {refused:?}"
    );

    // The agent over MQTT/TLS, verifying the broker against the test CA.
    let agent = |device: &str, ca: &str| {
        let mut c = Command::new(workspace_bin("widgetry-agent"));
        c.args([
            "--broker",
            &format!("localhost:{mqtt_tls}"),
            "--device",
            device,
        ])
        .args(["--ca-file", &path(ca)])
        .args(["--interval", "200ms", "--batch-max-wait", "200ms"])
        .args(["--spool-dir", &path(&format!("spool-{device}"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        ChildGuard(c.spawn().expect("start widgetry-agent"))
    };
    let mut trusting_agent = agent("tls-agent", "good-ca.pem");
    let agent_log = collect_stderr(&mut trusting_agent.0);

    // Live over wss, subscribed before the samples arrive.
    let tcp_tls = tls_connect(&good, http)
        .await
        .expect("TLS to the web service");
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{http}/api/v1/live"), tcp_tls)
            .await
            .expect("websocket over TLS");
    let subscribe = serde_json::json!({"subscribe": {"devices": ["tls-agent"], "series": null}});
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .expect("subscribe");
    let live = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
                    if v["type"] == "samples" {
                        return v;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("websocket ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no live samples over wss within 30 s; agent: {:?}",
            agent_log.lock().expect("lines")
        )
    });
    assert_eq!(live["device"], "tls-agent", "{live}");

    let points = wait_for(
        "the agent's samples are read back over HTTPS",
        Duration::from_secs(30),
        || async {
            let (s, body) = https_get(
                &good,
                http,
                "/api/v1/series?device=tls-agent&series=mem.used_bytes&from=0&to=9999999999999",
            )
            .await
            .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let n = v["points"].as_array()?.len();
            (s == 200 && n > 0).then_some(n)
        },
    )
    .await;
    assert!(points > 0);

    // An agent given another CA is refused, and says why.
    let mut doubting_agent = agent("doubting-agent", "other-ca.pem");
    let doubts = collect_stderr(&mut doubting_agent.0);
    let expected = [
        format!("localhost:{mqtt_tls}"),
        "does not verify against the CA file".to_string(),
        path("other-ca.pem"),
        "not signed by a CA in that file".to_string(),
    ];
    wait_for(
        "the agent with another CA explains the refusal",
        Duration::from_secs(20),
        || async {
            let lines = doubts.lock().expect("lines");
            lines
                .iter()
                .any(|l| expected.iter().all(|e| l.contains(e.as_str())))
                .then_some(())
        },
    )
    .await;
    drop(doubting_agent);

    // The stalled client is dropped after the handshake timeout, and both
    // failures are counted.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let waited = stalled_at.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(16)).contains(&waited),
        "a stalled handshake is dropped after the 10 s timeout, not after {waited:?}"
    );
    let (_, metrics) = https_get(&good, http, "/metrics").await.expect("metrics");
    for reason in ["failed", "timeout"] {
        let series = format!("widgetry_web_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        assert!(metric(&metrics, &series) >= 1.0, "{series}: {metrics}");
    }
    drop(trusting_agent);
    let log = serve_log.lock().expect("lines").join("\n");
    assert!(
        log.contains("\"https\":true"),
        "serve says it serves HTTPS: {log}"
    );
}
