use slab::Slab;

use crate::protocol::LastWillProperties;
use crate::{Action, Authoriser, ClientIdentity, Filter};
use crate::{protocol::LastWill, Topic};
use std::collections::{HashMap, HashSet};

use super::ConnectionEvents;

/// Used to register a new connection with the router
/// Connection messages encompasses a handle for router to
/// communicate with this connection
pub struct Connection {
    pub client_id: String,
    /// Id of client's organisation/tenant and the prefix associated with tenant's MQTT topic
    pub tenant_prefix: Option<String>,
    /// Dynamically create subscription filters incase they didn't exist during a publish
    pub dynamic_filters: bool,
    /// Clean session
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval in seconds (0: the session ends with
    /// the connection); None on MQTT 3.1.1, where `clean` alone decides
    pub session_expiry_interval: Option<u32>,
    /// MQTT 5 Maximum Packet Size of the client: larger forwards are dropped
    pub max_packet_size: Option<u32>,
    /// Subscriptions
    pub subscriptions: HashSet<Filter>,
    /// Last will of this connection
    pub last_will: Option<LastWill>,
    /// Properties of Last will
    pub last_will_properties: Option<LastWillProperties>,
    /// Seconds to wait before publishing the will after an abnormal
    /// disconnect (MQTT 5 Will Delay Interval, capped by session expiry)
    pub will_delay: u32,
    /// Connection events
    pub events: ConnectionEvents,
    /// Topic aliases set by clients
    pub(crate) topic_aliases: HashMap<u16, Topic>,
    /// Topic aliases used by broker
    pub(crate) broker_topic_aliases: Option<BrokerAliases>,
    /// subscription IDs for a connection
    pub(crate) subscription_ids: HashMap<Filter, usize>,
    /// Who the client is, for the authoriser
    pub identity: ClientIdentity,
    /// Decides publishes and subscribes; None allows everything
    pub authoriser: Option<Authoriser>,
    /// The client id, shared with every log entry this connection publishes
    /// (for No Local)
    pub(crate) publisher_id: std::sync::Arc<str>,
    /// Unique per connection (ids are reused): names it in `Event::Disconnect`
    pub token: u64,
    /// Packet ids of QoS 2 publishes that were denied: their PUBREL is
    /// completed without storing anything. At most one per packet id.
    pub(crate) denied_qos2: HashSet<u16>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.client_id)
            .field("tenant_prefix", &self.tenant_prefix)
            .field("clean", &self.clean)
            .field("subscriptions", &self.subscriptions)
            .field("identity", &self.identity)
            .field("authoriser", &self.authoriser.is_some())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Create connection state to hold identifying information of connecting device
    pub fn new(
        tenant_id: Option<String>,
        client_id: String,
        clean: bool,
        dynamic_filters: bool,
    ) -> Connection {
        // Change client id to -> tenant_id.client_id and derive topic path prefix
        // to validate topics
        let (client_id, tenant_prefix) = match tenant_id {
            Some(tenant_id) => {
                let tenant_prefix = Some("/tenants/".to_owned() + &tenant_id + "/");
                let client_id = tenant_id + "." + &client_id;
                (client_id, tenant_prefix)
            }
            None => (client_id, None),
        };

        let identity = ClientIdentity {
            client_id: client_id.clone(),
            ..Default::default()
        };
        let publisher_id = client_id.as_str().into();
        Connection {
            client_id,
            tenant_prefix,
            dynamic_filters,
            clean,
            session_expiry_interval: None,
            max_packet_size: None,
            subscriptions: HashSet::default(),
            last_will: None,
            last_will_properties: None,
            will_delay: 0,
            events: ConnectionEvents::default(),
            topic_aliases: HashMap::new(),
            broker_topic_aliases: None,
            subscription_ids: HashMap::new(),
            publisher_id,
            identity,
            token: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            authoriser: None,
            denied_qos2: HashSet::new(),
        }
    }

    /// Whether the authoriser lets this connection do `action`.
    pub fn may(&self, action: Action<'_>) -> bool {
        match &self.authoriser {
            Some(authorise) => authorise(&self.identity, action),
            None => true,
        }
    }

    pub fn topic_alias_max(&mut self, max: u16) -> &mut Connection {
        // if topic_alias_max is 0, that means client doesn't want to use / support topic alias
        if max > 0 {
            self.broker_topic_aliases = Some(BrokerAliases::new(max));
        }
        self
    }

    pub fn last_will(
        &mut self,
        will: Option<LastWill>,
        props: Option<LastWillProperties>,
    ) -> &mut Connection {
        // Own copies: kept for the whole connection, slices of the CONNECT
        // would keep its network read buffer alive as long.
        self.last_will = will.map(|w| LastWill {
            topic: bytes::Bytes::copy_from_slice(&w.topic),
            message: bytes::Bytes::copy_from_slice(&w.message),
            ..w
        });
        self.last_will_properties = props;
        self
    }
}

#[derive(Debug)]
pub(crate) struct BrokerAliases {
    pub(crate) broker_topic_aliases: HashMap<Filter, u16>,
    pub(crate) used_aliases: Slab<()>,
    pub(crate) topic_alias_max: u16,
}

impl BrokerAliases {
    fn new(topic_alias_max: u16) -> BrokerAliases {
        let mut used_aliases = Slab::new();
        // occupy 0th index as 0 is invalid topic alias
        assert_eq!(0, used_aliases.insert(()));

        let broker_topic_aliases = HashMap::new();

        BrokerAliases {
            broker_topic_aliases,
            used_aliases,
            topic_alias_max,
        }
    }

    // unset / remove the alias for topic
    pub fn remove_alias(&mut self, topic: &str) {
        if let Some(alias) = self.broker_topic_aliases.remove(topic) {
            self.used_aliases.remove(alias as usize);
        }
    }

    // Get alias used for the topic, if it exists
    pub fn get_alias(&self, topic: &str) -> Option<u16> {
        self.broker_topic_aliases.get(topic).copied()
    }

    // Set new alias for a topic and return the alias
    // returns None if can't set new alias
    pub fn set_new_alias(&mut self, topic: &str) -> Option<u16> {
        let alias_to_use = self.used_aliases.insert(());

        // NOTE: maybe we can use self.used_aliases.len()
        // to check for availability of alias
        if alias_to_use > self.topic_alias_max as usize {
            self.used_aliases.remove(alias_to_use);
            return None;
        }

        let alias_to_use = alias_to_use as u16;
        self.broker_topic_aliases
            .insert(topic.to_owned(), alias_to_use);
        Some(alias_to_use)
    }
}
