//! What a slow or careless HTTP client costs the web service: a connection
//! that sends half a header, nothing, or stays idle after a response is
//! closed after the header-read timeout (slowloris), while others are
//! served; a websocket message over the limit ends the stream with close
//! code 1009.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use widgetry_server::web::live::MAX_CLIENT_MESSAGE;
use widgetry_server::web::server::HEADER_READ_TIMEOUT;

/// Sends `first` on a new connection, then reads until the server closes
/// it (or `deadline` passes: then panics). Returns what was read and when
/// the server closed it.
fn held_for(addr: std::net::SocketAddr, first: &[u8], deadline: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(deadline)).expect("timeout");
    let start = Instant::now();
    s.write_all(first).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "{:?}: still open after {:?} ({e}); read {:?}",
                String::from_utf8_lossy(first),
                start.elapsed(),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_http_clients_are_dropped_and_others_served() {
    let stack = Stack::start().await;
    let addr = stack.http;
    let deadline = HEADER_READ_TIMEOUT * 3;
    let slow = [
        &b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nX-Slow: "[..],
        &b""[..],
        &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
    ];
    let held: Vec<_> = slow
        .iter()
        .map(|first| {
            let first = first.to_vec();
            tokio::task::spawn_blocking(move || held_for(addr, &first, deadline))
        })
        .collect();
    // Meanwhile the service answers everyone else.
    for _ in 0..20 {
        let (code, _) = stack.get("/api/v1/devices").await;
        assert_eq!(code, 200);
    }
    let mut results = Vec::new();
    for h in held {
        results.push(h.await.expect("join"));
    }
    let (half, nothing, idle) = (&results[0], &results[1], &results[2]);
    assert!(
        half.0.is_empty() || half.0.starts_with("HTTP/1.1 408"),
        "{half:?}"
    );
    assert!(nothing.0.is_empty(), "{nothing:?}");
    assert!(
        idle.0.starts_with("HTTP/1.1 200"),
        "the request was answered: {idle:?}"
    );
    for (what, r) in [
        ("half a header", half),
        ("nothing", nothing),
        ("idle", idle),
    ] {
        assert!(
            r.1 >= HEADER_READ_TIMEOUT / 2,
            "{what}: closed after {:?}, before the timeout",
            r.1
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_websocket_message_gets_close_code_1009() {
    let stack = Stack::start().await;
    let url = format!("ws://{}/api/v1/live", stack.http);
    // Just over the limit (read whole, refused by the server) and far over
    // it (refused by the codec before it is read).
    for size in [MAX_CLIENT_MESSAGE + 1, 8 * MAX_CLIENT_MESSAGE] {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("websocket connects");
        let _ = ws.send(Message::Text("x".repeat(size).into())).await;
        let close = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(m) = ws.next().await {
                if let Ok(Message::Close(frame)) = m {
                    return frame;
                }
            }
            None
        })
        .await
        .expect("the server closes the stream");
        let frame = close.unwrap_or_else(|| panic!("{size} bytes: a close frame with a code"));
        assert_eq!(u16::from(frame.code), 1009, "{size} bytes: {frame:?}");
        assert!(frame.reason.contains("limit"), "{frame:?}");
    }
    // A subscription of normal size still works.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("websocket connects");
    ws.send(Message::Text(
        serde_json::json!({"subscribe": {"devices": null, "series": null, "status": true, "events": false, "since": null}})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a reply")
        .expect("a message")
        .expect("not an error");
    assert!(matches!(reply, Message::Text(_)), "{reply:?}");
    stack.stop().await;
}
