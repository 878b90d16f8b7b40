//! MQTT over TLS on the embedded broker: a listener with `[v4.*.tls]`
//! serves `mosquitto_pub --cafile` with a certificate made here by a test
//! CA (openssl), refuses plain MQTT and clients that do not trust the
//! certificate, and a client that stalls the handshake delays nobody and
//! is dropped after the connection timeout.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
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
