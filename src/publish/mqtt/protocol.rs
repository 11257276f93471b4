//! rumqttc's two clients, MQTT 3.1.1 and 5, behind one face: how to connect, what to
//! publish and subscribe (every topic checked first), and what the event loop reports,
//! in the terms the client task needs.

use std::time::Duration;

use rumqttc::{Outgoing, QoS, Transport};

use super::settings::Protocol;
use crate::identify::requests::Outgoing as ScannerReply;

/// How to reach the broker, for either protocol version.
#[derive(Clone)]
pub(super) struct LinkOptions {
    pub(super) protocol: Protocol,
    pub(super) client_id: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) keep_alive: Duration,
    pub(super) will_topic: String,
    pub(super) credentials: Option<(String, String)>,
    pub(super) transport: Option<Transport>,
}

impl LinkOptions {
    /// A client and its event loop. Clean sessions: the spool, not the broker, keeps
    /// what was not delivered.
    pub(super) fn connect(&self) -> (Client, EventLoop) {
        match self.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&self.client_id, &self.host, self.port);
                o.set_keep_alive(self.keep_alive);
                o.set_clean_session(true);
                o.set_max_packet_size(16 << 20, 16 << 20);
                o.set_last_will(rumqttc::LastWill::new(
                    &self.will_topic,
                    "offline",
                    QoS::AtLeastOnce,
                    true,
                ));
                if let Some((u, p)) = &self.credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = &self.transport {
                    o.set_transport(t.clone());
                }
                let (c, e) = rumqttc::AsyncClient::new(o, 64);
                (Client::V311(c), EventLoop::V311(Box::new(e)))
            }
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(&self.client_id, &self.host, self.port);
                o.set_keep_alive(self.keep_alive);
                o.set_clean_start(true);
                o.set_max_packet_size(Some(16 << 20));
                o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    &self.will_topic,
                    "offline",
                    qos5(QoS::AtLeastOnce),
                    true,
                    None,
                ));
                if let Some((u, p)) = &self.credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = &self.transport {
                    o.set_transport(t.clone());
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(o, 64);
                (Client::V5(c), EventLoop::V5(Box::new(e)))
            }
        }
    }
}

/// The same QoS in the v5 module's type.
fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A client of either protocol version.
pub(super) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// MQTT's limit on a topic name (a u16 length prefix).
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

/// Every topic is checked here before rumqttc encodes it: its encoder writes the length
/// as a u16 unchecked, so a longer topic would wrap and corrupt the stream (a forged
/// packet on the broker's side).
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES || topic.contains(['+', '#', '\0']) {
        return Err(format!(
            "refusing to publish on a topic of {} bytes that is not a valid topic name",
            topic.len()
        ));
    }
    Ok(())
}

impl Client {
    pub(super) fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        check_topic(&topic)?;
        match self {
            Client::V311(c) => c
                .try_publish(topic, qos, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(topic, qos5(qos), retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// An identify reply (QoS 1, not retained); on MQTT 5 with the request's
    /// correlation data.
    pub(super) fn try_publish_reply(&self, reply: ScannerReply) -> Result<(), String> {
        check_topic(&reply.topic)?;
        match (self, reply.correlation) {
            (Client::V5(c), Some(data)) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: Some(data.into()),
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    reply.topic,
                    qos5(QoS::AtLeastOnce),
                    false,
                    reply.payload,
                    properties,
                )
                .map_err(|e| e.to_string())
            }
            _ => self.try_publish(reply.topic, QoS::AtLeastOnce, false, reply.payload),
        }
    }

    pub(super) fn try_subscribe(&self, topic: String, qos: QoS) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_subscribe(topic, qos).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe(topic, qos5(qos)).map_err(|e| e.to_string()),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// What the event loop reported, in the terms the client task needs.
pub(super) enum Ev {
    /// Connected; MQTT 5 brokers say how many QoS 1 messages they take in flight.
    Connected(Option<u16>),
    /// A publish left with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
    Message {
        topic: String,
        payload: Vec<u8>,
        /// MQTT 5 request/response properties.
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
    },
    Disconnected,
    Other,
}

pub(super) enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl EventLoop {
    /// The next event, or why the connection failed (worded for the log).
    pub(super) async fn poll(&mut self) -> Result<Ev, String> {
        const CREDENTIALS: &str =
            "the broker refused the credentials: check username and password-file";
        let tls = |t: &dyn std::fmt::Display| {
            format!("TLS failed: {t} (check tls.ca-file and the broker's certificate)")
        };
        match self {
            EventLoop::V311(e) => {
                use rumqttc::{ConnectReturnCode as C, ConnectionError as E, Event, Packet};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == C::Success => {
                        Ok(Ev::Connected(None))
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(Ev::Acked(a.pkid)),
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(Ev::Message {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        response_topic: None,
                        correlation: None,
                    }),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::Sent(pkid)),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(Ev::Disconnected),
                    Ok(_) => Ok(Ev::Other),
                    Err(E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized)) => {
                        Err(CREDENTIALS.into())
                    }
                    Err(E::ConnectionRefused(code)) => {
                        Err(format!("the broker refused the connection: {code:?}"))
                    }
                    Err(E::Tls(t)) => Err(tls(&t)),
                    Err(E::Io(e)) if e.raw_os_error() == Some(libc::EPERM) => {
                        Err(not_permitted(&e))
                    }
                    Err(other) => Err(other.to_string()),
                }
            }
            EventLoop::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, Packet, PubAckReason};
                use rumqttc::v5::{ConnectionError as E, Event};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == C::Success => {
                        Ok(Ev::Connected(a.properties.and_then(|p| p.receive_max)))
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if !matches!(
                            a.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ) {
                            // Refused by the broker (not lost): sending it again would be
                            // refused again, so it leaves the spool with a warning.
                            tracing::warn!(reason = ?a.reason, "the broker refused a message");
                        }
                        Ok(Ev::Acked(a.pkid))
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let (response_topic, correlation) = p
                            .properties
                            .map(|pr| (pr.response_topic, pr.correlation_data.map(|c| c.to_vec())))
                            .unwrap_or_default();
                        Ok(Ev::Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            response_topic,
                            correlation,
                        })
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::Sent(pkid)),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(Ev::Disconnected),
                    Ok(_) => Ok(Ev::Other),
                    Err(E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized)) => {
                        Err(CREDENTIALS.into())
                    }
                    Err(E::ConnectionRefused(code)) => {
                        Err(format!("the broker refused the connection: {code:?}"))
                    }
                    Err(E::Tls(t)) => Err(tls(&t)),
                    Err(E::Io(e)) if e.raw_os_error() == Some(libc::EPERM) => {
                        Err(not_permitted(&e))
                    }
                    Err(other) => Err(other.to_string()),
                }
            }
        }
    }
}

/// A connect refused by the kernel rather than the broker: under the shipped systemd unit,
/// `IPAddressDeny=any` allows only loopback until the broker's address is allowed.
fn not_permitted(e: &std::io::Error) -> String {
    format!("{e}: under systemd, allow the broker's address with IPAddressAllow= in a drop-in (docs/mqtt.md)")
}
