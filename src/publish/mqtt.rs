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

use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};

use super::spool::{Spool, SpoolError};
use super::{Body, Envelope, Sink, SinkError};
use crate::identify::requests::{Incoming, Outgoing as ScannerReply};

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

/// A zone as Home Assistant discovery describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneInfo {
    pub camera: String,
    pub zone: String,
    /// Planogram labels: one count sensor each (plus the zone total).
    pub labels: Vec<String>,
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
    #[error("cannot draw a random client id: {0}")]
    Random(std::io::Error),
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
    /// Damaged spool records skipped (see [`Spool::damaged`]).
    pub spool_damaged: AtomicU64,
    /// False while the spool cannot write to disk (messages held in memory only).
    pub spool_on_disk: AtomicBool,
}

impl MqttStats {
    fn record(&self, spool: &Spool) {
        self.spooled.store(spool.len() as u64, Ordering::Relaxed);
        self.dropped.store(spool.dropped(), Ordering::Relaxed);
        self.spool_damaged.store(spool.damaged(), Ordering::Relaxed);
        self.spool_on_disk.store(spool.on_disk(), Ordering::Relaxed);
    }
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
    /// Where scanners publish images to identify.
    pub fn identify_request(&self) -> String {
        format!("{}/identify/request", self.base)
    }
    /// Where replies go when a request names no reply topic.
    pub fn identify_response(&self) -> String {
        format!("{}/identify/response", self.base)
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
        spool.append(&topic, retain, json);
        self.stats.record(&spool);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        spool.sync();
        self.stats.record(&spool);
        self.wake.notify_one();
        Ok(())
    }

    fn snapshot(&mut self, camera: &str, jpeg: &[u8]) {
        // Snapshots are on request and large: sent when connected, never spooled.
        let _ = self.snapshots.try_send((camera.to_owned(), jpeg.to_vec()));
    }
}

/// The client's side of the scanner request thread (see [`crate::identify::requests`]).
pub struct ScannerLink {
    pub requests: mpsc::Sender<Incoming>,
    pub replies: mpsc::Receiver<ScannerReply>,
    /// Where a "busy" answer may go (the same rule as every reply).
    pub policy: std::sync::Arc<crate::identify::requests::ReplyPolicy>,
    /// Requests per reply topic, counted on arrival (`identify.requests-per-s`).
    pub limiter: crate::identify::requests::RateLimiter,
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
    options: LinkOptions,
    zones: Vec<ZoneInfo>,
    discovery_record: PathBuf,
    scanner: Option<ScannerLink>,
    /// Set once the goodbye `offline` is on its way, so it is not taken back.
    leaving: bool,
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
    scanner: Option<ScannerLink>,
) -> Result<(MqttSink, MqttClient, Arc<MqttStats>), MqttError> {
    let topics = Topics::new(&settings.prefix, device);
    let (host, port) = broker_address(settings)?;
    let client_id = match &settings.client_id {
        Some(id) => id.clone(),
        None => format!(
            "shelfwatch-{device}-{:016x}",
            random_u64().map_err(MqttError::Random)?
        ),
    };
    let credentials = match &settings.username {
        Some(user) => {
            let password = match &settings.password_file {
                Some(p) => read_password_file(&resolve(p))?,
                None => String::new(),
            };
            Some((user.clone(), password))
        }
        None => None,
    };
    let transport = match &settings.tls {
        Some(tls) => Some(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(rustls_config(tls, &resolve)?),
        ))),
        None => None,
    };
    let options = LinkOptions {
        protocol: settings.protocol,
        client_id,
        host,
        port,
        keep_alive: Duration::from_secs(settings.keep_alive_s.max(5)),
        will_topic: topics.status(),
        credentials,
        transport,
    };
    let spool = Arc::new(Mutex::new(Spool::open(
        spool_dir,
        settings.spool_max_bytes,
    )?));
    let wake = Arc::new(Notify::new());
    let stats = Arc::new(MqttStats::default());
    stats.record(&spool.lock().unwrap_or_else(|p| p.into_inner()));
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
        scanner,
        leaving: false,
    };
    Ok((sink, client, stats))
}

/// The first line of a password file.
fn read_password_file(path: &Path) -> Result<String, MqttError> {
    Ok(std::fs::read_to_string(path)
        .map_err(|error| MqttError::Io {
            path: path.to_owned(),
            error,
        })?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// 64 bits from the kernel's random number generator.
fn random_u64() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own and
    // keeps no pointer to it.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    // ssize_t: -1 on error (never short for 8 bytes); 32 bits on armv7.
    if n < 0 || n as usize != bytes.len() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
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
        let (client, mut eventloop) = self.options.connect();
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
            // rumqttc's poll() is not cancel-safe while it connects: a branch below that
            // fires meanwhile drops the half-made connection, and the next poll starts
            // another. At start-up the first counted frames woke the loop twice before
            // CONNACK, so the broker saw two connections closed or reset right after
            // CONNECT (rumqttd logs a reset as an ERROR). Branches that only matter when
            // connected wait until then (a Notify keeps its permit; snapshots wait in
            // their channel).
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
                _ = self.wake.notified(), if link.connected => {}
                Some(reply) = recv_reply(&mut self.scanner) => {
                    // A reply is for a person waiting at a scanner: sent now or lost
                    // with the connection, never spooled.
                    if link.connected {
                        link.untracked(client.try_publish_reply(reply));
                    } else {
                        tracing::warn!(topic = %reply.topic, "identify reply lost: not connected");
                    }
                }
                Some((camera, jpeg)) = self.snapshots.recv(), if link.connected => {
                    let topic = self.topics.snapshot(&camera);
                    // A QoS 0 PUBLISH's remaining length: topic length field, topic, payload.
                    let packet = 2 + topic.len() + jpeg.len();
                    if self.settings.broker == "embedded" && packet > self.settings.embedded_max_packet_bytes {
                        // The broker would drop our connection for it.
                        tracing::warn!(camera = %camera, bytes = jpeg.len(),
                            limit = self.settings.embedded_max_packet_bytes,
                            "snapshot not published: larger than embedded-max-packet-bytes");
                    } else {
                        link.untracked(client.try_publish(topic, QoS::AtMostOnce, false, jpeg));
                    }
                }
                r = shutdown.changed(), if stopping.is_none() => {
                    let _ = r;
                    stopping = Some(tokio::time::Instant::now() + grace);
                }
                // The grace period's end, not a tick (a tick would cancel a connect).
                _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => {}
            }
        }
        if link.connected {
            // A clean goodbye: the retained status says offline without waiting for the
            // broker to fire the last will.
            self.leaving = true;
            link.untracked(client.try_publish(
                self.topics.status(),
                QoS::AtLeastOnce,
                true,
                b"offline".to_vec(),
            ));
            let _ = client.try_disconnect();
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < until {
                match tokio::time::timeout_at(until, eventloop.poll()).await {
                    Ok(Ok(Ev::Disconnected)) | Ok(Err(_)) | Err(_) => break,
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
    fn feed(&mut self, client: &Client, link: &mut Link) {
        if !link.connected {
            return;
        }
        let spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        while link.sent.len() + link.inflight.len() < link.window {
            let Some(e) = spool.next_from(link.cursor) else {
                break;
            };
            match client.try_publish(
                e.topic.clone(),
                QoS::AtLeastOnce,
                e.retain,
                e.payload.clone().into_bytes(),
            ) {
                Ok(()) => {
                    link.sent.push_back(Some(e.id));
                    link.cursor = e.id + 1;
                }
                Err(_) => break,
            }
        }
    }

    /// Returns true when a connection was (re)established.
    fn on_event(&mut self, ev: Ev, client: &Client, link: &mut Link) -> bool {
        match ev {
            Ev::Connected(receive_max) => {
                link.reset();
                link.connected = true;
                // Half the broker's receive maximum: status and discovery publishes travel
                // outside the window, and rumqttc stalls on a packet id collision when
                // more is in flight than the broker allows.
                link.window = receive_max.map_or(WINDOW, |r| (r as usize / 2).clamp(1, WINDOW));
                link.cursor = 0;
                self.stats.connected.store(true, Ordering::Relaxed);
                let pending = self.spool.lock().unwrap_or_else(|p| p.into_inner()).len();
                tracing::info!(replaying = pending, "connected to the broker");
                link.untracked(client.try_publish(
                    self.topics.status(),
                    QoS::AtLeastOnce,
                    true,
                    b"online".to_vec(),
                ));
                let _ = client.try_subscribe(self.topics.commands(), QoS::AtLeastOnce);
                // Our own status, to take back a stale `offline` (see on_event).
                let _ = client.try_subscribe(self.topics.status(), QoS::AtLeastOnce);
                if self.scanner.is_some() {
                    let _ = client.try_subscribe(self.topics.identify_request(), QoS::AtLeastOnce);
                }
                if let Some(ha) = &self.settings.home_assistant {
                    let _ = client
                        .try_subscribe(format!("{}/status", ha.discovery_prefix), QoS::AtLeastOnce);
                    self.publish_discovery(client, link);
                }
                return true;
            }
            Ev::Sent(pkid) => {
                // Outgoing publishes of our status/snapshots are not in `sent`; only the
                // spool's (QoS 1, in order) are, and they are reported in order.
                // Every publish we hand over is reported here, in order: spool entries
                // carry their id, status/discovery/snapshot publishes do not.
                if let Some(Some(id)) = link.sent.pop_front() {
                    link.inflight.insert(pkid, id);
                }
            }
            Ev::Acked(pkid) => {
                if let Some(id) = link.inflight.remove(&pkid) {
                    let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
                    spool.ack(id);
                    self.stats.record(&spool);
                }
            }
            Ev::Message {
                topic,
                payload,
                response_topic,
                correlation,
            } => {
                if topic == self.topics.status() {
                    // The client id is new at every start, so the broker may still hold
                    // the previous run's connection (half-open after a power cut) and fire
                    // its last will after we said `online`; anyone may also publish there.
                    // While we are connected, `offline` is wrong: say `online` again.
                    if &payload[..] == b"offline" && !self.leaving {
                        tracing::info!("status said offline while connected (a previous session's last will?); publishing online again");
                        link.untracked(client.try_publish(
                            self.topics.status(),
                            QoS::AtLeastOnce,
                            true,
                            b"online".to_vec(),
                        ));
                    }
                    return false;
                }
                if topic == self.topics.identify_request() {
                    if let Some(scanner) = &mut self.scanner {
                        let request = Incoming {
                            payload,
                            response_topic,
                            correlation,
                            received: std::time::Instant::now(),
                        };
                        if let Err(reply) = crate::identify::requests::admit(
                            &request,
                            &scanner.policy,
                            &mut scanner.limiter,
                            &self.device,
                        ) {
                            link.untracked(client.try_publish_reply(reply));
                        } else if let Err(mpsc::error::TrySendError::Full(request)) =
                            scanner.requests.try_send(request)
                        {
                            let reply = crate::identify::requests::busy(
                                &request,
                                &self.device,
                                &scanner.policy,
                            );
                            link.untracked(client.try_publish_reply(reply));
                        }
                    }
                    return false;
                }
                let ha_status = self
                    .settings
                    .home_assistant
                    .as_ref()
                    .is_some_and(|ha| topic == format!("{}/status", ha.discovery_prefix));
                if ha_status && &payload[..] == b"online" {
                    // Home Assistant restarted: it forgot non-retained discovery state.
                    self.publish_discovery(client, link);
                } else if let Some(cmd) = self.topics.command(&topic) {
                    let payload = String::from_utf8_lossy(&payload).trim().to_owned();
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
    fn publish_discovery(&mut self, client: &Client, link: &mut Link) {
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
            link.untracked(client.try_publish(old.clone(), QoS::AtLeastOnce, true, Vec::new()));
        }
        for (topic, payload) in &configs {
            link.untracked(client.try_publish(
                topic.clone(),
                QoS::AtLeastOnce,
                true,
                payload.to_string().into_bytes(),
            ));
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

/// How to reach the broker, for either protocol version.
#[derive(Clone)]
struct LinkOptions {
    protocol: Protocol,
    client_id: String,
    host: String,
    port: u16,
    keep_alive: Duration,
    will_topic: String,
    credentials: Option<(String, String)>,
    transport: Option<Transport>,
}

impl LinkOptions {
    /// A client and its event loop. Clean sessions: the spool, not the broker, keeps
    /// what was not delivered.
    fn connect(&self) -> (Client, EventLoop) {
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
enum Client {
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
    fn try_publish(
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
    fn try_publish_reply(&self, reply: ScannerReply) -> Result<(), String> {
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

    fn try_subscribe(&self, topic: String, qos: QoS) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_subscribe(topic, qos).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe(topic, qos5(qos)).map_err(|e| e.to_string()),
        }
    }

    fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// The next reply of the scanner thread; pending forever without one.
async fn recv_reply(scanner: &mut Option<ScannerLink>) -> Option<ScannerReply> {
    match scanner {
        Some(s) => s.replies.recv().await,
        None => std::future::pending().await,
    }
}

/// What the event loop reported, in the terms the client task needs.
enum Ev {
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

enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl EventLoop {
    /// The next event, or why the connection failed (worded for the log).
    async fn poll(&mut self) -> Result<Ev, String> {
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

/// What is in flight on the current connection.
#[derive(Default)]
struct Link {
    connected: bool,
    /// Publishes handed to rumqttc, waiting for their packet id: the spool id, or None
    /// for publishes outside the spool.
    sent: VecDeque<Option<u64>>,
    /// Packet id -> spool id, waiting for PUBACK.
    inflight: HashMap<u16, u64>,
    /// The next spool id to send.
    cursor: u64,
    /// Messages allowed in flight on this connection.
    window: usize,
}

impl Link {
    /// Records a publish that is not from the spool, so packet ids stay matched.
    fn untracked(&mut self, handed_over: Result<(), String>) {
        if handed_over.is_ok() {
            self.sent.push_back(None);
        }
    }

    /// A lost connection: whatever was in flight is resent from the spool on the next one
    /// (a clean session, so the broker keeps nothing of ours).
    fn reset(&mut self) {
        self.connected = false;
        self.sent.clear();
        self.inflight.clear();
        self.cursor = 0;
    }
}

/// A connect refused by the kernel rather than the broker: under the shipped systemd unit,
/// `IPAddressDeny=any` allows only loopback until the broker's address is allowed.
fn not_permitted(e: &std::io::Error) -> String {
    format!("{e}: under systemd, allow the broker's address with IPAddressAllow= in a drop-in (docs/mqtt.md)")
}

fn log_connection_error(why: &str, attempt: u32, delay: Duration) {
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

/// Starts the embedded broker (rumqttd, MQTT 3.1.1, no TLS) on its own threads and
/// returns once it accepts connections. Config validation has already refused a
/// non-loopback `embedded-listen` without credentials; this refuses it again, so that no
/// caller can open the broker to the LAN without them.
pub fn start_embedded_broker(
    settings: &MqttSettings,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<(), MqttError> {
    let addr = embedded_listen_address(&settings.embedded_listen)
        .map_err(|e| MqttError::Embedded(format!("embedded-listen: {e}")))?;
    let auth = match (&settings.username, &settings.password_file) {
        (Some(user), Some(file)) => {
            let file = resolve(file);
            crate::fsutil::check_secret_file(&file).map_err(MqttError::Embedded)?;
            Some(HashMap::from([(user.clone(), read_password_file(&file)?)]))
        }
        _ if !addr.ip().is_loopback() => {
            return Err(MqttError::Embedded(format!(
                "embedded-listen: {addr} is not loopback and no username and password-file are set"
            )))
        }
        _ => None,
    };
    let fd_limit =
        open_files_limit().map_err(|e| MqttError::Embedded(format!("RLIMIT_NOFILE: {e}")))?;
    let connect_timeout = Duration::from_millis(settings.embedded_connect_timeout_ms);
    let limits = EmbeddedLimits::new(fd_limit, settings.embedded_max_connections, connect_timeout)
        .map_err(MqttError::Embedded)?;
    if limits.max_connections < settings.embedded_max_connections {
        tracing::warn!(configured = settings.embedded_max_connections, used = limits.max_connections,
            fd_limit, "embedded-max-connections lowered: the open-file limit (LimitNOFILE=) has no room for more");
    }
    // Fail here, clearly, if the port is taken, rather than inside the broker's thread.
    drop(
        std::net::TcpListener::bind(addr)
            .map_err(|e| MqttError::Embedded(format!("{addr}: {e}")))?,
    );
    let server = rumqttd::ServerSettings {
        name: "shelfwatch-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: limits.accept_interval.as_millis() as u64,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: u16::try_from(settings.embedded_connect_timeout_ms)
                .unwrap_or(u16::MAX),
            max_payload_size: settings.embedded_max_packet_bytes,
            max_inflight_count: 200,
            auth: auth.clone(),
            external_auth: None,
            // Publishes to a topic nobody subscribes to are kept (under a filter of their
            // own); without this rumqttd disconnects their publisher, the daemon included.
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: limits.max_connections,
            max_outgoing_packet_count: 200,
            // Each topic filter keeps its recent messages in memory, in segments of this
            // size (rumqttd refuses less than 1 KiB): at most EMBEDDED_SEGMENTS of them
            // plus one packet, so a filter holds a few packets, not 4 x 16 MiB as before.
            max_segment_size: settings.embedded_max_packet_bytes.max(1024),
            max_segment_count: EMBEDDED_SEGMENTS,
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
    let broker = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| MqttError::Embedded(e.to_string()))?;
    // rumqttd binds inside its own runtime and has no ready signal. On a loaded board
    // the daemon's client got there first, was refused, logged a failed attempt and
    // waited out a back-off: so wait until the broker accepts.
    let started = std::time::Instant::now();
    wait_until_accepting(addr, &broker)?;
    tracing::info!(listen = %addr, ready_ms = started.elapsed().as_millis() as u64,
        max_connections = limits.max_connections,
        max_packet_bytes = settings.embedded_max_packet_bytes,
        accept_interval_ms = limits.accept_interval.as_millis() as u64,
        fd_limit, login_required = auth.is_some(),
        "embedded MQTT broker started");
    Ok(())
}

/// `embedded-listen` as a socket address (an IP address, not a host name: the broker
/// binds it, and whether it is loopback must be known before binding).
pub fn embedded_listen_address(listen: &str) -> Result<std::net::SocketAddr, String> {
    listen.parse().map_err(|e| {
        format!("{listen:?}: expected an IP address and port, e.g. \"127.0.0.1:1883\" ({e})")
    })
}

/// Segments of recent messages a topic filter of the embedded broker keeps in memory.
/// Two: one being filled while a slow subscriber still reads the other.
const EMBEDDED_SEGMENTS: usize = 2;

/// File descriptors kept for the daemon itself: cameras, model and gallery files, spool,
/// state, logging, the async runtime and the client's own socket. The demo (one camera,
/// the embedded broker idle) holds 20 (`ls /proc/<pid>/fd`); three times that leaves
/// room for more cameras, reloads and snapshots. The embedded broker gets the rest.
const FD_RESERVE: u64 = 64;

/// What the open-file limit lets the embedded broker hold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct EmbeddedLimits {
    /// Clients with an MQTT session.
    max_connections: usize,
    /// rumqttd's pause after accepting a connection. A connection that has not sent
    /// CONNECT holds a file descriptor for up to the connect timeout, and rumqttd
    /// counts only sessions against `max_connections`: spacing the accepts is the only
    /// bound on those, and it keeps the broker under the file limit. At the limit,
    /// rumqttd's accept loop retries without pause and logs each failure (300 idle
    /// connections against a 256-file limit: 3.3 million lines in 4.5 s), and the
    /// cameras' reads fail with EMFILE.
    accept_interval: Duration,
}

impl EmbeddedLimits {
    /// `fd_limit` is RLIMIT_NOFILE's soft limit.
    fn new(
        fd_limit: u64,
        max_connections: usize,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let budget = fd_limit.saturating_sub(FD_RESERVE);
        // Sessions may take half of the broker's files; connections that have not sent
        // CONNECT yet the other half.
        let max_connections = (max_connections as u64).min(budget / 2);
        let waiting = budget - max_connections;
        if max_connections < 2 || waiting < 2 {
            return Err(format!(
                "the open-file limit ({fd_limit}) leaves the embedded broker no room: raise it \
                 (LimitNOFILE=) to at least {}",
                FD_RESERVE + 4
            ));
        }
        // At most connect_timeout / interval + 1 connections wait for CONNECT at once.
        let timeout_ms = connect_timeout.as_millis() as u64;
        let interval_ms = timeout_ms.div_ceil(waiting - 1).max(1);
        Ok(Self {
            max_connections: max_connections as usize,
            accept_interval: Duration::from_millis(interval_ms),
        })
    }
}

/// RLIMIT_NOFILE's soft limit (`u64::MAX` when unlimited).
fn open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own and keeps no pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // rlim_t is 32 bits on armv7.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

/// Waits until the embedded broker accepts connections on `addr`, by connecting to it (on
/// loopback when it listens on every address). A connection needs nothing from /proc:
/// watching /proc/net/tcp instead made every start under the systemd unit, whose
/// `ProcSubset=pid` hides it, wait out a 5 s timeout. rumqttd logs the probe, closed
/// before its CONNECT, as an error that the noise filter drops. There is no timeout to
/// wait out: rumqttd binds as soon as its thread runs, and if it cannot, its thread ends,
/// which ends the wait with an error.
fn wait_until_accepting(
    addr: std::net::SocketAddr,
    broker: &std::thread::JoinHandle<()>,
) -> Result<(), MqttError> {
    let probe = probe_address(addr);
    loop {
        match std::net::TcpStream::connect(probe) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if broker.is_finished() {
                    return Err(MqttError::Embedded(format!(
                        "{addr}: the broker stopped before it listened (its error is logged above)"
                    )));
                }
                // Polling: rumqttd offers nothing to wait on.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(MqttError::Embedded(format!(
                    "cannot connect to {probe} to see that the broker listens: {e}"
                )))
            }
        }
    }
}

/// Where to connect to reach a listener on `addr`: loopback for "every address".
fn probe_address(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    probe
}

/// Keeps rumqttd's log truthful and bounded.
///
/// rumqttd 0.20 writes ERROR lines for ordinary client behaviour; those are dropped, so an
/// ERROR from the broker in the journal is worth reading: `router-drop` with
/// `Recv(Disconnected)` is how it logs a client's clean DISCONNECT; "no-connection id N is
/// already gone" the second of the two disconnect events such a client causes (rumqttd's
/// own comment says as much); "Error while handling MQTT connect packet" (a TCP
/// connection that went away before its CONNECT: a port probe, a client giving up) and
/// "disconnected" (a connected client that went away) when the cause is the peer: the
/// connection closed, reset or broken by the other end, or its keep-alive expired (a
/// client killed with unread data in its socket resets the connection instead of closing
/// it; under load that is the common case).
///
/// Everything else the broker says passes, at most [`BROKER_LOG_BURST`] lines at once
/// and one per [`BROKER_LOG_INTERVAL`] after that, per log statement: rumqttd's accept
/// loop logs and retries without pause when `accept` fails (EMFILE), which once wrote
/// 524 MB in 4.5 s, and a client that keeps failing to log in must not flood the journal
/// either. When lines are dropped a WARN says so once, and the next line that passes is
/// preceded by how many were dropped. A global filter: add it to the subscriber's layers.
#[derive(Debug, Default, Clone)]
pub struct BrokerNoiseFilter {
    /// One budget per rumqttd log statement, so a flood of one kind does not hide another.
    budgets: Arc<Mutex<HashMap<tracing::callsite::Identifier, LogBudget>>>,
}

/// Lines a rumqttd log statement may write at once.
const BROKER_LOG_BURST: f64 = 10.0;
/// After the burst, one line per interval and log statement.
const BROKER_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BrokerNoiseFilter {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        if !meta.target().starts_with("rumqttd") {
            return true;
        }
        let mut fields = BrokerEventFields::default();
        event.record(&mut fields);
        if *meta.level() == tracing::Level::ERROR
            && is_client_behaviour(&fields.message, &fields.error)
        {
            return false;
        }
        let admission = self
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(meta.callsite())
            .or_insert_with(LogBudget::full)
            .admit(std::time::Instant::now());
        // The lock is released: these events come back through this filter (under a
        // global subscriber; a scoped one, as in unit tests, drops nested events).
        match admission {
            Admission::Pass { dropped: 0 } => true,
            Admission::Pass { dropped } => {
                tracing::warn!(dropped, line = %fields.message, "rumqttd log lines were dropped (rate-limited)");
                true
            }
            Admission::Drop { first: true } => {
                tracing::warn!(line = %fields.message, burst = BROKER_LOG_BURST as u64,
                    interval_s = BROKER_LOG_INTERVAL.as_secs(),
                    "rumqttd logs this line too often; dropping it until it calms down");
                false
            }
            Admission::Drop { first: false } => false,
        }
    }
}

/// Whether a rumqttd ERROR line (its message and `error` field, as `Debug` prints it)
/// describes what a client did rather than a fault of the broker or the daemon.
fn is_client_behaviour(message: &str, error: &str) -> bool {
    match message {
        "router-drop" => error == "Recv(Disconnected)",
        "Error while handling MQTT connect packet" => peer_went_away(error),
        // A connected client's keep-alive expired: it vanished (power, network).
        "disconnected" => peer_went_away(error) || error.contains("KeepAlive("),
        m => m.starts_with("no-connection id ") && m.ends_with(" is already gone"),
    }
}

/// `io::ErrorKind`s of a peer that closed, reset or broke its end of the connection.
fn peer_went_away(error: &str) -> bool {
    [
        "kind: ConnectionAborted",
        "kind: ConnectionReset",
        "kind: BrokenPipe",
        "kind: UnexpectedEof",
    ]
    .iter()
    .any(|kind| error.contains(kind))
}

/// A token bucket of log lines.
#[derive(Debug)]
struct LogBudget {
    tokens: f64,
    refilled: std::time::Instant,
    dropped: u64,
}

#[derive(Debug, PartialEq)]
enum Admission {
    /// Write the line; `dropped` lines were dropped since the last one written.
    Pass { dropped: u64 },
    /// Drop the line; `first` of a run of dropped lines.
    Drop { first: bool },
}

impl LogBudget {
    fn full() -> Self {
        Self {
            tokens: BROKER_LOG_BURST,
            refilled: std::time::Instant::now(),
            dropped: 0,
        }
    }

    fn admit(&mut self, now: std::time::Instant) -> Admission {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64()
            / BROKER_LOG_INTERVAL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(BROKER_LOG_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admission::Pass {
                dropped: std::mem::take(&mut self.dropped),
            }
        } else {
            self.dropped += 1;
            Admission::Drop {
                first: self.dropped == 1,
            }
        }
    }
}

#[derive(Default)]
struct BrokerEventFields {
    message: String,
    error: String,
}

impl tracing::field::Visit for BrokerEventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings for the embedded broker on a free loopback port.
    fn embedded_on_a_free_port() -> MqttSettings {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        toml::from_str(&format!("embedded-listen = \"{addr}\"")).unwrap()
    }

    #[test]
    fn the_embedded_broker_listens_before_start_returns() {
        let settings = embedded_on_a_free_port();
        start_embedded_broker(&settings, Path::to_owned).unwrap();
        // Ready means a client's first attempt is accepted, not refused (under load the
        // broker thread can take milliseconds to bind; the demo's client once got there first).
        std::net::TcpStream::connect(&settings.embedded_listen)
            .expect("connect to the embedded broker");
    }

    #[test]
    fn readiness_is_a_connection_to_the_listener_not_a_look_at_proc() {
        // Issue #19: under the unit's ProcSubset=pid there is no /proc/net/tcp. The wait
        // connects instead; a listener nobody accepts on is enough (the kernel completes
        // the handshake).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = std::thread::spawn(|| {});
        wait_until_accepting(addr, &broker).unwrap();
        drop(listener);
        // A broker on every address is reached on loopback (nothing binds those here).
        let every: std::net::SocketAddr = "0.0.0.0:1883".parse().unwrap();
        assert_eq!(probe_address(every), "127.0.0.1:1883".parse().unwrap());
        let every6: std::net::SocketAddr = "[::]:1883".parse().unwrap();
        assert_eq!(probe_address(every6), "[::1]:1883".parse().unwrap());
        let lan: std::net::SocketAddr = "192.168.1.20:1883".parse().unwrap();
        assert_eq!(probe_address(lan), lan);
    }

    #[test]
    fn readiness_fails_instead_of_waiting_when_the_broker_thread_ended_without_listening() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let ended = std::thread::spawn(|| {});
        while !ended.is_finished() {
            std::thread::yield_now();
        }
        let e = wait_until_accepting(addr, &ended).unwrap_err();
        assert!(e.to_string().contains("stopped before it listened"), "{e}");
    }

    #[test]
    fn the_broker_gets_the_files_the_daemon_does_not_need_and_no_more() {
        let timeout = Duration::from_millis(5000);
        // Issue #19: 300 idle connections against a 256-file limit. Sessions and
        // connections still waiting for CONNECT (one per accept interval, each for up to
        // the timeout) stay within the files above the daemon's reserve.
        let l = EmbeddedLimits::new(256, 32, timeout).unwrap();
        assert_eq!(l.max_connections, 32);
        let waiting = timeout.as_millis() / l.accept_interval.as_millis() + 1;
        assert!(
            l.max_connections as u128 + waiting <= 256 - FD_RESERVE as u128,
            "{l:?}"
        );
        // A roomy limit: no pause to speak of, the configured sessions.
        let l = EmbeddedLimits::new(1 << 20, 32, timeout).unwrap();
        assert_eq!(
            l,
            EmbeddedLimits {
                max_connections: 32,
                accept_interval: Duration::from_millis(1)
            }
        );
        // A tight one lowers the sessions too; none at all is an error that says what to raise.
        let l = EmbeddedLimits::new(FD_RESERVE + 20, 32, timeout).unwrap();
        assert_eq!(l.max_connections, 10);
        let e = EmbeddedLimits::new(FD_RESERVE + 2, 32, timeout).unwrap_err();
        assert!(e.contains("LimitNOFILE"), "{e}");
        assert!(EmbeddedLimits::new(u64::MAX, 32, timeout).is_ok());
    }

    #[test]
    fn a_non_loopback_embedded_broker_without_credentials_does_not_start() {
        let settings: MqttSettings = toml::from_str("embedded-listen = \"0.0.0.0:0\"").unwrap();
        let e = start_embedded_broker(&settings, Path::to_owned).unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
    }

    #[test]
    fn client_ids_are_drawn_anew() {
        assert_ne!(random_u64().unwrap(), random_u64().unwrap());
    }

    #[test]
    fn the_broker_noise_filter_drops_client_disconnects_and_probes_but_keeps_real_errors() {
        use tracing_subscriber::layer::SubscriberExt;

        // Debug output like rumqttd's error values.
        #[derive(Debug)]
        enum RecvError {
            Disconnected,
        }
        #[derive(Debug)]
        enum LinkError {
            Recv(RecvError),
            NotConnected,
        }
        // Only ever printed, through Debug, as rumqttd prints its own.
        #[derive(Debug)]
        struct Elapsed(());
        #[allow(dead_code)]
        #[derive(Debug)]
        enum NetworkError {
            Io(std::io::Error),
            KeepAlive(Elapsed),
        }
        #[allow(dead_code)]
        #[derive(Debug)]
        enum RemoteError {
            Network(NetworkError),
            Timeout(Elapsed),
            InvalidAuth,
        }
        let io = |kind| std::io::Error::new(kind, "by peer");
        let os = |code| NetworkError::Io(std::io::Error::from_raw_os_error(code));
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let writer = {
            let seen = Arc::clone(&seen);
            move || CaptureLine(Arc::clone(&seen))
        };
        let subscriber = tracing_subscriber::registry()
            .with(BrokerNoiseFilter::default())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            );
        tracing::subscriber::with_default(subscriber, || {
            // Client behaviour: dropped.
            tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection closed by peer"), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Network(NetworkError::Io(io(std::io::ErrorKind::ConnectionReset))), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            // Issue #19: a subscriber killed with unread data resets its connection; under
            // load that is how mosquitto_sub leaves, and the demo test saw it as an ERROR.
            for e in [
                os(libc::ECONNRESET),
                os(libc::EPIPE),
                NetworkError::Io(io(std::io::ErrorKind::UnexpectedEof)),
                NetworkError::KeepAlive(Elapsed(())),
            ] {
                tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Network(e), "disconnected");
            }
            // Faults, or worth knowing: kept.
            tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::NotConnected, "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed"), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::InvalidAuth, "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Timeout(Elapsed(())), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?os(libc::EMFILE), "Unable to accept socket.");
            tracing::error!(target: "rumqttd::server::broker", "connection-stop");
            // Only rumqttd's own ERROR lines are judged: the same words elsewhere pass.
            tracing::warn!(target: "rumqttd::server::broker", error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
            tracing::error!(error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
        });
        let seen = seen.lock().unwrap();
        let shown = |needle: &str| seen.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(seen.len(), 8, "{seen:#?}");
        for kept in [
            "NotConnected",
            "malformed",
            "InvalidAuth",
            "Timeout(Elapsed",
            "Too many open files",
            "connection-stop",
        ] {
            assert_eq!(shown(kept), 1, "{kept}: {seen:#?}");
        }
        for dropped in [
            "closed by peer",
            "ConnectionReset",
            "BrokenPipe",
            "UnexpectedEof",
            "KeepAlive",
            "already gone",
        ] {
            assert_eq!(shown(dropped), 0, "{dropped}: {seen:#?}");
        }
        assert_eq!(shown("Recv(Disconnected)"), 2);
    }

    #[test]
    fn a_flooding_broker_log_statement_is_cut_to_its_budget_and_others_still_pass() {
        use tracing_subscriber::layer::SubscriberExt;

        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let writer = {
            let seen = Arc::clone(&seen);
            move || CaptureLine(Arc::clone(&seen))
        };
        let subscriber = tracing_subscriber::registry()
            .with(BrokerNoiseFilter::default())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            );
        tracing::subscriber::with_default(subscriber, || {
            // Issue #19: EMFILE made rumqttd's accept loop log without pause.
            for _ in 0..10_000 {
                tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::from_raw_os_error(libc::EMFILE), "Unable to accept socket.");
            }
            tracing::error!(target: "rumqttd::server::broker", "connection-stop");
            for _ in 0..100 {
                tracing::info!("the daemon's own lines are never limited");
            }
        });
        let seen = seen.lock().unwrap();
        let shown = |needle: &str| seen.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(shown("Unable to accept socket."), BROKER_LOG_BURST as usize);
        assert_eq!(shown("connection-stop"), 1);
        assert_eq!(shown("never limited"), 100);
    }

    #[test]
    fn a_log_budget_refills_one_line_per_interval_and_reports_what_it_dropped() {
        let start = std::time::Instant::now();
        let mut budget = LogBudget {
            tokens: BROKER_LOG_BURST,
            refilled: start,
            dropped: 0,
        };
        for _ in 0..BROKER_LOG_BURST as usize {
            assert_eq!(budget.admit(start), Admission::Pass { dropped: 0 });
        }
        assert_eq!(budget.admit(start), Admission::Drop { first: true });
        assert_eq!(budget.admit(start), Admission::Drop { first: false });
        let half = start + BROKER_LOG_INTERVAL / 2;
        assert_eq!(budget.admit(half), Admission::Drop { first: false });
        let one = start + BROKER_LOG_INTERVAL;
        assert_eq!(budget.admit(one), Admission::Pass { dropped: 3 });
        assert_eq!(budget.admit(one), Admission::Drop { first: true });
        // Quiet for long: the burst is back, not more.
        let later = one + BROKER_LOG_INTERVAL * 1000;
        for _ in 0..BROKER_LOG_BURST as usize {
            assert!(matches!(budget.admit(later), Admission::Pass { .. }));
        }
        assert!(matches!(budget.admit(later), Admission::Drop { .. }));
    }

    /// A `MakeWriter` target that keeps each formatted line.
    struct CaptureLine(Arc<Mutex<Vec<String>>>);

    impl std::io::Write for CaptureLine {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

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
