use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Login, Packet,
    Protocol,
};
use crate::router::iobufs::release;
use crate::router::{Event, Notification};
use crate::{Action, Authoriser, ClientIdentity, ConnectionId, ConnectionSettings};

use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{trace, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("will topic {0:?} not authorised")]
    WillNotAuthorized(String),
    #[error("client id {0:?} not authorised")]
    ClientIdNotAuthorized(String),
    #[error("connection refused: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Authentication error")]
    InvalidAuth,
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
}

impl Error {
    /// The CONNACK reason the client was refused with, if this error is a
    /// refused CONNECT.
    pub fn refusal(&self) -> Option<ConnectReturnCode> {
        match self {
            Error::InvalidAuth => Some(ConnectReturnCode::BadUserNamePassword),
            Error::InvalidClientId => Some(ConnectReturnCode::ClientIdentifierNotValid),
            Error::WillNotAuthorized(_) | Error::ClientIdNotAuthorized(_) => {
                Some(ConnectReturnCode::NotAuthorized)
            }
            Error::Refused(code) => Some(*code),
            _ => None,
        }
    }
}

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    pub(crate) token: u64,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
        identity: ClientIdentity,
        authoriser: Option<Authoriser>,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, _) = connect_packet else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        // MQTT 5: an absent Session Expiry Interval is 0 (§3.1.2.11.2)
        let session_expiry_interval = (network.protocol_level() == 5).then_some(session_expiry);

        let built = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session)
            .session_expiry_interval(session_expiry_interval)
            .receive_maximum(props.as_ref().and_then(|p| p.receive_maximum))
            .max_packet_size(props.as_ref().and_then(|p| p.max_packet_size))
            .last_will(lastwill)
            .last_will_properties(lastwill_props)
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            .identity(identity)
            .authoriser(authoriser)
            .will_delay(will_delay_interval)
            .build();
        let (link_tx, link_rx, notification) = match built {
            Ok(link) => link,
            // Tell the client why (connection limit, invalid client id)
            Err(LinkError::Refused(code)) => {
                refuse(&mut network, code).await?;
                return Err(Error::Refused(code));
            }
            Err(e) => return Err(e.into()),
        };

        let id = link_rx.id();
        Span::current().record("connection_id", id);

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                new_props.max_packet_size = Some(network.max_incoming_size() as u32);
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            token: link_rx.token(),
            network,
            link_tx,
            link_rx,
            notifications: VecDeque::new(),
            will_delay_interval,
        })
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        self.network.set_keepalive(self.connect.keep_alive);

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            select! {
                o = self.network.read() => {
                    let packet = match o {
                        Ok(packet) => packet,
                        Err(e) => return Err(self.read_error(e).await),
                    };
                    let (read, len) = {
                        let mut buffer = self.link_tx.buffer();
                        buffer.push_back(packet);
                        let read = self.network.readv(&mut buffer);
                        (read, buffer.len())
                    };
                    if let Err(e) = read {
                        return Err(self.read_error(e).await);
                    }

                    trace!("Packets read from network, count = {}", len);
                    self.link_tx.notify().await?;
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = self.link_rx.exchange(&mut self.notifications) => {
                    o?;
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        if let Some(packet) = notif.into() {
                            packets.push_back(packet);
                        } else {
                            unscheduled = true;
                        }

                    }
                    self.network.writev(packets).await?;
                    // This buffer is swapped with the router's outgoing
                    // buffer: give back what a burst made it grow to.
                    release(&mut self.notifications);
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
            }
        }
    }
}

impl<P: Protocol> RemoteLink<P> {
    /// A packet over the size limit is answered on MQTT 5 with DISCONNECT
    /// 0x95 (Packet too large, §4.13) before the connection is closed.
    async fn read_error(&mut self, e: network::Error) -> Error {
        let too_large = matches!(
            e,
            network::Error::Protocol(protocol::Error::PayloadSizeLimitExceeded(_))
        );
        if too_large && self.network.protocol_level() == 5 {
            let disconnect = Disconnect {
                reason_code: DisconnectReasonCode::PacketTooLarge,
            };
            self.network
                .write(Packet::Disconnect(disconnect, None))
                .await
                .ok();
        }
        e.into()
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
///
/// Returns the packet and who the client is. A refused CONNECT is answered
/// with a CONNACK that says why (bad credentials, a will the authoriser
/// denies, an invalid client id) before the error is returned.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<(Packet, ClientIdentity), Error>
where
    P: Protocol,
{
    // Wait for MQTT connect packet and error out if it's not received in time to prevent
    // DOS attacks by filling total connections that the server can handle with idle open
    // connections which results in server rejecting new connections
    let connection_timeout_ms = config.connection_timeout_ms.into();
    let packet = time::timeout(Duration::from_millis(connection_timeout_ms), async {
        let packet = network.read().await?;
        Ok::<_, network::Error>(packet)
    })
    .await?;
    // A CONNECT of another protocol version (e.g. MQTT 5 on the 3.1.1
    // listener) is told so (3.1.1 §3.1.2.2: return code 1) instead of
    // seeing the socket close.
    let packet = match packet {
        Err(network::Error::Protocol(protocol::Error::InvalidProtocolLevel(level))) => {
            refuse(network, ConnectReturnCode::UnsupportedProtocolVersion).await?;
            return Err(Error::Refused(ConnectReturnCode::UnsupportedProtocolVersion))
                .inspect_err(|_| tracing::warn!(level, "CONNECT of an unsupported protocol level"));
        }
        p => p?,
    };

    let (connect, will, login) = match packet {
        Packet::Connect(ref connect, _, ref will, _, ref login) => (connect, will, login),
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    // Taken before the credentials are checked: see `ClientIdentity::login`.
    let login_serial = crate::next_login();
    let authenticated = match handle_auth(config.clone(), login.as_ref(), &connect.client_id).await
    {
        Ok(authenticated) => authenticated,
        Err(e) => {
            refuse(network, ConnectReturnCode::BadUserNamePassword).await?;
            return Err(e);
        }
    };

    // Keep alive 0 turns the keep alive mechanism off (MQTT 3.1.1 §3.1.2.10,
    // MQTT 5 §3.1.2.10): `Network` then waits for packets without a deadline.

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    if empty_client_id && !clean_session {
        refuse(network, ConnectReturnCode::ClientIdentifierNotValid).await?;
        return Err(Error::InvalidClientId);
    }

    let identity = ClientIdentity {
        client_id: connect.client_id.clone(),
        username: login.as_ref().map(|l| l.username.clone()),
        authenticated,
        login: login_serial,
    };

    if let Some(authoriser) = &config.authoriser {
        let client_id = identity.client_id.as_str();
        if !client_id.is_empty() && !authoriser(&identity, Action::Connect { client_id }) {
            refuse(network, ConnectReturnCode::NotAuthorized).await?;
            return Err(Error::ClientIdNotAuthorized(client_id.to_owned()));
        }
    }

    if let (Some(authoriser), Some(will)) = (&config.authoriser, will) {
        let topic = std::str::from_utf8(&will.topic).unwrap_or_default();
        let action = Action::Will {
            topic,
            retain: will.retain,
        };
        if !authoriser(&identity, action) {
            refuse(network, ConnectReturnCode::NotAuthorized).await?;
            return Err(Error::WillNotAuthorized(topic.to_owned()));
        }
    }

    Ok((packet, identity))
}

/// Answers a refused CONNECT with a CONNACK carrying `code`.
async fn refuse<P: Protocol>(
    network: &mut Network<P>,
    code: ConnectReturnCode,
) -> Result<(), Error> {
    let ack = ConnAck {
        session_present: false,
        code,
    };
    network.write(Packet::ConnAck(ack, None)).await?;
    Ok(())
}

/// Checks the CONNECT's credentials. Ok(true): checked and accepted;
/// Ok(false): anonymous, allowed because no authentication is configured
/// or `allow_anonymous` is set.
async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<bool, Error> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(false);
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        if config.allow_anonymous {
            return Ok(false);
        }
        return Err(Error::InvalidAuth);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        if !auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await
        {
            return Err(Error::InvalidAuth);
        }

        return Ok(true);
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(true);
            }
        }

        return Err(Error::InvalidAuth);
    }

    Err(Error::InvalidAuth)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::handle_auth;

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            allow_anonymous: false,
            authoriser: None,
            on_refusal: None,
            dynamic_filters: false,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}
