//! MQTT publishing that loses nothing: messages go through the durable [`Spool`], the
//! rumqttc event loop runs in its own task, reconnects back off exponentially with
//! jitter, and a message leaves the spool only on the broker's PUBACK.
//!
//! Topics (`<p>` = prefix, `<d>` = device id):
//! `<p>/<d>/status` (retained online/offline, last will offline),
//! `<p>/<d>/zones/<zone>/state` (retained), `<p>/<d>/events`, `<p>/<d>/health`,
//! `<p>/<d>/snapshot/<camera>` (JPEG, on request), commands under `<p>/<d>/cmd/`.
//!
//! This module is the public face: opening a sink ([`Background::open`]) starts what
//! it needs beside the publisher thread (the embedded broker, the client task, the
//! scanner request thread). Its rooms: `settings`, `topics` (and the sink), `link` (the
//! at-least-once bookkeeping), `client` (the task), `protocol` (MQTT 3.1.1 and 5
//! behind one face), `tls`, `discovery` (Home Assistant), `scanner`, `broker` (the
//! embedded one) and `broker_log` (its log filter).

mod broker;
mod broker_log;
mod client;
mod discovery;
mod link;
mod protocol;
mod scanner;
mod settings;
mod tls;
mod topics;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch, Notify};

pub use broker::{embedded_listen_address, start_embedded_broker};
pub use broker_log::BrokerNoiseFilter;
pub use client::MqttClient;
pub use discovery::{discovery_configs, ZoneInfo};
pub use scanner::{AnswerCell, ScannerLink, ScannerParts};
pub use settings::{
    default_discovery_prefix, HomeAssistantSettings, MqttSettings, Protocol, TlsSettings,
};
pub use topics::{MqttSink, Topics};

use super::spool::{Spool, SpoolError};
use super::MqttHealth;
use discovery::Discovery;
use protocol::LinkOptions;

/// Errors setting the client up (reading credentials and certificates, starting the
/// embedded broker and the scanner request thread).
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
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("embedded broker: {0}")]
    Embedded(String),
    #[error("cannot draw a random client id: {0}")]
    Random(std::io::Error),
    /// The scanner request thread's own embedder.
    #[error(transparent)]
    Embedder(#[from] crate::vision::VisionError),
    /// The scanner request thread could not be started.
    #[error(transparent)]
    Thread(std::io::Error),
}

/// A command received under `<prefix>/<device>/cmd/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Snapshot of one camera, or of all when `None`.
    Snapshot(Option<String>),
    Reload,
}

#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    pub connect_attempts: AtomicU64,
    pub spooled: AtomicU64,
    pub spooled_bytes: AtomicU64,
    pub dropped: AtomicU64,
    /// Damaged spool records skipped (see [`Spool::damaged`]).
    pub spool_damaged: AtomicU64,
    /// False while the spool cannot write to disk (messages held in memory only).
    pub spool_on_disk: AtomicBool,
}

impl MqttStats {
    fn record(&self, spool: &Spool) {
        self.spooled.store(spool.len() as u64, Ordering::Relaxed);
        self.spooled_bytes
            .store(spool.pending_bytes() as u64, Ordering::Relaxed);
        self.dropped.store(spool.dropped(), Ordering::Relaxed);
        self.spool_damaged.store(spool.damaged(), Ordering::Relaxed);
        self.spool_on_disk.store(spool.on_disk(), Ordering::Relaxed);
    }
}

/// Time the client tasks have at shutdown to deliver what is spooled and say offline.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// What opening an MQTT sink needs from the daemon besides its settings.
pub struct Wiring<'a> {
    pub device: &'a str,
    /// The daemon's state directory: the spool (and the Home Assistant discovery
    /// record) lives in `spool/` there.
    pub state_dir: &'a Path,
    /// The configured zones, for Home Assistant discovery.
    pub zones: &'a [ZoneInfo],
    /// The runtime the client tasks run on (the daemon's, which its control plane drives).
    pub runtime: &'a tokio::runtime::Handle,
    /// Scanner requests are answered when set.
    pub scanner: Option<ScannerParts<'a>>,
}

/// What the MQTT sinks run beside the publisher thread: a client task each (and a
/// scanner request thread each when requests are answered), and what the daemon's
/// control plane reads of them: commands, link figures and the scanners' answering.
pub struct Background {
    /// Kept, so that without a sink [`Background::command`] waits rather than ends.
    commands_tx: mpsc::Sender<Command>,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The last opened sink's, for health records.
    stats: Option<Arc<MqttStats>>,
    answer_cells: Vec<AnswerCell>,
}

impl Default for Background {
    fn default() -> Self {
        let (commands_tx, commands) = mpsc::channel(8);
        let (shutdown, _) = watch::channel(false);
        Self {
            commands_tx,
            commands,
            shutdown,
            tasks: Vec::new(),
            stats: None,
            answer_cells: Vec::new(),
        }
    }
}

impl Background {
    /// Opens an MQTT sink: starts the embedded broker when `broker = "embedded"`, the
    /// scanner request thread when `wiring` has scanner parts, opens the spool and
    /// spawns the client task on `wiring.runtime`. `resolve` makes config-relative
    /// paths usable.
    pub fn open(
        &mut self,
        settings: &MqttSettings,
        wiring: &Wiring<'_>,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<MqttSink, MqttError> {
        if settings.broker == "embedded" {
            start_embedded_broker(settings, &resolve)?;
        }
        let scanner = match &wiring.scanner {
            Some(parts) => {
                let (link, cell) = scanner::start(parts, settings, wiring.device)?;
                self.answer_cells.push(cell);
                Some(link)
            }
            None => None,
        };
        let (sink, client, stats) = setup(
            settings,
            wiring.device,
            &wiring.state_dir.join("spool"),
            resolve,
            self.commands_tx.clone(),
            wiring.zones.to_vec(),
            scanner,
        )?;
        self.stats = Some(stats);
        let task = client.run(self.shutdown.subscribe(), SHUTDOWN_GRACE);
        self.tasks.push(wiring.runtime.spawn(task));
        Ok(sink)
    }

    /// The next command received by any MQTT sink; pending while there is none.
    pub async fn command(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    /// The link and spool figures of the last opened sink; None without one.
    pub fn health(&self) -> Option<MqttHealth> {
        self.stats.as_ref().map(|m| MqttHealth {
            connected: m.connected.load(Ordering::Relaxed),
            spooled: m.spooled.load(Ordering::Relaxed),
            spooled_bytes: m.spooled_bytes.load(Ordering::Relaxed),
            dropped: m.dropped.load(Ordering::Relaxed),
            spool_damaged: m.spool_damaged.load(Ordering::Relaxed),
            connect_attempts: m.connect_attempts.load(Ordering::Relaxed),
            spool_on_disk: m.spool_on_disk.load(Ordering::Relaxed),
        })
    }

    /// Where a reload puts the scanner threads' new answering (gallery, thresholds).
    pub fn answer_cells(&self) -> Vec<AnswerCell> {
        self.answer_cells.clone()
    }

    /// Call once the publisher has spooled everything: gives the client tasks their
    /// grace period to deliver it and to say offline, and waits for them.
    pub async fn shut_down(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
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
    let (host, port) = settings::broker_address(settings)?;
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
            Arc::new(tls::rustls_config(tls, &resolve)?),
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
    let discovery = settings.home_assistant.as_ref().map(|ha| Discovery {
        prefix: ha.discovery_prefix.clone(),
        device: device.to_owned(),
        topics: topics.clone(),
        zones,
        record: spool_dir.join("ha-discovery.json"),
    });
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
        discovery,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_drawn_anew() {
        assert_ne!(random_u64().unwrap(), random_u64().unwrap());
    }
}
