//! Accounts made with `widgetry device …` on a running `serve --auth
//! required`: a device logs in with its generated password, a wrong one or
//! none is refused (and the agent says why), a rotated password replaces
//! the old one, a removed account is refused, connections that logged in
//! with a rotated or removed account's credentials are disconnected, an
//! observer reads everything and publishes nothing. All within a second of the command,
//! without a restart.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use widgetry_server::config::roles::AuthMode;
use widgetry_server::config::{DEFAULT_BROKER_TOML, Database};

/// Runs `widgetry device ARGS --database DB`, with `stdin` as its input.
fn device(db: &Database, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(workspace_bin("widgetry"))
        .arg("device")
        .args(args)
        .arg("--database")
        .arg(db.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run widgetry device");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("widgetry device ends")
}

/// `widgetry device add|rotate …` and the password it printed.
fn new_password(db: &Database, args: &[&str]) -> String {
    let o = device(db, args, "");
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    let pw = String::from_utf8(o.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert_eq!(
        pw.len(),
        32,
        "one generated password alone on stdout: {pw:?}"
    );
    pw
}

/// A one-shot subscription (`-E`: exit once subscribed) as `user`.
fn login(port: u16, user: &str, password: &str) -> Output {
    let port = port.to_string();
    mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "311",
            "-p",
            &port,
            "-u",
            user,
            "-P",
            password,
            "-t",
            "widgetry/v1/x/ack",
            "-E",
        ],
    )
}

/// How a held connection ended.
#[derive(Debug)]
enum Held {
    /// The broker closed it (or sent DISCONNECT), after this long.
    Ended(Duration),
    /// It was still open when the test stopped watching.
    Open,
}

/// A connection that logs in as `user` (client id `id`), waits for its
/// CONNACK and then stays connected until the broker ends it. The task
/// reports how long after `since` was first set it ended.
async fn hold(
    port: u16,
    id: &str,
    user: &str,
    password: &str,
) -> (
    tokio::task::JoinHandle<Held>,
    tokio::sync::watch::Sender<Option<std::time::Instant>>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(o, 10);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let (since_tx, since) = tokio::sync::watch::channel(None::<std::time::Instant>);
    let task = tokio::spawn(async move {
        let _client = client;
        let mut connected_tx = Some(connected_tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ended = match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => return Held::Open,
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(());
                    }
                    false
                }
                Ok(Ok(Event::Incoming(Packet::Disconnect))) | Ok(Err(_)) => true,
                Ok(Ok(_)) => false,
            };
            if ended {
                let at = since.borrow().unwrap_or_else(std::time::Instant::now);
                return Held::Ended(at.elapsed());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .expect("connected within 10 s")
        .expect("CONNACK");
    (task, since_tx)
}

/// Waits until logging in as `user` with `password` succeeds (`want`) or
/// is refused (`!want`): a running serve reloads accounts every second.
async fn wait_login(port: u16, user: &str, password: &str, want: bool) {
    let what = format!("{user} login {}", if want { "accepted" } else { "refused" });
    let (u, p) = (user.to_string(), password.to_string());
    wait_for(&what, Duration::from_secs(10), || {
        let (u, p) = (u.clone(), p.clone());
        async move {
            let o = tokio::task::spawn_blocking(move || login(port, &u, &p))
                .await
                .expect("join");
            (o.status.success() == want).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_accounts_log_in_rotate_and_are_removed_while_serve_runs() {
    let stack = Stack::with_auth(Default::default(), DEFAULT_BROKER_TOML, AuthMode::Required).await;
    let port = stack.mqtt.port();
    let db = stack.db.clone();

    // No account yet: nobody but the server gets in.
    let o = login(port, "d1", "anything-at-all");
    assert!(!o.status.success(), "{}", text(&o));
    let anon = mosquitto("mosquitto_sub", &["-p", &port.to_string(), "-t", "#", "-E"]);
    assert!(!anon.status.success(), "anonymous: {}", text(&anon));

    let pw = new_password(&db, &["add", "d1"]);
    wait_login(port, "d1", &pw, true).await;
    let o = login(port, "d1", "wrong-password-0000");
    assert!(
        stderr_says_lower(&o, "bad user name or password"),
        "{}",
        text(&o)
    );
    // The same name again is refused and changes nothing.
    let again = device(&db, &["add", "d1"], "");
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(stderr_says(&again, "exists already"), "{}", text(&again));
    assert!(
        again.stdout.is_empty(),
        "no password printed: {}",
        text(&again)
    );
    wait_login(port, "d1", &pw, true).await;

    // The agent with the account delivers; with a wrong password it says
    // what is wrong (and never prints the password).
    let dir = tempfile::tempdir().expect("dir");
    let agent = |pass: &str, log: &str| {
        ChildGuard(
            Command::new(workspace_bin("widgetry-agent"))
                .current_dir(dir.path())
                .args(["--broker", &format!("127.0.0.1:{port}"), "--device", "d1"])
                .args(["--spool-dir", &format!("spool-{log}")])
                .args(["--interval", "100ms", "--batch-max-wait", "200ms"])
                .env("WIDGETRY_MQTT_USERNAME", "d1")
                .env("WIDGETRY_MQTT_PASSWORD", pass)
                .stderr(std::fs::File::create(dir.path().join(log)).expect("log"))
                .spawn()
                .expect("start widgetry-agent"),
        )
    };
    let bad = agent("not-the-password", "bad.log");
    let bad_log = dir.path().join("bad.log");
    wait_for(
        "the agent says it was refused",
        Duration::from_secs(20),
        || async {
            let log = std::fs::read_to_string(&bad_log).unwrap_or_default();
            log.contains("bad username or password").then_some(log)
        },
    )
    .await;
    drop(bad);
    let log = std::fs::read_to_string(&bad_log).expect("log");
    assert!(
        !log.contains("not-the-password"),
        "password in the log: {log}"
    );
    let good = agent(&pw, "good.log");
    wait_for(
        "d1's samples are stored",
        Duration::from_secs(20),
        || async {
            let (_, devices) = stack.get("/api/v1/devices").await;
            devices
                .as_array()?
                .iter()
                .any(|d| {
                    d["device"] == "d1" && d["series"].as_array().is_some_and(|s| !s.is_empty())
                })
                .then_some(())
        },
    )
    .await;
    drop(good);

    // Rotation: the old password stops working, the new one works, and a
    // connection that logged in with the old one is disconnected.
    let (held, since) = hold(port, "d1-watch", "d1", &pw).await;
    since.send_replace(Some(std::time::Instant::now()));
    let rotated = new_password(&db, &["rotate", "d1"]);
    assert_ne!(rotated, pw);
    let kicked = held.await.expect("join");
    println!("connection with the rotated password: {kicked:?}");
    assert!(
        matches!(kicked, Held::Ended(t) if t < Duration::from_secs(10)),
        "the old password's connection is ended by the rotation: {kicked:?}"
    );
    wait_login(port, "d1", &pw, false).await;
    wait_login(port, "d1", &rotated, true).await;
    // A chosen password from stdin (too short ones are refused).
    let short = device(&db, &["rotate", "d1", "--password-stdin"], "short\n");
    assert_eq!(short.status.code(), Some(1), "{}", text(&short));
    let chosen = device(
        &db,
        &["rotate", "d1", "--password-stdin"],
        "correct-horse-battery\n",
    );
    assert!(chosen.status.success(), "{}", text(&chosen));
    assert!(chosen.stdout.is_empty(), "a chosen password is not echoed");
    wait_login(port, "d1", "correct-horse-battery", true).await;

    // An observer reads everything and publishes nothing.
    let eye = new_password(&db, &["add", "viewer", "--observer"]);
    wait_login(port, "viewer", &eye, true).await;
    let p = port.to_string();
    let sub = mosquitto(
        "mosquitto_sub",
        &[
            "-p", &p, "-u", "viewer", "-P", &eye, "-t", "#", "-C", "1", "-W", "10",
        ],
    );
    assert!(sub.status.success(), "observer reads #: {}", text(&sub));
    let pubbed = mosquitto(
        "mosquitto_pub",
        &[
            "-V",
            "5",
            "-p",
            &stack.mqtt5.port().to_string(),
            "-u",
            "viewer",
            "-P",
            &eye,
            "-q",
            "1",
            "-t",
            "widgetry/v1/viewer/samples",
            "-m",
            "{}",
        ],
    );
    assert!(
        stderr_says_lower(&pubbed, "not authori"),
        "observer publish denied: {}",
        text(&pubbed)
    );

    let list = device(&db, &["list"], "");
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        listed.contains("d1") && listed.contains("viewer") && listed.contains("observer"),
        "{listed}"
    );
    assert!(!listed.contains("argon2"), "no hashes listed: {listed}");

    // Removal: refused from now on, and its open connection is ended;
    // another account's connection stays.
    let (held, since) = hold(port, "d1-watch", "d1", "correct-horse-battery").await;
    let (other, _) = hold(port, "viewer-watch", "viewer", &eye).await;
    since.send_replace(Some(std::time::Instant::now()));
    let removed = device(&db, &["remove", "d1"], "");
    assert!(removed.status.success(), "{}", text(&removed));
    let kicked = held.await.expect("join");
    println!("connection of the removed account: {kicked:?}");
    assert!(
        matches!(kicked, Held::Ended(t) if t < Duration::from_secs(10)),
        "the removed account's connection is ended: {kicked:?}"
    );
    wait_login(port, "d1", "correct-horse-battery", false).await;
    assert!(!other.is_finished(), "the observer's connection stays open");
    other.abort();
    let gone = device(&db, &["remove", "d1"], "");
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    stack.stop().await;
}
