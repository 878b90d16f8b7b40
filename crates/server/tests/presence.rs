//! Presence from activity (`crate::presence`): plain `mosquitto_pub`
//! clients that never publish a status are `active` while they publish at
//! their cadence, turn `stale` within 3 intervals of stopping (pushed on the
//! live stream, not polled), while the others stay `active`; a retained
//! `offline` status wins at once. `/api/v1/devices` and `/api/v1/fleet`
//! agree with the stream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);
const DEVICES: usize = 6;
const STOPPED: usize = 3;
/// The publishers' cadence.
const CADENCE: Duration = Duration::from_millis(500);
/// Bound of every publisher: it stops after this many messages (60 s).
const MAX_MESSAGES: u32 = 120;

/// One `mosquitto_pub -l` per device, fed a sample every [`CADENCE`] by a
/// thread until `stop` is set or [`MAX_MESSAGES`] were written.
struct Plain {
    child: Child,
    stop: Arc<AtomicBool>,
    feeder: Option<std::thread::JoinHandle<()>>,
}

impl Plain {
    fn start(port: u16, device: &str) -> Plain {
        let mut child = Command::new(require_tool("mosquitto_pub"))
            .args(["-V", "311", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", "1", "-l", "-i", &format!("presence-{device}")])
            .args(["-t", &format!("widgetry/v1/{device}/samples/json")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_pub");
        let mut stdin = child.stdin.take().expect("stdin");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let feeder = std::thread::spawn(move || {
            for i in 0..MAX_MESSAGES {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if writeln!(stdin, r#"{{"series":"temp","value":{i}}}"#).is_err() {
                    break;
                }
                let _ = stdin.flush();
                // The device's cadence, not synchronisation.
                std::thread::sleep(CADENCE);
            }
        });
        Plain {
            child,
            stop,
            feeder: Some(feeder),
        }
    }

    /// Stops publishing; the client exits at the end of its input.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(f) = self.feeder.take() {
            f.join().expect("feeder");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// device → (presence, interval_ms) from an API answer's device list.
fn presences(devices: &serde_json::Value) -> BTreeMap<String, (String, Option<i64>)> {
    devices
        .as_array()
        .expect("a device list")
        .iter()
        .map(|d| {
            (
                d["device"].as_str().expect("device").to_string(),
                (
                    d["presence"].as_str().expect("presence").to_string(),
                    d["interval_ms"].as_i64(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_are_active_turn_stale_when_they_stop_and_offline_wins() {
    let stack = Stack::start().await;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("plain-{i}")).collect();

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/live", stack.http))
        .await
        .expect("websocket connects");
    let sub = serde_json::json!({"subscribe": {"devices": null, "series": [], "status": true}});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .expect("subscribe");

    let mut clients: Vec<Plain> = names
        .iter()
        .map(|d| Plain::start(stack.mqtt.port(), d))
        .collect();

    // Every device active, with a cadence learned near 500 ms.
    let learned = wait_for(
        "every plain client active with its cadence learned",
        Duration::from_secs(30),
        || async {
            let (s, v) = stack.get("/api/v1/devices").await;
            let p = presences(&v);
            let ok = s == 200
                && names.iter().all(|n| {
                    p.get(n).is_some_and(|(state, iv)| {
                        state == "active" && iv.is_some_and(|i| (300..=1_500).contains(&i))
                    })
                });
            ok.then_some(p)
        },
    )
    .await;

    // Half of them stop; each must be pushed as stale within 3 intervals
    // (judged as at least 1 s each: 3 s) plus a tick and a commit.
    let stopped_at = Instant::now();
    for c in clients.iter_mut().take(STOPPED) {
        c.stop();
    }
    let stopped: BTreeSet<String> = names.iter().take(STOPPED).cloned().collect();
    let mut pushed: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = stopped_at + Duration::from_secs(15);
    while pushed.len() < STOPPED && Instant::now() < deadline {
        let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(1), ws.next()).await
        else {
            continue;
        };
        let m: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
        if m["type"] != "presence" {
            continue;
        }
        let device = m["device"].as_str().expect("device").to_string();
        // Each device was pushed `active` when it appeared (those messages
        // may still be queued); after that only the stopped ones change.
        if m["presence"] == "active" {
            continue;
        }
        assert!(
            stopped.contains(&device),
            "only stopped devices change presence, got {m} (learned {learned:?})"
        );
        assert_eq!(m["presence"], "stale", "{m}");
        pushed.entry(device).or_insert_with(|| stopped_at.elapsed());
    }
    assert_eq!(
        pushed.keys().cloned().collect::<BTreeSet<_>>(),
        stopped,
        "every stopped client was pushed as stale within 15 s"
    );
    for (d, after) in &pushed {
        assert!(
            *after <= Duration::from_secs(5),
            "{d} was pushed stale {after:?} after it stopped: more than 3 intervals (3 s) + 2 s"
        );
    }

    // The API says the same (its answers are shared for up to a second),
    // in both lists.
    let want = |n: &String| {
        if stopped.contains(n) {
            "stale"
        } else {
            "active"
        }
    };
    for path in ["/api/v1/devices", "/api/v1/fleet"] {
        wait_for(&format!("{path} agrees with the stream"), T, || async {
            let (_, v) = stack.get(path).await;
            let list = if path.ends_with("fleet") {
                &v["devices"]
            } else {
                &v
            };
            let p = presences(list);
            names
                .iter()
                .all(|n| p.get(n).is_some_and(|x| x.0 == want(n)))
                .then_some(())
        })
        .await;
    }

    // A retained offline status wins over activity at once.
    let last = names.last().expect("a device");
    mosquitto_pub(
        stack.mqtt.port(),
        &format!("widgetry/v1/{last}/status"),
        r#"{"state":"offline"}"#,
        true,
    );
    let offline_at = Instant::now();
    let mut saw_offline = false;
    while !saw_offline && offline_at.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(1), ws.next()).await
        {
            let m: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
            saw_offline =
                m["type"] == "presence" && m["device"] == *last && m["presence"] == "offline";
        }
    }
    assert!(
        saw_offline,
        "{last}'s offline status was pushed as presence offline"
    );
    wait_for("/api/v1/devices says offline", T, || async {
        let (_, v) = stack.get("/api/v1/devices").await;
        (presences(&v)[last].0 == "offline").then_some(())
    })
    .await;
    assert!(
        offline_at.elapsed() < Duration::from_secs(5),
        "offline took {:?}",
        offline_at.elapsed()
    );

    drop(clients);
    stack.stop().await;
}
