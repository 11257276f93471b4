//! What `[[sinks]]` with `kind = "mqtt"` says: the broker, the embedded broker's limits,
//! the protocol, credentials, TLS, the spool's bound, reconnect timing and Home
//! Assistant discovery, with their defaults.

use std::path::PathBuf;

use serde::Deserialize;

use super::MqttError;

/// `[[sinks]]` with `kind = "mqtt"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MqttSettings {
    /// `"embedded"` (an in-process broker on `embedded-listen`) or `"host:port"`.
    #[serde(default = "default_broker")]
    pub broker: String,
    /// Where the embedded broker listens. A non-loopback address needs `username` and
    /// `password-file` (the broker then requires them of every client).
    #[serde(default = "default_embedded_listen")]
    pub embedded_listen: String,
    /// Most MQTT clients the embedded broker serves at once, the daemon's own included;
    /// lowered at start if the open-file limit has no room for them.
    #[serde(default = "default_embedded_max_connections")]
    pub embedded_max_connections: usize,
    /// Largest MQTT packet the embedded broker accepts (a retained publish included);
    /// a client sending more is disconnected before the payload is read.
    #[serde(default = "default_embedded_max_packet_bytes")]
    pub embedded_max_packet_bytes: usize,
    /// How long a new connection to the embedded broker may take to send its CONNECT.
    #[serde(default = "default_embedded_connect_timeout_ms")]
    pub embedded_connect_timeout_ms: u64,
    /// MQTT protocol version: "3.1.1" or "5".
    #[serde(default)]
    pub protocol: Protocol,
    /// Topic prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Client id; default `shelfwatch-<device id>-<random>`, drawn at every start so no
    /// other client can guess it and take the daemon's session over.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (first line), so it stays out of the config.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Upper bound of the spool's queue, in memory and on disk (where compaction may let
    /// it pass by a quarter); beyond it superseded states, then the oldest events are
    /// dropped, never a zone's newest state.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: usize,
    /// First reconnect delay; doubles (with jitter) up to `reconnect-max-s`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: u64,
    /// Home Assistant MQTT discovery (opt-in): a sensor per zone and label, a binary
    /// sensor per zone for out-of-stock.
    #[serde(default)]
    pub home_assistant: Option<HomeAssistantSettings>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HomeAssistantSettings {
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
}

pub fn default_discovery_prefix() -> String {
    "homeassistant".into()
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate and key, for brokers that require them.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_broker() -> String {
    "embedded".into()
}
fn default_embedded_listen() -> String {
    "127.0.0.1:1883".into()
}
/// The daemon, Home Assistant, a few scanners and dashboards, with room to spare.
fn default_embedded_max_connections() -> usize {
    32
}
/// Snapshots (an annotated 1280x720 JPEG is ~150-300 KB) and scanner photos fit; ten
/// retained 8 MiB publishes, which once took the daemon from 131 to 231 MB, do not.
fn default_embedded_max_packet_bytes() -> usize {
    1 << 20
}
/// A client on the LAN sends CONNECT within milliseconds of its TCP handshake.
fn default_embedded_connect_timeout_ms() -> u64 {
    5000
}
fn default_prefix() -> String {
    "shelfwatch".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_spool_max_bytes() -> usize {
    64 << 20
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_s() -> u64 {
    60
}

/// The host and port the client connects to: the embedded broker's listen address, or
/// `broker` (an IPv6 host may be in brackets).
pub(super) fn broker_address(s: &MqttSettings) -> Result<(String, u16), MqttError> {
    let addr = if s.broker == "embedded" {
        &s.embedded_listen
    } else {
        &s.broker
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| MqttError::Broker(s.broker.clone()))?;
    let port = port
        .parse()
        .map_err(|_| MqttError::Broker(s.broker.clone()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(MqttError::Broker(s.broker.clone()));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_with_ipv6_and_reject_garbage() {
        let mut s: MqttSettings = toml::from_str("").unwrap();
        assert_eq!(broker_address(&s).unwrap(), ("127.0.0.1".into(), 1883));
        s.broker = "[::1]:8883".into();
        assert_eq!(broker_address(&s).unwrap(), ("::1".into(), 8883));
        s.broker = "nonsense".into();
        assert!(broker_address(&s).is_err());
    }
}
