//! The embedded MQTT broker (rumqttd) on a dedicated thread.
//!
//! rumqttd's `start()` blocks forever and has no stop call, and it logs
//! rather than returns a failure to bind. So we bind its sockets ourselves
//! first and hand them over (which also makes port 0 usable), then wait
//! until the listener accepts connections; the thread ends with the
//! process. Nothing here may touch the database. Who may do what
//! on the broker is decided in [`policy`].

pub mod accounts;
pub mod policy;
pub mod retained;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::Policy;

use tracing::{error, info};

use crate::config::BrokerConfig;

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "MQTT listen address {addr}: {source}; is another broker running? choose other ports with --mqtt-listen and --mqtt5-listen"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker did not start listening on {addr} within {secs} s")]
    NotReady { addr: SocketAddr, secs: u64 },
    #[error("cannot spawn the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Address a local client uses to reach a listener bound to `listen`
/// (an unspecified address such as 0.0.0.0 becomes loopback).
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Puts `policy` in charge of every listener's logins and authorisation.
fn apply_policy(cfg: &mut rumqttd::Config, policy: &Arc<Policy>) {
    for servers in [&mut cfg.v4, &mut cfg.v5].into_iter().flatten() {
        for server in servers.values_mut() {
            let c = &mut server.connections;
            // The policy checks the credentials (rumqttd consults `auth`
            // only without an auth handler).
            c.auth = None;
            c.allow_anonymous = !policy.credentials_on();
            let p = policy.clone();
            c.set_auth_handler(move |_client_id, user: String, pass: String| {
                let p = p.clone();
                async move { p.login(&user, &pass).await }
            });
            let p = policy.clone();
            c.set_authoriser(move |who, action| p.decide(who, action));
            let p = policy.clone();
            c.set_refusal_hook(move |code| p.refused(code));
        }
    }
}

/// Counts the messages subscribers missed because the broker's log dropped
/// them, and says so in the log at most once per 10 s.
pub fn dropped_hook(metrics: Arc<crate::metrics::Metrics>) -> rumqttd::DroppedHook {
    let logged = std::sync::atomic::AtomicU64::new(u64::MAX);
    rumqttd::DroppedHook(Arc::new(move |n| {
        use std::sync::atomic::Ordering;
        let total = metrics.broker_dropped.fetch_add(n, Ordering::Relaxed) + n;
        if policy::first_in_window(&logged) {
            tracing::warn!(
                missed = n,
                total,
                "a subscriber fell behind and missed messages the broker had to drop (QoS 0 flood?); counted in widgetry_broker_dropped_messages_total"
            );
        }
    }))
}

/// Where the broker's first MQTT 3.1.1 and MQTT 5 listeners are bound (a
/// configured port 0 resolved to the port the system chose).
#[derive(Debug, Clone)]
pub struct Listening {
    pub mqtt: SocketAddr,
    pub mqtt5: Option<SocketAddr>,
    /// Listeners that speak MQTT over TLS (`[v4.*.tls]`, `[v5.*.tls]`).
    pub tls: Vec<SocketAddr>,
    /// Asks the broker to disconnect clients whose credentials were revoked.
    pub revalidator: rumqttd::Revalidator,
}

/// [`Listening`]'s addresses.
struct Bound {
    mqtt: SocketAddr,
    mqtt5: Option<SocketAddr>,
    tls: Vec<SocketAddr>,
}

/// Binds every listener of `cfg` now, so a taken port fails here with its
/// address (rumqttd would only log it) and port 0 resolves before anyone
/// needs the address; the broker then listens on these sockets.
fn bind_listeners(cfg: &mut BrokerConfig) -> Result<Bound, BrokerError> {
    let mut found = Bound {
        mqtt: cfg.mqtt_listen,
        mqtt5: cfg.mqtt5_listen,
        tls: Vec::new(),
    };
    let (first_v4, first_v5) = (cfg.mqtt_name.clone(), cfg.mqtt5_name.clone());
    for (v5, servers) in [(false, &mut cfg.rumqttd.v4), (true, &mut cfg.rumqttd.v5)] {
        for (name, server) in servers.iter_mut().flat_map(|m| m.iter_mut()) {
            let addr = server.listen;
            let socket = listen(addr).map_err(|source| BrokerError::Bind { addr, source })?;
            let bound = socket
                .local_addr()
                .map_err(|source| BrokerError::Bind { addr, source })?;
            // By name: several listeners may ask for port 0.
            if !v5 && *name == first_v4 {
                found.mqtt = bound;
            }
            if v5 && Some(name) == first_v5.as_ref() {
                found.mqtt5 = Some(bound);
            }
            if server.tls.is_some() {
                found.tls.push(bound);
            }
            server.listen = bound;
            server.prebound = Some(rumqttd::PreboundListener::new(socket));
        }
    }
    Ok(found)
}

/// Connections the kernel may hold for a listener before the broker
/// accepts them (capped by `net.core.somaxconn`, 4,096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`], as std's
/// `TcpListener::bind` does it (`SO_REUSEADDR`) but for the backlog: std's
/// 128 overflowed when a fleet connected at once (2,000 devices after a
/// restart), and a client whose SYN was dropped waited 1 s, 3 s, 7 s for
/// its retries: the tail of docs/BENCHMARKS.md's run without warm-up.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Starts the broker under `policy` and returns, once its first MQTT
/// listener accepts connections, where its listeners are.
pub fn start(mut cfg: BrokerConfig, policy: Arc<Policy>) -> Result<Listening, BrokerError> {
    let bound = bind_listeners(&mut cfg)?;
    let addr = bound.mqtt;
    let users = policy.accounts().map_or(0, |a| a.len());
    apply_policy(&mut cfg.rumqttd, &policy);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (revalidator_tx, revalidator_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg.rumqttd);
            let _ = revalidator_tx.send(broker.revalidator());
            let res = broker.start();
            if let Err(e) = &res {
                error!(error = %e, "embedded broker stopped");
            }
            let _ = done_tx.send(());
        })
        .map_err(BrokerError::Thread)?;
    let target = connect_addr(addr);
    let secs = 10;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if mqtt_ping(target, policy.server_password()).is_ok() {
            // Sent before the broker starts, so it is here once it answers.
            let Ok(revalidator) = revalidator_rx.try_recv() else {
                return Err(BrokerError::NotReady { addr, secs });
            };
            let listening = Listening {
                mqtt: bound.mqtt,
                mqtt5: bound.mqtt5,
                tls: bound.tls,
                revalidator,
            };
            info!(
                listen = %addr,
                listen_mqtt5 = ?listening.mqtt5,
                listen_tls = ?listening.tls,
                device_credentials = users,
                "embedded MQTT broker listening"
            );
            return Ok(listening);
        }
        if done_rx.try_recv().is_ok() || Instant::now() > deadline {
            return Err(BrokerError::NotReady { addr, secs });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects with a minimal MQTT 3.1.1 CONNECT as the server (so the probe
/// is neither refused nor logged as a denial), expects CONNACK "accepted",
/// then disconnects cleanly: proof that the broker serves clients (a bare
/// TCP connect would only leave a connect-timeout error in its log).
fn mqtt_ping(addr: SocketAddr, server_password: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Flags: username, password, clean session.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30];
    for field in [
        "widgetry-ready-probe".as_bytes(),
        policy::SERVER_USER.as_bytes(),
        server_password.as_bytes(),
    ] {
        let len = u16::try_from(field.len()).map_err(std::io::Error::other)?;
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10];
    let mut remaining = body.len();
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        packet.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    s.write_all(&packet)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    let _ = s.write_all(&[0xE0, 0x00]);
    if ack[0] == 0x20 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("unexpected reply {ack:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet connecting at once is queued by the kernel, not dropped:
    /// 1,000 connections complete while nobody accepts. With std's backlog
    /// of 128 the 130th SYN was dropped and its connect waited for a
    /// retransmission (1 s, then 3 s), so this fails on the timeout.
    #[test]
    fn a_thousand_connects_queue_before_the_first_accept() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = listen(any).expect("listen on 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let mut held = Vec::new();
        for n in 0..1000 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(900)) {
                Ok(s) => held.push(s),
                Err(e) => panic!("connection {n} not queued (backlog too small?): {e}"),
            }
        }
        assert_eq!(held.len(), 1000);
    }
}
