//! Who may publish and subscribe where on the embedded broker: Widgetry's
//! policy on top of the vendored rumqttd's authorisation hook.
//!
//! On by default, also without device credentials: only the server's own
//! connections (the ingestor and the web bridge, logged in as
//! [`SERVER_USER`]) may publish on `…/ack`, `…/errors`, `…/live`,
//! `…/alerts` and `…/gaps`, because an ack is what makes an agent delete data. With device
//! credentials on, a device (its username is its device id) may publish
//! only under `widgetry/v1/{device}/` and subscribe only to its own `…/ack`
//! and `…/errors`, and nobody takes another account's client id
//! (`{user}`, `widgetry-agent-{user}`); observers (by username) may
//! subscribe to anything and publish nothing. Client ids starting
//! `widgetry-` (except agents') are the server's: nobody else may take them
//! over. Deciding must stay cheap and never block: it runs on
//! the broker's router thread for every publish and subscribe.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rumqttd::{Action, ClientIdentity};
use tracing::warn;
use widgetry_common::excerpt;
use widgetry_proto::topic::PREFIX;

use super::accounts::{Accounts, same};
use crate::metrics::Metrics;

/// Username of the server's own connections to its embedded broker.
pub const SERVER_USER: &str = "widgetry-server";

/// Topic suffixes only the server may publish.
const SERVER_ONLY: [&str; 5] = ["/ack", "/errors", "/live", "/alerts", "/gaps"];

/// What a connection is, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role<'a> {
    /// Logged in as [`SERVER_USER`] with the server's password.
    Server,
    /// Device credentials are off: any client, named or not.
    Open,
    /// Logged in with device credentials: its username is its device id.
    Device(&'a str),
    /// Logged in, listed as a read-only observer.
    Observer,
    /// Logged in with a username that cannot be a device id.
    Nobody,
}

/// The access rules of one broker.
#[derive(Debug)]
pub struct Policy {
    server_password: String,
    /// Device and observer accounts (username = device id); None: off.
    accounts: Option<Accounts>,
    observers: HashSet<String>,
    metrics: Arc<Metrics>,
    /// The 10 s windows in which a denial and a refusal were last logged
    /// (log flood guard: one line per window, the rest only counted).
    denial_logged: AtomicU64,
    refusal_logged: AtomicU64,
}

impl Policy {
    pub fn new(
        server_password: String,
        accounts: Option<Accounts>,
        observers: HashSet<String>,
        metrics: Arc<Metrics>,
    ) -> Policy {
        Policy {
            server_password,
            accounts,
            observers,
            metrics,
            denial_logged: AtomicU64::new(u64::MAX),
            refusal_logged: AtomicU64::new(u64::MAX),
        }
    }

    /// The account whose client id `id` is (with device credentials on).
    fn owner<'a>(&'a self, id: &'a str) -> Option<&'a str> {
        let accounts = self.accounts.as_ref()?;
        let user = id.strip_prefix(AGENT_CLIENT_PREFIX).unwrap_or(id);
        accounts.contains(user).then_some(user)
    }

    /// Whether device credentials are on (then anonymous clients are refused).
    pub fn credentials_on(&self) -> bool {
        self.accounts.is_some()
    }

    /// The password of the server's own connections.
    pub(crate) fn server_password(&self) -> &str {
        &self.server_password
    }

    /// The accounts, when credentials are on.
    pub fn accounts(&self) -> Option<&Accounts> {
        self.accounts.as_ref()
    }

    /// Checks a CONNECT's username and password.
    pub async fn login(&self, username: &str, password: &str) -> bool {
        if username == SERVER_USER {
            return same(password, &self.server_password);
        }
        match &self.accounts {
            Some(accounts) => accounts.check(username, password).await,
            // Credentials off: a username is accepted unchecked; it grants
            // nothing more than an anonymous connection.
            None => true,
        }
    }

    fn role<'a>(&self, who: &'a ClientIdentity) -> Role<'a> {
        match (&who.username, who.authenticated) {
            (Some(u), true) if u == SERVER_USER => Role::Server,
            _ if self.accounts.is_none() => Role::Open,
            // Logged in with credentials revoked since: nothing more.
            (Some(u), true)
                if self
                    .accounts
                    .as_ref()
                    .is_some_and(|a| a.revoked(u, who.login)) =>
            {
                Role::Nobody
            }
            (Some(u), true)
                if self.observers.contains(u)
                    || self.accounts.as_ref().is_some_and(|a| a.is_observer(u)) =>
            {
                Role::Observer
            }
            (Some(u), true) if widgetry_proto::validate::validate_device(u).is_ok() => {
                Role::Device(u)
            }
            _ => Role::Nobody,
        }
    }

    /// The decision, without counting.
    fn allows(&self, who: &ClientIdentity, action: Action<'_>) -> bool {
        let role = self.role(who);
        match action {
            Action::Publish { topic, .. } | Action::Will { topic, .. } => match role {
                Role::Server => true,
                Role::Open => !server_only(topic),
                Role::Device(d) => own(topic, d) && !server_only(topic),
                Role::Observer | Role::Nobody => false,
            },
            Action::Connect { client_id } => match role {
                Role::Server => true,
                _ if server_client_id(client_id) => false,
                Role::Nobody => false,
                // Another account's ids (`{user}`, `widgetry-agent-{user}`)
                // are its own: taking one would kick it off.
                Role::Open | Role::Device(_) | Role::Observer => self
                    .owner(client_id)
                    .is_none_or(|u| Some(u) == who.username.as_deref()),
            },
            Action::Subscribe { filter } => match role {
                Role::Server | Role::Open | Role::Observer => true,
                Role::Device(d) => filter
                    .strip_prefix(PREFIX)
                    .and_then(|r| r.strip_prefix(d))
                    .is_some_and(|s| s == "/ack" || s == "/errors"),
                Role::Nobody => false,
            },
        }
    }

    /// Decides `action` for `who`; a denial is counted and logged (at most
    /// one line per 10 s, with the count of the others).
    pub fn decide(&self, who: &ClientIdentity, action: Action<'_>) -> bool {
        if self.allows(who, action) {
            return true;
        }
        let (kind, topic) = match action {
            Action::Publish { topic, .. } => ("publish", topic),
            Action::Subscribe { filter } => ("subscribe", filter),
            Action::Will { topic, .. } => ("will", topic),
            Action::Connect { client_id } => ("connect", client_id),
        };
        self.metrics.broker_denied(kind);
        if first_in_window(&self.denial_logged) {
            warn!(
                action = kind,
                client_id = %excerpt(&who.client_id),
                username = %who.username.as_deref().map(excerpt).unwrap_or_default(),
                topic = %excerpt(topic),
                "broker denied a client's {kind} (further denials in the next 10 s are only counted: widgetry_broker_denied_total)"
            );
        }
        false
    }
}

impl Policy {
    /// Counts a CONNECT the broker refused (the broker logs it).
    pub fn refused(&self, code: rumqttd::protocol::ConnectReturnCode) {
        use rumqttd::protocol::ConnectReturnCode as C;
        let reason = match code {
            C::BadUserNamePassword | C::BadAuthenticationMethod => "bad_credentials",
            C::NotAuthorized | C::Banned => "not_authorised",
            C::ClientIdentifierNotValid => "bad_client_id",
            _ => "server_busy",
        };
        self.metrics.broker_refused(reason);
        if first_in_window(&self.refusal_logged) {
            warn!(
                reason,
                "broker refused a CONNECT (further refusals in the next 10 s are only counted: widgetry_broker_refused_connections_total)"
            );
        }
    }
}

/// True for the first call in each 10 s window.
pub(crate) fn first_in_window(last: &AtomicU64) -> bool {
    let window = widgetry_common::now_ms().max(0) as u64 / 10_000;
    last.swap(window, Ordering::Relaxed) != window
}

/// Client ids of Widgetry's agents: `widgetry-agent-{device}`.
const AGENT_CLIENT_PREFIX: &str = "widgetry-agent-";

/// Client ids only the server's own connections may take (`widgetry-ingest`,
/// `widgetry-web-…`): anyone else taking one would disconnect them.
fn server_client_id(id: &str) -> bool {
    id.starts_with("widgetry-") && !id.starts_with(AGENT_CLIENT_PREFIX)
}

/// Whether only the server may publish on `topic`.
fn server_only(topic: &str) -> bool {
    topic.starts_with(PREFIX) && SERVER_ONLY.iter().any(|s| topic.ends_with(s))
}

/// Whether `topic` lies under `widgetry/v1/{device}/`.
fn own(topic: &str, device: &str) -> bool {
    topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix(device))
        .is_some_and(|r| r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn who(user: Option<&str>, authenticated: bool) -> ClientIdentity {
        ClientIdentity {
            client_id: "c".into(),
            username: user.map(str::to_owned),
            authenticated,
            login: 1,
        }
    }

    fn publish(topic: &str) -> Action<'_> {
        Action::Publish {
            topic,
            retain: false,
        }
    }

    fn policy(devices: bool) -> Policy {
        let devices = devices.then(|| {
            let plain = HashMap::from([
                ("d1".to_string(), "p1".to_string()),
                ("viewer".to_string(), "pv".to_string()),
            ]);
            Accounts::new(plain, &[])
        });
        Policy::new(
            "secret".into(),
            devices,
            HashSet::from(["viewer".to_string()]),
            Arc::new(Metrics::default()),
        )
    }

    #[test]
    fn only_the_server_publishes_acks_live_and_errors() {
        let p = policy(false);
        let anon = who(None, false);
        let server = who(Some(SERVER_USER), true);
        for t in [
            "widgetry/v1/d1/ack",
            "widgetry/v1/d1/errors",
            "widgetry/v1/d1/live",
        ] {
            assert!(!p.decide(&anon, publish(t)), "{t}");
            assert!(
                !p.decide(
                    &anon,
                    Action::Will {
                        topic: t,
                        retain: true
                    }
                ),
                "{t}"
            );
            assert!(p.decide(&server, publish(t)), "{t}");
        }
        assert!(p.decide(&anon, publish("widgetry/v1/d1/samples")));
        assert!(p.decide(&anon, publish("other/topic/ack")));
        assert!(p.decide(&anon, Action::Subscribe { filter: "#" }));
        // A username without the server's password is no server.
        assert!(!p.decide(
            &who(Some(SERVER_USER), false),
            publish("widgetry/v1/d1/ack")
        ));
        assert_eq!(p.metrics.broker_denials("publish"), 4);
        assert_eq!(p.metrics.broker_denials("will"), 3);
    }

    #[test]
    fn client_ids_cannot_be_taken_over() {
        let connect = |client_id| Action::Connect { client_id };
        let open = policy(false);
        let anon = who(None, false);
        assert!(!open.decide(&anon, connect("widgetry-ingest")));
        assert!(!open.decide(&anon, connect("widgetry-web-0001")));
        assert!(
            open.decide(&anon, connect("widgetry-agent-d1")),
            "open: devices are not protected"
        );
        assert!(open.decide(&anon, connect("my-client")));
        assert!(open.decide(&who(Some(SERVER_USER), true), connect("widgetry-ingest")));
        let creds = policy(true);
        let d1 = who(Some("d1"), true);
        assert!(creds.decide(&d1, connect("d1")));
        assert!(creds.decide(&d1, connect("widgetry-agent-d1")));
        assert!(creds.decide(&d1, connect("mosquitto_sub_1234")));
        for other in ["widgetry-agent-viewer", "viewer", "widgetry-ingest"] {
            assert!(!creds.decide(&d1, connect(other)), "{other}");
        }
        let viewer = who(Some("viewer"), true);
        assert!(creds.decide(&viewer, connect("grafana-1")));
        assert!(!creds.decide(&viewer, connect("d1")));
        assert!(!creds.decide(&viewer, connect("widgetry-agent-d1")));
        assert_eq!(creds.metrics.broker_denials("connect"), 5);
    }

    #[tokio::test]
    async fn logins() {
        let open = policy(false);
        assert!(open.login(SERVER_USER, "secret").await);
        assert!(!open.login(SERVER_USER, "secreT").await);
        assert!(!open.login(SERVER_USER, "").await);
        assert!(open.login("anyone", "anything").await);
        let creds = policy(true);
        assert!(creds.login("d1", "p1").await);
        assert!(!creds.login("d1", "p2").await);
        assert!(!creds.login("d2", "p1").await);
        assert!(creds.login(SERVER_USER, "secret").await);
    }

    #[test]
    fn with_credentials_a_device_stays_in_its_own_topics() {
        let p = policy(true);
        let d1 = who(Some("d1"), true);
        assert!(p.decide(&d1, publish("widgetry/v1/d1/samples")));
        assert!(p.decide(&d1, publish("widgetry/v1/d1/status")));
        assert!(!p.decide(&d1, publish("widgetry/v1/d2/samples")));
        assert!(!p.decide(&d1, publish("widgetry/v1/d10/samples")));
        assert!(!p.decide(&d1, publish("widgetry/v1/d1/ack")));
        assert!(!p.decide(&d1, publish("elsewhere")));
        assert!(p.decide(
            &d1,
            Action::Subscribe {
                filter: "widgetry/v1/d1/ack"
            }
        ));
        assert!(p.decide(
            &d1,
            Action::Subscribe {
                filter: "widgetry/v1/d1/errors"
            }
        ));
        for f in [
            "widgetry/v1/d2/ack",
            "widgetry/v1/+/ack",
            "#",
            "widgetry/v1/d1/#",
            "widgetry/v1/d1/live",
        ] {
            assert!(!p.decide(&d1, Action::Subscribe { filter: f }), "{f}");
        }
        let viewer = who(Some("viewer"), true);
        assert!(p.decide(&viewer, Action::Subscribe { filter: "#" }));
        assert!(!p.decide(&viewer, publish("widgetry/v1/viewer/samples")));
        // Not logged in (only possible if anonymous clients were let in).
        assert!(!p.decide(&who(None, false), publish("widgetry/v1/d1/samples")));
        assert!(!p.decide(&who(Some("a/b"), true), publish("widgetry/v1/a/b/samples")));
        assert_eq!(p.metrics.broker_denials("subscribe"), 5);
    }
}
