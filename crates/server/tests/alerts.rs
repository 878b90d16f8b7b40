//! Health rules end to end: a threshold rule from the config fires when a
//! plain client's value crosses it, stays firing while the value hovers
//! between the threshold and its clear level, and resolves below it; each
//! transition is stored (`/api/v1/alerts`), published retained on
//! `widgetry/v1/{device}/alerts` (read with `mosquitto_sub`) and POSTed to
//! a webhook receiver. A restart of serve while the alert fires neither
//! loses it nor fires it twice. Rules are managed over `/api/v1/rules`
//! with clear errors.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use widgetry_server::config::roles::AlertingConfig;
use widgetry_server::rules::RuleSpec;
use widgetry_server::rules::webhook::WebhookUrl;

const T: Duration = Duration::from_secs(20);

/// A webhook receiver on a free port: records each POST body, answers 200.
fn receiver() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Default::default();
    let out = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len.min(1 << 20)];
            if r.read_exact(&mut body).is_ok()
                && let Ok(v) = serde_json::from_slice(&body)
            {
                out.lock().expect("lock").push(v);
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (port, got)
}

fn publish(stack: &Stack, device: &str, value: f64) {
    mosquitto_pub(
        stack.mqtt.port(),
        &format!("widgetry/v1/{device}/samples/json"),
        &format!(r#"{{"series":"temp","value":{value}}}"#),
        false,
    );
}

/// The retained `…/alerts` message of `device`, read by `mosquitto_sub -V 5`.
fn retained_alerts(stack: &Stack, device: &str) -> serde_json::Value {
    let out = mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "5",
            "-p",
            &stack.mqtt5.port().to_string(),
            "-t",
            &format!("widgetry/v1/{device}/alerts"),
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

async fn alerts(stack: &Stack, query: &str) -> Vec<serde_json::Value> {
    let (s, v) = stack.get(&format!("/api/v1/alerts?{query}")).await;
    assert_eq!(s, 200, "{v}");
    v["alerts"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_rule_fires_is_published_and_resolves_across_a_restart() {
    let (hook_port, hooks) = receiver();
    let rule = RuleSpec {
        name: "hot".into(),
        devices: "plant-*".into(),
        series: Some("temp".into()),
        when: "> 50".into(),
        hold: None,
        clear: Some("< 40".into()),
        severity: "critical".into(),
    };
    let mut stack = Stack::with_alerting(AlertingConfig {
        rules: vec![rule],
        webhook: Some(
            WebhookUrl::parse(&format!("http://127.0.0.1:{hook_port}/hook")).expect("url"),
        ),
    })
    .await;

    // Below the threshold, and a device the rule does not watch: nothing.
    publish(&stack, "plant-1", 30.0);
    publish(&stack, "office-1", 99.0);
    wait_for("both samples stored", T, || async {
        (stack.count("SELECT COUNT(*) FROM devices").await == 2).then_some(())
    })
    .await;
    assert!(alerts(&stack, "").await.is_empty());

    // Over it: firing, stored, retained, posted.
    publish(&stack, "plant-1", 61.5);
    let firing = wait_for("the alert fires", T, || async {
        alerts(&stack, "state=firing").await.into_iter().next()
    })
    .await;
    assert_eq!(firing["rule"], "hot");
    assert_eq!(firing["device"], "plant-1");
    assert_eq!(firing["series"], "temp");
    assert_eq!(firing["severity"], "critical");
    assert_eq!(firing["value"], 61.5);
    let id = firing["id"].as_i64().expect("id");
    let retained = wait_for("the retained …/alerts lists it", T, || async {
        let m = retained_alerts(&stack, "plant-1");
        (m["firing"].as_array().is_some_and(|f| f.len() == 1)).then_some(m)
    })
    .await;
    assert_eq!(retained["firing"][0]["rule"], "hot", "{retained}");
    wait_for("the webhook got the firing", T, || async {
        let h = hooks.lock().expect("lock");
        h.iter()
            .any(|b| b["state"] == "firing" && b["device"] == "plant-1")
            .then_some(())
    })
    .await;

    wait_for("the firing counted and sent", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_alerts_fired_total") == 1.0
            && metric(&m, "widgetry_alerts_firing") == 1.0
            && metric(&m, "widgetry_alerts_webhook_sent_total") == 1.0)
            .then_some(())
    })
    .await;

    // Restart while firing: the same alert is still open, and a value over
    // the threshold again does not fire a second one.
    stack.restart().await;
    let open = alerts(&stack, "state=open").await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["id"], id);
    assert_eq!(open[0]["state"], "firing");
    publish(&stack, "plant-1", 70.0);
    // Hovering between the clear level and the threshold keeps it firing.
    publish(&stack, "plant-1", 45.0);
    publish(&stack, "plant-1", 51.0);
    wait_for("the three samples stored", T, || async {
        (stack.count("SELECT COUNT(*) FROM batches").await >= 6).then_some(())
    })
    .await;

    // Below the clear level: resolved everywhere.
    publish(&stack, "plant-1", 35.0);
    let resolved = wait_for("the alert resolves", T, || async {
        alerts(&stack, "state=resolved").await.into_iter().next()
    })
    .await;
    assert_eq!(resolved["id"], id, "the same alert resolves");
    assert!(resolved["resolved_ms"].as_i64().is_some());
    let all = alerts(&stack, "rule=hot").await;
    assert_eq!(all.len(), 1, "fired once across the restart: {all:?}");
    wait_for("the retained …/alerts is empty again", T, || async {
        let m = retained_alerts(&stack, "plant-1");
        (m["firing"].as_array().is_some_and(|f| f.is_empty())).then_some(())
    })
    .await;
    wait_for("the webhook got the resolution", T, || async {
        let h = hooks.lock().expect("lock");
        h.iter().any(|b| b["state"] == "resolved").then_some(())
    })
    .await;
    let firings = hooks
        .lock()
        .expect("lock")
        .iter()
        .filter(|b| b["state"] == "firing")
        .count();
    assert_eq!(firings, 1, "one firing posted");
    let (_, metrics) = stack.get_text("/metrics").await;
    // Counters are this process's (since the restart): nothing fired again.
    assert_eq!(metric(&metrics, "widgetry_alerts_fired_total"), 0.0);
    assert_eq!(metric(&metrics, "widgetry_alerts_resolved_total"), 1.0);
    assert_eq!(
        metric(&metrics, "widgetry_alerts_lagged_batches_total"),
        0.0
    );
    wait_for("the resolution counted as sent", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_alerts_webhook_sent_total") == 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&metrics, "widgetry_alerts_firing"), 0.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_managed_over_the_api_with_clear_errors() {
    let stack = Stack::with_alerting(AlertingConfig {
        rules: vec![RuleSpec {
            name: "from-config".into(),
            devices: "*".into(),
            series: None,
            when: "stale".into(),
            hold: Some("1m".into()),
            clear: None,
            severity: "warning".into(),
        }],
        webhook: None,
    })
    .await;
    let http = stack.http;
    let send = move |method: &'static str, path: &'static str, body: Option<&'static str>| {
        tokio::task::spawn_blocking(move || http_send(http, method, path, body))
    };
    let ok = r#"{"name":"cpu-high","devices":"line-*","series":"cpu.usage_pct","when":"> 90","for":"5m"}"#;
    let (s, b) = send("POST", "/api/v1/rules", Some(ok)).await.expect("join");
    assert_eq!(s, 201, "{b}");
    let (s, b) = send("POST", "/api/v1/rules", Some(ok)).await.expect("join");
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("PUT /api/v1/rules/cpu-high"), "{b}");
    let bad = r#"{"name":"x","series":"cpu","when":"above 90"}"#;
    let (s, b) = send("POST", "/api/v1/rules", Some(bad))
        .await
        .expect("join");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("when:") && b.contains("> N"), "{b}");
    let (s, b) = send("POST", "/api/v1/rules", Some(r#"{"name":"x","wen":"> 1"}"#))
        .await
        .expect("join");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("unknown field"), "{b}");
    let (s, b) = send(
        "PUT",
        "/api/v1/rules/cpu-high",
        Some(r#"{"name":"cpu-high","series":"cpu.usage_pct","when":"> 95"}"#),
    )
    .await
    .expect("join");
    assert_eq!(s, 200, "{b}");
    let (_, list) = stack.get("/api/v1/rules").await;
    let rules = list["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 2, "{list}");
    let cpu = rules
        .iter()
        .find(|r| r["name"] == "cpu-high")
        .expect("cpu-high");
    assert_eq!(cpu["when"], "> 95");
    assert_eq!(cpu["source"], "api");
    // The new kinds round-trip as they were written.
    for (body, name, when) in [
        (
            r#"{"name":"surge","series":"temp","when":"rate > 5/s","clear":"rate < 1/s"}"#,
            "surge",
            "rate > 5/s",
        ),
        (
            r#"{"name":"quiet","series":"temp","when":"no data","for":"3 intervals"}"#,
            "quiet",
            "no data",
        ),
        (
            r#"{"name":"junk","when":"rejects > 10 in 5m","severity":"critical"}"#,
            "junk",
            "rejects > 10 in 5m",
        ),
        (
            r#"{"name":"lossy","when":"gaps >= 1 in 1h"}"#,
            "lossy",
            "gaps >= 1 in 1h",
        ),
    ] {
        let (s, b) = send("POST", "/api/v1/rules", Some(body))
            .await
            .expect("join");
        assert_eq!(s, 201, "{body}: {b}");
        let (s, one) = stack.get(&format!("/api/v1/rules/{name}")).await;
        assert_eq!(s, 200, "{one}");
        assert_eq!(one["when"], when, "{one}");
    }
    let (_, quiet) = stack.get("/api/v1/rules/quiet").await;
    assert_eq!(quiet["for"], "3 intervals", "{quiet}");
    for (body, needles) in [
        (
            r#"{"name":"x","series":"temp","when":"rate > 5"}"#,
            &["when:", "rate > 5", "give the rate's unit", "/s"][..],
        ),
        (
            r#"{"name":"x","series":"temp","when":"no data","for":"0 intervals"}"#,
            &["for:", "1 to 1000"][..],
        ),
        (
            r#"{"name":"x","when":"rejects > 10"}"#,
            &["when:", "in 5m"][..],
        ),
        (
            r#"{"name":"x","when":"gaps > 1 in 30d"}"#,
            &["when:", "24 hours"][..],
        ),
    ] {
        let (s, b) = send("POST", "/api/v1/rules", Some(body))
            .await
            .expect("join");
        assert_eq!(s, 400, "{body}: {b}");
        for n in needles {
            assert!(b.contains(n), "{n:?} missing from {b}");
        }
    }
    let (_, list) = stack.get("/api/v1/rules").await;
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(6), "{list}");
    let (s, b) = send("DELETE", "/api/v1/rules/from-config", None)
        .await
        .expect("join");
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("config file"), "{b}");
    let (s, _) = send("DELETE", "/api/v1/rules/cpu-high", None)
        .await
        .expect("join");
    assert_eq!(s, 204);
    let (s, _) = send("DELETE", "/api/v1/rules/cpu-high", None)
        .await
        .expect("join");
    assert_eq!(s, 404);
    let (s, b) = stack.get("/api/v1/alerts?state=burning").await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = stack.get("/api/v1/alerts?limit=0").await;
    assert_eq!(s, 400, "{b}");
    stack.stop().await;
}

fn rule(name: &str, devices: &str, series: Option<&str>, when: &str) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        devices: devices.into(),
        series: series.map(Into::into),
        when: when.into(),
        hold: None,
        clear: None,
        severity: "warning".into(),
    }
}

fn publish_at(stack: &Stack, device: &str, ts: i64, value: f64) {
    mosquitto_pub(
        stack.mqtt.port(),
        &format!("widgetry/v1/{device}/samples/json"),
        &format!(r#"{{"series":"temp","ts":{ts},"value":{value}}}"#),
        false,
    );
}

/// The alerts of `rule` (newest first).
async fn alerts_of(stack: &Stack, rule: &str) -> Vec<serde_json::Value> {
    alerts(stack, &format!("rule={rule}")).await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A live-stream client subscribed to status (no samples) that collects
/// the `alert` messages it gets.
async fn alert_watcher(stack: &Stack) -> Arc<Mutex<Vec<serde_json::Value>>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{}/api/v1/live", stack.http);
    let (mut ws, _): (Ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    ws.send(Message::Text(
        r#"{"subscribe":{"status":true,"series":[]}}"#.into(),
    ))
    .await
    .expect("subscribe");
    // The subscription is in force once `hello` comes back.
    loop {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"hello\"") => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("no hello from the live stream: {other:?}"),
        }
    }
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Default::default();
    let out = got.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str())
                && v["type"] == "alert"
            {
                out.lock().expect("lock").push(v);
            }
        }
    });
    got
}

async fn pushed(
    got: &Arc<Mutex<Vec<serde_json::Value>>>,
    rule: &str,
    state: &str,
) -> serde_json::Value {
    wait_for(
        &format!("the live stream pushes {rule} {state}"),
        T,
        || async {
            got.lock()
                .expect("lock")
                .iter()
                .find(|m| m["rule"] == rule && m["state"] == state)
                .cloned()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_no_data_rejects_and_gaps_rules_fire_resolve_and_are_pushed_live() {
    let surge = RuleSpec {
        clear: Some("rate < 1/s".into()),
        ..rule("surge", "plant-*", Some("temp"), "rate > 5/s")
    };
    let quiet = RuleSpec {
        hold: Some("2 intervals".into()),
        ..rule("quiet", "quiet-*", Some("temp"), "no data")
    };
    let junk = rule("junk", "bad-*", None, "rejects > 2 in 5s");
    let lossy = rule("lossy", "lossy-*", None, "gaps > 0 in 1h");
    let idle = RuleSpec {
        hold: Some("5s".into()),
        ..rule("idle", "idle-*", Some("temp"), "no data")
    };
    let mut stack = Stack::with_alerting(AlertingConfig {
        rules: vec![surge, quiet, junk, lossy, idle],
        webhook: None,
    })
    .await;
    // `quiet-*` devices are judged by a 1 s interval, so `2 intervals` is
    // 2 s of silence.
    stack.cfg.presence.intervals = vec![("quiet-*".into(), 1_000)];
    stack.restart().await;
    let pushes = alert_watcher(&stack).await;

    // Rate: 2/s, then 18/s (fires), then 4/s (between the clear level and
    // the threshold: still firing), then 0.5/s (resolves).
    let b = widgetry_common::now_ms() - 60_000;
    publish_at(&stack, "plant-1", b, 10.0);
    publish_at(&stack, "plant-1", b + 1_000, 12.0);
    publish_at(&stack, "plant-1", b + 2_000, 30.0);
    let firing = wait_for("the rate rule fires", T, || async {
        alerts_of(&stack, "surge")
            .await
            .into_iter()
            .find(|a| a["state"] == "firing")
    })
    .await;
    assert_eq!(firing["device"], "plant-1");
    assert_eq!(firing["series"], "temp");
    assert_eq!(firing["value"], 18.0, "(30 - 12) / 1 s: {firing}");
    assert_eq!(firing["firing_ms"], b + 2_000, "{firing}");
    let pushed_firing = pushed(&pushes, "surge", "firing").await;
    assert_eq!(pushed_firing["device"], "plant-1");
    assert_eq!(pushed_firing["severity"], "warning");
    assert_eq!(pushed_firing["value"], 18.0);
    publish_at(&stack, "plant-1", b + 3_000, 34.0);
    publish_at(&stack, "plant-1", b + 4_000, 34.5);
    let resolved = wait_for("the rate rule resolves", T, || async {
        alerts_of(&stack, "surge")
            .await
            .into_iter()
            .find(|a| a["state"] == "resolved")
    })
    .await;
    assert_eq!(
        resolved["resolved_ms"],
        b + 4_000,
        "resolved by the 0.5/s sample, not the 4/s one: {resolved}"
    );
    assert_eq!(alerts_of(&stack, "surge").await.len(), 1, "no flapping");
    pushed(&pushes, "surge", "resolved").await;

    // No data: one sample, then silence fires it; the next sample resolves.
    let sent = widgetry_common::now_ms();
    publish(&stack, "quiet-1", 1.0);
    let silent = wait_for("the no-data rule fires", T, || async {
        alerts_of(&stack, "quiet")
            .await
            .into_iter()
            .find(|a| a["state"] == "firing")
    })
    .await;
    assert_eq!(silent["series"], "temp");
    let fired_at = silent["firing_ms"].as_i64().expect("firing_ms");
    assert!(
        fired_at - sent >= 2_000,
        "fired after {} ms of silence, before 2 intervals of 1 s",
        fired_at - sent
    );
    pushed(&pushes, "quiet", "firing").await;
    publish(&stack, "quiet-1", 2.0);
    wait_for("data back resolves the no-data alert", T, || async {
        alerts_of(&stack, "quiet")
            .await
            .into_iter()
            .find(|a| a["state"] == "resolved")
    })
    .await;
    pushed(&pushes, "quiet", "resolved").await;

    // Rejects: three malformed payloads within 5 s fire; a good one does
    // not count; the window slides past them and the alert resolves.
    publish(&stack, "bad-1", 1.0);
    for _ in 0..3 {
        mosquitto_pub(
            stack.mqtt.port(),
            "widgetry/v1/bad-1/samples/json",
            "{not json",
            false,
        );
    }
    let junk = wait_for("the rejects rule fires", T, || async {
        alerts_of(&stack, "junk")
            .await
            .into_iter()
            .find(|a| a["state"] == "firing")
    })
    .await;
    assert_eq!(junk["device"], "bad-1");
    assert_eq!(junk["series"], "");
    assert_eq!(junk["value"], 3.0, "three rejects counted: {junk}");
    wait_for(
        "the rejects alert resolves as the window slides",
        T,
        || async {
            alerts_of(&stack, "junk")
                .await
                .into_iter()
                .find(|a| a["state"] == "resolved")
        },
    )
    .await;
    pushed(&pushes, "junk", "resolved").await;

    // Gaps: a device reports seqs 1-3 of its session lost.
    {
        use rumqttc::{AsyncClient, MqttOptions, QoS};
        use widgetry_proto::{DecodedBatch, SessionId};
        let mut opts = MqttOptions::new("lossy-1", "127.0.0.1", stack.mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (c, mut ev) = AsyncClient::new(opts, 16);
        let driver = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        let session = SessionId([7; 16]);
        let batch = DecodedBatch {
            session,
            seq: 4,
            series: Vec::new(),
            runs: Vec::new(),
            events: Vec::new(),
            gaps: vec![widgetry_proto::Gap {
                session,
                from_seq: 1,
                to_seq: 3,
                samples: 30,
                from_ts_ms: b,
                to_ts_ms: b + 3_000,
            }],
            settled_through: 0,
        };
        c.publish(
            "widgetry/v1/lossy-1/samples",
            QoS::AtLeastOnce,
            false,
            batch.encode(),
        )
        .await
        .expect("queue the batch");
        let lossy = wait_for("the gaps rule fires", T, || async {
            alerts_of(&stack, "lossy")
                .await
                .into_iter()
                .find(|a| a["state"] == "firing")
        })
        .await;
        assert_eq!(lossy["device"], "lossy-1");
        assert_eq!(lossy["value"], 1.0, "one gap report: {lossy}");
        driver.abort();
    }
    pushed(&pushes, "lossy", "firing").await;

    // A restart: `idle-1` sent once just before it, and its no-data rule
    // does not fire in the new process, which has not seen the series.
    // `idle-2` sends once after the restart; by the time its silence fires,
    // `idle-1` has been silent longer in this process's life.
    publish(&stack, "idle-1", 1.0);
    wait_for("idle-1's sample stored", T, || async {
        (stack
            .count("SELECT COUNT(*) FROM devices WHERE device = 'idle-1'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    stack.restart().await;
    assert!(
        alerts_of(&stack, "idle").await.is_empty(),
        "the restart took under 5 s"
    );
    publish(&stack, "idle-2", 1.0);
    wait_for(
        "idle-2's no-data alert fires after the restart",
        T,
        || async {
            alerts_of(&stack, "idle")
                .await
                .into_iter()
                .find(|a| a["device"] == "idle-2" && a["state"] == "firing")
        },
    )
    .await;
    let idle = alerts_of(&stack, "idle").await;
    assert_eq!(idle.len(), 1, "nothing fired for idle-1: {idle:?}");
    // The gaps alert was reloaded and is still firing.
    let open = alerts(&stack, "state=open").await;
    assert!(
        open.iter().any(|a| a["rule"] == "lossy"),
        "the gaps alert survives the restart: {open:?}"
    );
    stack.stop().await;
}
