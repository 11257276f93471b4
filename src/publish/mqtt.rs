//! MQTT publishing that loses nothing: messages go through the durable [`Spool`], the
//! rumqttc event loop runs in its own task, reconnects back off exponentially with
//! jitter, and a message leaves the spool only on the broker's PUBACK.
//!
//! Topics (`<p>` = prefix, `<d>` = device id):
//! `<p>/<d>/status` (retained online/offline, last will offline),
//! `<p>/<d>/zones/<zone>/state` (retained), `<p>/<d>/events`, `<p>/<d>/health`,
//! `<p>/<d>/snapshot/<camera>` (JPEG, on request), commands under `<p>/<d>/cmd/`.

use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};

use super::spool::{Spool, SpoolError};
use super::{Body, Envelope, Sink, SinkError};

/// `[[sinks]]` with `kind = "mqtt"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MqttSettings {
    /// `"embedded"` (an in-process broker on `embedded-listen`) or `"host:port"`.
    #[serde(default = "default_broker")]
    pub broker: String,
    /// Where the embedded broker listens; keep it on loopback unless the LAN needs it.
    #[serde(default = "default_embedded_listen")]
    pub embedded_listen: String,
    /// Topic prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Stable client id; default `shelfwatch-<device id>`.
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
    /// Upper bound of the on-disk spool; beyond it the oldest messages are dropped.
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

fn default_discovery_prefix() -> String {
    "homeassistant".into()
}

/// A zone as Home Assistant discovery describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneInfo {
    pub camera: String,
    pub zone: String,
    /// Planogram labels: one count sensor each (plus the zone total).
    pub labels: Vec<String>,
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

/// Errors setting the client up (reading credentials and certificates).
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("mqtt broker {0:?}: expected \"embedded\" or host:port")]
    Broker(String),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("embedded broker: {0}")]
    Embedded(String),
}

/// A command received under `<prefix>/<device>/cmd/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Snapshot of one camera, or of all when `None`.
    Snapshot(Option<String>),
    Reload,
}

/// Link state and spool figures, for health records.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    pub connect_attempts: AtomicU64,
    pub spooled: AtomicU64,
    pub dropped: AtomicU64,
}

/// Topic names for one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Self {
        Self {
            base: format!("{}/{device}", prefix.trim_end_matches('/')),
        }
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    pub fn zone_state(&self, zone: &str) -> String {
        format!("{}/zones/{zone}/state", self.base)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }
    pub fn health(&self) -> String {
        format!("{}/health", self.base)
    }
    pub fn snapshot(&self, camera: &str) -> String {
        format!("{}/snapshot/{camera}", self.base)
    }
    pub fn commands(&self) -> String {
        format!("{}/cmd/#", self.base)
    }
    fn command(&self, topic: &str) -> Option<String> {
        topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/cmd/"))
            .map(str::to_owned)
    }
}

/// The publisher-side half: appends to the spool and wakes the client task.
pub struct MqttSink {
    topics: Topics,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    snapshots: mpsc::Sender<(String, Vec<u8>)>,
    stats: Arc<MqttStats>,
}

impl Sink for MqttSink {
    fn name(&self) -> String {
        "mqtt".into()
    }

    fn publish(&mut self, msg: &Envelope, json: &str) -> Result<(), SinkError> {
        let (topic, retain) = match &msg.body {
            Body::State { zone, .. } => (self.topics.zone_state(zone), true),
            Body::Event { .. } => (self.topics.events(), false),
            Body::Health(_) => (self.topics.health(), false),
        };
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        spool.append(&topic, retain, json).map_err(spool_err)?;
        self.stats
            .spooled
            .store(spool.len() as u64, Ordering::Relaxed);
        self.stats.dropped.store(spool.dropped(), Ordering::Relaxed);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync()
            .map_err(spool_err)?;
        self.wake.notify_one();
        Ok(())
    }

    fn snapshot(&mut self, camera: &str, jpeg: &[u8]) {
        // Snapshots are on request and large: sent when connected, never spooled.
        let _ = self.snapshots.try_send((camera.to_owned(), jpeg.to_vec()));
    }
}

fn spool_err(e: SpoolError) -> SinkError {
    SinkError::Io {
        path: e.path,
        error: e.error,
    }
}

/// The client task's half.
pub struct MqttClient {
    settings: MqttSettings,
    device: String,
    topics: Topics,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    snapshots: mpsc::Receiver<(String, Vec<u8>)>,
    commands: mpsc::Sender<Command>,
    stats: Arc<MqttStats>,
    options: MqttOptions,
    zones: Vec<ZoneInfo>,
    discovery_record: PathBuf,
}

/// Sets up the spool, the sink and the client for `device`. `resolve` makes
/// config-relative paths usable; the spool lives in `spool_dir`.
pub fn setup(
    settings: &MqttSettings,
    device: &str,
    spool_dir: &Path,
    resolve: impl Fn(&Path) -> PathBuf,
    commands: mpsc::Sender<Command>,
    zones: Vec<ZoneInfo>,
) -> Result<(MqttSink, MqttClient, Arc<MqttStats>), MqttError> {
    let topics = Topics::new(&settings.prefix, device);
    let (host, port) = broker_address(settings)?;
    let client_id = settings
        .client_id
        .clone()
        .unwrap_or_else(|| format!("shelfwatch-{device}"));
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(settings.keep_alive_s.max(5)));
    options.set_clean_session(true);
    options.set_max_packet_size(16 << 20, 16 << 20);
    options.set_last_will(LastWill::new(
        topics.status(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &settings.username {
        let password = match &settings.password_file {
            Some(p) => {
                let p = resolve(p);
                std::fs::read_to_string(&p)
                    .map_err(|error| MqttError::Io { path: p, error })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            }
            None => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &settings.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(rustls_config(tls, &resolve)?),
        )));
    }
    let spool = Arc::new(Mutex::new(Spool::open(
        spool_dir,
        settings.spool_max_bytes,
    )?));
    let wake = Arc::new(Notify::new());
    let stats = Arc::new(MqttStats::default());
    let (snap_tx, snap_rx) = mpsc::channel(4);
    let sink = MqttSink {
        topics: topics.clone(),
        spool: spool.clone(),
        wake: wake.clone(),
        snapshots: snap_tx,
        stats: stats.clone(),
    };
    let client = MqttClient {
        settings: settings.clone(),
        device: device.to_owned(),
        topics,
        spool,
        wake,
        snapshots: snap_rx,
        commands,
        stats: stats.clone(),
        options,
        zones,
        discovery_record: spool_dir.join("ha-discovery.json"),
    };
    Ok((sink, client, stats))
}

fn broker_address(s: &MqttSettings) -> Result<(String, u16), MqttError> {
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

fn rustls_config(
    tls: &TlsSettings,
    resolve: &impl Fn(&Path) -> PathBuf,
) -> Result<rustls::ClientConfig, MqttError> {
    let read = |p: &Path| -> Result<Vec<u8>, MqttError> {
        let p = resolve(p);
        std::fs::read(&p).map_err(|error| MqttError::Io { path: p, error })
    };
    let tls_err = |p: &Path, m: String| MqttError::Tls {
        path: resolve(p),
        message: m,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read(&tls.ca_file)?;
    for cert in rustls_pemfile::certs(&mut BufReader::new(&ca[..])) {
        let cert = cert.map_err(|e| tls_err(&tls.ca_file, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls_err(&tls.ca_file, "no PEM certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs = rustls_pemfile::certs(&mut BufReader::new(&read(cert)?[..]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert, e.to_string()))?;
            let key = rustls_pemfile::private_key(&mut BufReader::new(&read(key)?[..]))
                .map_err(|e| tls_err(key, e.to_string()))?
                .ok_or_else(|| tls_err(key, "no PEM private key found".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(cert, e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(c), None) | (None, Some(c)) => {
            Err(tls_err(c, "client-cert and client-key go together".into()))
        }
    }
}

/// Messages handed to rumqttc but not yet acknowledged: a small window, so a reconnect
/// never has much to resend and the client's request channel never fills.
const WINDOW: usize = 32;

impl MqttClient {
    /// Runs until `shutdown` fires; then tries for `grace` to deliver what is spooled,
    /// publishes `offline` and disconnects.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>, grace: Duration) {
        let span =
            tracing::info_span!("mqtt", device = %self.device, broker = %self.settings.broker);
        let _g = span.enter();
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 64);
        let mut link = Link::default();
        let mut attempt: u32 = 0;
        let mut rng = Jitter::seeded();
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            if let Some(deadline) = stopping {
                // Shutting down: deliver what is spooled if the broker can be reached
                // within the grace period; whatever is left stays spooled for next time.
                let drained = self
                    .spool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty();
                if drained || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            self.feed(&client, &mut link);
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(ev) => {
                        if self.on_event(ev, &client, &mut link) {
                            attempt = 0;
                        }
                    }
                    Err(e) => {
                        link.reset();
                        self.stats.connected.store(false, Ordering::Relaxed);
                        attempt += 1;
                        self.stats.connect_attempts.fetch_add(1, Ordering::Relaxed);
                        let delay = rng.backoff(attempt, self.settings.reconnect_min_ms, self.settings.reconnect_max_s);
                        log_connection_error(&e, attempt, delay);
                        let delay = match stopping {
                            Some(deadline) => delay.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                            None => delay,
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            r = shutdown.changed(), if stopping.is_none() => {
                                let _ = r;
                                stopping = Some(tokio::time::Instant::now() + grace);
                            }
                        }
                    }
                },
                _ = self.wake.notified() => {}
                Some((camera, jpeg)) = self.snapshots.recv() => {
                    if link.connected {
                        let _ = client.try_publish(self.topics.snapshot(&camera), QoS::AtMostOnce, false, jpeg);
                    }
                }
                r = shutdown.changed(), if stopping.is_none() => {
                    let _ = r;
                    stopping = Some(tokio::time::Instant::now() + grace);
                }
                _ = tokio::time::sleep(Duration::from_millis(250)), if stopping.is_some() => {}
            }
        }
        if link.connected {
            // A clean goodbye: the retained status says offline without waiting for the
            // broker to fire the last will.
            let _ = client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, "offline");
            let _ = client.try_disconnect();
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < until {
                match tokio::time::timeout_at(until, eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(ev)) => {
                        self.on_event(ev, &client, &mut link);
                    }
                }
            }
        }
        tracing::info!(
            spooled = self.spool.lock().unwrap_or_else(|p| p.into_inner()).len(),
            "mqtt client stopped"
        );
    }

    /// Hands spooled messages to rumqttc, in order, while there is room in the window.
    fn feed(&mut self, client: &AsyncClient, link: &mut Link) {
        if !link.connected {
            return;
        }
        let spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        while link.sent.len() + link.inflight.len() < WINDOW {
            let Some(e) = spool.next_from(link.cursor) else {
                break;
            };
            match client.try_publish(
                e.topic.clone(),
                QoS::AtLeastOnce,
                e.retain,
                e.payload.clone(),
            ) {
                Ok(()) => {
                    link.sent.push_back(e.id);
                    link.cursor = e.id + 1;
                }
                Err(_) => break,
            }
        }
    }

    /// Returns true when a connection was (re)established.
    fn on_event(&mut self, ev: Event, client: &AsyncClient, link: &mut Link) -> bool {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                link.reset();
                link.connected = true;
                link.cursor = 0;
                self.stats.connected.store(true, Ordering::Relaxed);
                let pending = self.spool.lock().unwrap_or_else(|p| p.into_inner()).len();
                tracing::info!(replaying = pending, "connected to the broker");
                let _ = client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, "online");
                let _ = client.try_subscribe(self.topics.commands(), QoS::AtLeastOnce);
                if let Some(ha) = &self.settings.home_assistant {
                    let _ = client
                        .try_subscribe(format!("{}/status", ha.discovery_prefix), QoS::AtLeastOnce);
                    self.publish_discovery(client);
                }
                return true;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                // Outgoing publishes of our status/snapshots are not in `sent`; only the
                // spool's (QoS 1, in order) are, and they are reported in order.
                if let Some(id) = link.sent.pop_front() {
                    link.inflight.insert(pkid, id);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(id) = link.inflight.remove(&ack.pkid) {
                    let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = spool.ack(id) {
                        tracing::error!(error = %e, "cannot record the acknowledgement");
                    }
                    self.stats
                        .spooled
                        .store(spool.len() as u64, Ordering::Relaxed);
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                let ha_status = self
                    .settings
                    .home_assistant
                    .as_ref()
                    .is_some_and(|ha| p.topic == format!("{}/status", ha.discovery_prefix));
                if ha_status && &p.payload[..] == b"online" {
                    // Home Assistant restarted: it forgot non-retained discovery state.
                    self.publish_discovery(client);
                } else if let Some(cmd) = self.topics.command(&p.topic) {
                    let payload = String::from_utf8_lossy(&p.payload).trim().to_owned();
                    let command = match cmd.as_str() {
                        "snapshot" => {
                            Some(Command::Snapshot((!payload.is_empty()).then_some(payload)))
                        }
                        "reload" => Some(Command::Reload),
                        other => {
                            tracing::warn!(command = other, "unknown command ignored");
                            None
                        }
                    };
                    if let Some(c) = command {
                        tracing::info!(command = ?c, "command received");
                        let _ = self.commands.try_send(c);
                    }
                }
            }
            _ => {}
        }
        false
    }
}

impl MqttClient {
    /// Publishes Home Assistant discovery for the configured zones (retained), and an
    /// empty retained payload for entities of zones that left the config.
    fn publish_discovery(&mut self, client: &AsyncClient) {
        let Some(ha) = &self.settings.home_assistant else {
            return;
        };
        let configs = discovery_configs(
            &ha.discovery_prefix,
            &self.device,
            &self.topics,
            &self.zones,
        );
        let before: Vec<String> = std::fs::read_to_string(&self.discovery_record)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        for old in before
            .iter()
            .filter(|t| !configs.iter().any(|(n, _)| n == *t))
        {
            tracing::info!(topic = %old, "removing Home Assistant entity of a zone no longer configured");
            let _ = client.try_publish(old.clone(), QoS::AtLeastOnce, true, Vec::new());
        }
        for (topic, payload) in &configs {
            let _ = client.try_publish(topic.clone(), QoS::AtLeastOnce, true, payload.to_string());
        }
        let names: Vec<&String> = configs.iter().map(|(t, _)| t).collect();
        if let Err(e) = std::fs::write(
            &self.discovery_record,
            serde_json::to_vec(&names).expect("strings"),
        ) {
            tracing::warn!(path = %self.discovery_record.display(), error = %e, "cannot record discovery topics");
        }
    }
}

/// Home Assistant discovery topics and payloads: per zone a total sensor, a sensor per
/// planogram label, and an out-of-stock binary sensor; availability follows the status.
pub fn discovery_configs(
    prefix: &str,
    device: &str,
    topics: &Topics,
    zones: &[ZoneInfo],
) -> Vec<(String, serde_json::Value)> {
    let dev = serde_json::json!({
        "identifiers": [format!("shelfwatch-{device}")],
        "name": format!("shelfwatch {device}"),
        "manufacturer": "shelfwatch",
        "model": "shelf stock counter",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let slug = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut out = Vec::new();
    for z in zones {
        let state = topics.zone_state(&z.zone);
        let common = |name: String, id: String| {
            serde_json::json!({
                "name": name,
                "unique_id": id,
                "object_id": id,
                "state_topic": state,
                "availability_topic": topics.status(),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": dev,
            })
        };
        let id = format!("{}_{}", slug(device), slug(&z.zone));
        let mut total = common(format!("{} total", z.zone), format!("{id}_total"));
        total["value_template"] = "{{ value_json.total }}".into();
        total["state_class"] = "measurement".into();
        total["unit_of_measurement"] = "items".into();
        out.push((
            format!("{prefix}/sensor/{}/{id}_total/config", slug(device)),
            total,
        ));
        for label in &z.labels {
            let lid = format!("{id}_{}", slug(label));
            let mut s = common(format!("{} {label}", z.zone), lid.clone());
            s["value_template"] = format!(
                "{{{{ value_json.counts[{}] | default(0) }}}}",
                serde_json::Value::from(label.as_str())
            )
            .into();
            s["state_class"] = "measurement".into();
            s["unit_of_measurement"] = "items".into();
            out.push((format!("{prefix}/sensor/{}/{lid}/config", slug(device)), s));
        }
        let mut oos = common(
            format!("{} out of stock", z.zone),
            format!("{id}_out_of_stock"),
        );
        oos["value_template"] =
            "{{ 'ON' if value_json.status == 'out-of-stock' else 'OFF' }}".into();
        oos["device_class"] = "problem".into();
        out.push((
            format!(
                "{prefix}/binary_sensor/{}/{id}_out_of_stock/config",
                slug(device)
            ),
            oos,
        ));
    }
    out
}

/// What is in flight on the current connection.
#[derive(Default)]
struct Link {
    connected: bool,
    /// Spool ids handed to rumqttc, waiting for their packet id.
    sent: VecDeque<u64>,
    /// Packet id -> spool id, waiting for PUBACK.
    inflight: HashMap<u16, u64>,
    /// The next spool id to send.
    cursor: u64,
}

impl Link {
    /// A lost connection: whatever was in flight is resent from the spool on the next one
    /// (a clean session, so the broker keeps nothing of ours).
    fn reset(&mut self) {
        self.connected = false;
        self.sent.clear();
        self.inflight.clear();
        self.cursor = 0;
    }
}

fn log_connection_error(e: &ConnectionError, attempt: u32, delay: Duration) {
    let why = match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => "the broker refused the credentials: check username and password-file".to_owned(),
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        ConnectionError::Tls(t) => {
            format!("TLS failed: {t} (check tls.ca-file and the broker's certificate)")
        }
        other => other.to_string(),
    };
    tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64, reason = %why, "mqtt connection failed");
}

/// Exponential backoff with jitter (so a fleet does not reconnect in lock-step after a
/// broker restart), from a small xorshift generator.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self(t | 1)
    }

    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// min * 2^(attempt-1), capped at max, then scaled into [0.5, 1.0] of itself.
    fn backoff(&mut self, attempt: u32, min_ms: u64, max_s: u64) -> Duration {
        let base = (min_ms as f64) * 2f64.powi(attempt.saturating_sub(1).min(20) as i32);
        let capped = base.min(max_s as f64 * 1000.0);
        Duration::from_millis((capped * (0.5 + 0.5 * self.next())) as u64)
    }
}

/// Starts the embedded broker (rumqttd, MQTT 3.1.1, no TLS) on its own threads.
pub fn start_embedded_broker(listen: &str) -> Result<(), MqttError> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| MqttError::Embedded(format!("embedded-listen {listen:?}: {e}")))?;
    // Fail here, clearly, if the port is taken, rather than inside the broker's thread.
    drop(
        std::net::TcpListener::bind(addr)
            .map_err(|e| MqttError::Embedded(format!("{addr}: {e}")))?,
    );
    let server = rumqttd::ServerSettings {
        name: "shelfwatch-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 16 << 20,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("1".to_string(), server)].into()),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| MqttError::Embedded(e.to_string()))?;
    tracing::info!(listen = %addr, "embedded MQTT broker started");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_prefix_device_and_zone() {
        let t = Topics::new("shelfwatch/", "dev-1");
        assert_eq!(t.status(), "shelfwatch/dev-1/status");
        assert_eq!(t.zone_state("top"), "shelfwatch/dev-1/zones/top/state");
        assert_eq!(
            t.command("shelfwatch/dev-1/cmd/snapshot").as_deref(),
            Some("snapshot")
        );
        assert_eq!(t.command("shelfwatch/dev-2/cmd/snapshot"), None);
    }

    #[test]
    fn backoff_doubles_stays_within_jitter_bounds_and_is_capped() {
        let mut j = Jitter(12345);
        for attempt in 1..12 {
            let d = j.backoff(attempt, 500, 60).as_millis() as f64;
            let base = (500.0 * 2f64.powi(attempt as i32 - 1)).min(60_000.0);
            assert!(
                d >= base * 0.5 - 1.0 && d <= base,
                "attempt {attempt}: {d} vs {base}"
            );
        }
    }

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
