//! The `shelfwatch run` daemon: wires capture -> vision -> counting -> publish for every
//! configured camera, and runs the control plane (signals, reload, health, systemd).
//!
//! Threads: per camera a capture thread and an inference+counting worker (sharing one
//! loaded model); one publisher thread that stamps sequence numbers, persists state and
//! writes to the sinks. The async runtime only waits for signals and timers.

pub mod memory;
pub mod state;
pub mod worker;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::capture::{self, Backoff};
use crate::config::{Config, ConfigErrors, LoadedConfig};
use crate::counting::{EventKind, ZoneState};
use crate::identify::requests::Answering;
use crate::identify::{Gallery, TrackParams};
use crate::publish::{self, Body, CameraHealth, Envelope, Health, Sink};
use crate::vision::{Detector, Embedder};
use state::{SavedState, StateStore};
use worker::{CameraRuntime, IdentifyRuntime, RuntimeCell, Worker, WorkerStats};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Model(#[from] crate::vision::VisionError),
    #[error(transparent)]
    Sink(#[from] publish::SinkError),
    #[error("no cameras configured: add a [[cameras]] section")]
    NoCameras,
    #[error(transparent)]
    Mqtt(#[from] publish::mqtt::MqttError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Gallery(#[from] crate::identify::GalleryError),
}

/// What workers tell the publisher.
#[derive(Debug)]
pub enum Update {
    State {
        camera: String,
        zone: String,
        state: ZoneState,
        at: SystemTime,
    },
    Event {
        camera: String,
        zone: Option<String>,
        event: EventKind,
        at: SystemTime,
    },
    Health(Health),
    Snapshot {
        camera: String,
        jpeg: Vec<u8>,
    },
}

/// Capacity of the worker -> publisher channel: bursts of events fit; a stuck sink
/// slows inference rather than growing memory.
const UPDATE_QUEUE: usize = 1024;

/// Scanner requests waiting to be answered; more are answered "busy" at once, since a
/// scanner user waits for each answer.
const REQUEST_QUEUE: usize = 4;

struct Camera {
    id: String,
    runtime: Arc<RuntimeCell>,
    stats: Arc<WorkerStats>,
    capture: Arc<capture::CaptureStats>,
    dropped: Arc<dyn Fn() -> u64 + Send + Sync>,
    snapshot_now: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

fn runtime_of(
    loaded: &LoadedConfig,
    cam: &crate::config::CameraConfig,
    identify: &Option<Arc<IdentifyRuntime>>,
) -> CameraRuntime {
    CameraRuntime {
        zones: cam.zones.clone(),
        counting: loaded.config.counting.clone(),
        params: loaded.config.counting.params(),
        detector: loaded.detector_options(),
        occluder: loaded.occluder_model().map(|(_, o)| o),
        identify: identify.clone(),
        rescale_interval: std::time::Duration::from_secs(loaded.config.model.rescale_interval_s),
    }
}

/// Reads the configured gallery for `model`. A gallery not enrolled yet is empty (every
/// product `unknown` until `enroll` and a SIGHUP); an unreadable one is an error.
fn load_gallery(
    loaded: &LoadedConfig,
    model: &crate::vision::embed::ModelId,
) -> Result<Option<Arc<IdentifyRuntime>>, crate::identify::GalleryError> {
    let (Some(cfg), Some((_, dir))) = (&loaded.config.identify, loaded.identify_paths()) else {
        return Ok(None);
    };
    let gallery = match Gallery::load_for(&dir, model) {
        Ok(g) => g,
        Err(crate::identify::GalleryError::Missing { path }) => {
            tracing::warn!(gallery = %path.display(), "no gallery yet: every product is unknown until one is enrolled (then SIGHUP)");
            Gallery::new(model.clone())
        }
        Err(e) => return Err(e),
    };
    tracing::info!(gallery = %dir.display(), skus = gallery.skus().len(), references = gallery.len(), "gallery loaded");
    Ok(Some(Arc::new(IdentifyRuntime {
        gallery: Arc::new(gallery),
        params: TrackParams::new(cfg, &loaded.config.counting.params().occluders),
    })))
}

/// What the scanner request thread answers with, from the identification runtime.
fn answering(loaded: &LoadedConfig, id: &IdentifyRuntime) -> Option<Answering> {
    loaded.config.identify.as_ref().map(|c| Answering {
        gallery: id.gallery.clone(),
        top_k: c.top_k,
        unknown_threshold: c.unknown_threshold,
        max_request_bytes: c.max_request_bytes,
        decode: Answering::request_limits(
            &loaded.config.decode,
            c.max_request_pixels,
            c.max_request_bytes,
        ),
    })
}

/// Runs the daemon until SIGTERM/SIGINT, or until every (file) source has ended.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    let loaded = Config::load(config_path)?;
    let config = loaded.config.clone();
    if config.cameras.is_empty() {
        return Err(DaemonError::NoCameras);
    }
    let started = Instant::now();
    let store = StateStore::open(&loaded.resolve(&config.state.dir))?;
    let saved = store.load()?;
    tracing::info!(state = %store.path().display(), seq = saved.seq, zones = saved.zones.len(), "state loaded");

    let detector = Detector::load(&loaded.manifest_path(), &loaded.detector_options())?;
    let occluder = match loaded.occluder_model() {
        Some((manifest, options)) => Some(Detector::load(&manifest, &options)?),
        None => {
            let unknown: Vec<&String> = config
                .counting
                .occluders
                .iter()
                .filter(|l| !detector.labels().contains(l))
                .collect();
            if !unknown.is_empty() {
                tracing::info!(model = %detector.manifest().manifest.name, occluders = ?unknown, "the counting model does not find these occluders; set counting.occluder-model to hold counts while people stand in front of shelves");
            }
            None
        }
    };
    let embedder = match loaded.identify_paths() {
        Some((manifest, _)) => Some(Embedder::load(&manifest, &loaded.embedder_options())?),
        None => None,
    };
    let identify = match &embedder {
        Some(e) => load_gallery(&loaded, &e.model_id())?,
        None => None,
    };
    memory::release_free_heap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (command_tx, command_rx) = tokio::sync::mpsc::channel(8);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let mut mqtt_tasks = Vec::new();
    let mut mqtt_stats = None;
    let mut answer_cells = Vec::new();
    for s in &config.sinks {
        if let Some(sink) = publish::open_sink(s, |p| loaded.resolve(p))? {
            sinks.push(sink);
            continue;
        }
        let publish::SinkSettings::Mqtt(m) = s else {
            continue;
        };
        if m.broker == "embedded" {
            publish::mqtt::start_embedded_broker(m, |p| loaded.resolve(p))?;
        }
        let spool_dir = store.path().with_file_name("spool");
        let zones = config
            .cameras
            .iter()
            .flat_map(|c| {
                c.zones.iter().map(|z| publish::mqtt::ZoneInfo {
                    camera: c.id.clone(),
                    zone: z.name.clone(),
                    labels: z.labels.clone(),
                })
            })
            .collect();
        // Scanner requests: one serving thread per MQTT sink, with its own embedder.
        let scanner = match (&identify, &embedder, &config.identify) {
            (Some(id), Some(e), Some(c)) if c.requests => {
                let (req_tx, req_rx) = tokio::sync::mpsc::channel(REQUEST_QUEUE);
                let (rep_tx, rep_rx) = tokio::sync::mpsc::channel(REQUEST_QUEUE);
                let cell = Arc::new(std::sync::Mutex::new(Arc::new(
                    answering(&loaded, id).expect("identify is configured"),
                )));
                answer_cells.push(cell.clone());
                let fork = e.fork()?;
                let device = config.device.id.clone();
                let discovery = m
                    .home_assistant
                    .as_ref()
                    .map_or_else(publish::mqtt::default_discovery_prefix, |ha| {
                        ha.discovery_prefix.clone()
                    });
                let policy = Arc::new(crate::identify::requests::ReplyPolicy::new(
                    &m.prefix,
                    &device,
                    &discovery,
                    c.reply_topics.clone(),
                ));
                let thread_policy = policy.clone();
                std::thread::Builder::new()
                    .name("identify-requests".into())
                    .spawn(move || {
                        crate::identify::requests::serve(
                            fork,
                            cell,
                            req_rx,
                            rep_tx,
                            device,
                            thread_policy,
                        )
                    })?;
                Some(publish::mqtt::ScannerLink {
                    requests: req_tx,
                    replies: rep_rx,
                    policy,
                    limiter: crate::identify::requests::RateLimiter::new(
                        c.requests_per_s,
                        c.request_burst,
                    ),
                })
            }
            _ => None,
        };
        let (sink, client, stats) = publish::mqtt::setup(
            m,
            &config.device.id,
            &spool_dir,
            |p| loaded.resolve(p),
            command_tx.clone(),
            zones,
            scanner,
        )?;
        sinks.push(Box::new(sink));
        mqtt_stats = Some(stats);
        mqtt_tasks.push(rt.spawn(client.run(shutdown_rx.clone(), Duration::from_millis(1500))));
    }
    drop(command_tx);

    let (tx, rx) = std::sync::mpsc::sync_channel::<Update>(UPDATE_QUEUE);
    let publisher = Publisher {
        device: config.device.id.clone(),
        store,
        saved: saved.clone(),
        sinks,
        state_save_failing: false,
    };
    // Subscribers get the last known counts at once, never a false zero after a restart.
    let restored: Vec<Update> = saved
        .zones
        .iter()
        .filter_map(|(key, state)| {
            let (camera, zone) = key.split_once('/')?;
            let configured = config
                .cameras
                .iter()
                .any(|c| c.id == camera && c.zones.iter().any(|z| z.name == zone));
            configured.then(|| Update::State {
                camera: camera.into(),
                zone: zone.into(),
                state: state.clone(),
                at: SystemTime::now(),
            })
        })
        .collect();
    let publisher_thread = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || publisher.run(rx, restored))?;

    let stop = Arc::new(AtomicBool::new(false));
    let snapshot_dir = config.snapshots.dir.as_ref().map(|d| loaded.resolve(d));
    let snapshot_every = config
        .snapshots
        .interval_s
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let mut cameras = Vec::new();
    for cam in &config.cameras {
        let source = cam.source.build(|p| loaded.resolve(p), config.decode);
        let (status_tx, status_rx) = std::sync::mpsc::sync_channel(64);
        let handle = capture::spawn(cam.id.clone(), source, Backoff::default(), Some(status_tx))?;
        let runtime = Arc::new(RuntimeCell::new(runtime_of(&loaded, cam, &identify)));
        let stats = Arc::new(WorkerStats::default());
        let snapshot_now = Arc::new(AtomicBool::new(false));
        let restored: BTreeMap<String, ZoneState> = saved
            .zones
            .iter()
            .filter_map(|(k, v)| {
                let (c, z) = k.split_once('/')?;
                (c == cam.id).then(|| (z.to_owned(), v.clone()))
            })
            .collect();
        let capture_stats = handle.stats.clone();
        let slot = handle.slot.clone();
        let worker = Worker {
            camera: cam.id.clone(),
            detector: crate::vision::scale::ScaledDetector::new(
                detector.fork()?,
                loaded.detector_options().input_size,
                std::time::Duration::from_secs(loaded.config.model.rescale_interval_s),
            ),
            occluder: occluder.as_ref().map(Detector::fork).transpose()?,
            embedder: embedder.as_ref().map(Embedder::fork).transpose()?,
            capture: handle,
            status: status_rx,
            runtime: runtime.clone(),
            restored,
            updates: tx.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            snapshot_now: snapshot_now.clone(),
            snapshot_dir: snapshot_dir.clone(),
            snapshot_every,
        };
        let thread = std::thread::Builder::new()
            .name(format!("infer-{}", cam.id))
            .spawn(move || worker.run())?;
        cameras.push(Camera {
            id: cam.id.clone(),
            runtime,
            stats,
            capture: capture_stats,
            dropped: Arc::new(move || slot.dropped()),
            snapshot_now,
            thread,
        });
    }
    drop(detector);
    drop(occluder);
    drop(embedder);
    let mut reloader = Reloader {
        config_path,
        initial: &loaded,
        identify: IdentifyState {
            model: identify.as_ref().map(|i| i.gallery.model().clone()),
            current: identify,
            answer_cells,
        },
    };

    let result = rt.block_on(control(
        &mut reloader,
        &cameras,
        &tx,
        started,
        command_rx,
        mqtt_stats,
    ));
    stop.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for c in cameras {
        let _ = c.thread.join();
    }
    drop(tx);
    let _ = publisher_thread.join();
    // The publisher has spooled everything: give the MQTT client a moment to deliver it
    // and to say offline.
    let _ = shutdown_tx.send(true);
    rt.block_on(async {
        for t in mqtt_tasks {
            let _ = t.await;
        }
    });
    tracing::info!(uptime_s = started.elapsed().as_secs_f64(), "stopped");
    result
}

/// The control plane: signals, reload, health, readiness and the watchdog.
async fn control(
    reloader: &mut Reloader<'_>,
    cameras: &[Camera],
    tx: &SyncSender<Update>,
    started: Instant,
    mut commands: tokio::sync::mpsc::Receiver<publish::mqtt::Command>,
    mqtt: Option<Arc<publish::mqtt::MqttStats>>,
) -> Result<(), DaemonError> {
    let initial = reloader.initial;
    let identifying = reloader.identify.model.is_some();
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;

    let health_every = initial.config.health.interval_s;
    let mut health = tokio::time::interval(Duration::from_secs(health_every.max(1)));
    health.tick().await;
    let mut last_processed: Vec<u64> = vec![0; cameras.len()];
    let mut last_health = Instant::now();

    let mut watchdog_usec = 0u64;
    let watchdog_enabled = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut watchdog = tokio::time::interval(if watchdog_enabled {
        Duration::from_micros(watchdog_usec / 2)
    } else {
        Duration::from_secs(3600)
    });
    let mut watch_processed: Vec<u64> = vec![0; cameras.len()];

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ready = false;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reloader.reload(cameras),
            Some(cmd) = commands.recv() => match cmd {
                publish::mqtt::Command::Reload => reloader.reload(cameras),
                publish::mqtt::Command::Snapshot(which) => {
                    for c in cameras.iter().filter(|c| which.as_ref().is_none_or(|w| *w == c.id)) {
                        c.snapshot_now.store(true, Ordering::Relaxed);
                    }
                }
            },
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: snapshot requested");
                for c in cameras { c.snapshot_now.store(true, Ordering::Relaxed); }
            }
            _ = health.tick(), if health_every > 0 => {
                let dt = last_health.elapsed().as_secs_f64().max(1e-3);
                last_health = Instant::now();
                let report = Health {
                    uptime_s: started.elapsed().as_secs_f64(),
                    cameras: cameras.iter().zip(last_processed.iter_mut()).map(|(c, last)| {
                        let processed = c.stats.processed.load(Ordering::Relaxed);
                        let fps = (processed - *last) as f64 / dt;
                        *last = processed;
                        let (p50, p99) = c.stats.percentiles();
                        CameraHealth {
                            camera: c.id.clone(),
                            online: c.capture.online.load(Ordering::Relaxed),
                            fps,
                            inference_ms_p50: p50,
                            inference_ms_p99: p99,
                            frames_captured: c.capture.frames.load(Ordering::Relaxed),
                            frames_processed: processed,
                            frames_dropped: (c.dropped)(),
                            frames_corrupt: c.capture.corrupt.load(Ordering::Relaxed),
                            reconnects: c.capture.reconnects.load(Ordering::Relaxed),
                            products_embedded: identifying.then(|| c.stats.embedded.load(Ordering::Relaxed)),
                            embeddings_deferred: identifying.then(|| c.stats.embed_deferred.load(Ordering::Relaxed)),
                        }
                    }).collect(),
                    mqtt: mqtt.as_ref().map(|m| publish::MqttHealth {
                        connected: m.connected.load(Ordering::Relaxed),
                        spooled: m.spooled.load(Ordering::Relaxed),
                        dropped: m.dropped.load(Ordering::Relaxed),
                        spool_damaged: m.spool_damaged.load(Ordering::Relaxed),
                        connect_attempts: m.connect_attempts.load(Ordering::Relaxed),
                        spool_on_disk: m.spool_on_disk.load(Ordering::Relaxed),
                    }),
                };
                let _ = tx.try_send(Update::Health(report));
            }
            _ = watchdog.tick(), if watchdog_enabled => {
                // Pet the watchdog only while the pipeline moves: every camera that has
                // frames to give processed at least one since the last tick. A stuck
                // inference thread thus gets the service restarted; an unplugged camera
                // (handled by reconnect backoff) does not.
                let mut alive = true;
                for (c, last) in cameras.iter().zip(watch_processed.iter_mut()) {
                    let now = c.stats.processed.load(Ordering::Relaxed);
                    let online = c.capture.online.load(Ordering::Relaxed);
                    if online && now == *last && !c.stats.finished.load(Ordering::Relaxed) {
                        alive = false;
                        tracing::warn!(camera = %c.id, "no frame processed since the last watchdog tick");
                    }
                    *last = now;
                }
                if alive && ready {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
            _ = tick.tick() => {
                if !ready && cameras.iter().all(|c| c.stats.processed.load(Ordering::Relaxed) > 0) {
                    ready = true;
                    tracing::info!(cameras = cameras.len(), startup_s = started.elapsed().as_secs_f64(), "ready: every camera is delivering counted frames");
                    let _ = sd_notify::notify(false, &[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status("counting"),
                    ]);
                }
                if cameras.iter().all(|c| c.stats.finished.load(Ordering::Relaxed)) {
                    tracing::info!("every source has ended");
                    break;
                }
            }
        }
    }
    Ok(())
}

/// SIGHUP: re-reads the config and applies zones and thresholds; an invalid config is
/// reported (key and line) and the running one kept.
/// The identification runtime the cameras and the scanner thread share, replaced by a
/// reload (a new gallery or thresholds).
struct IdentifyState {
    /// The embedding model loaded at start; None without `[identify]`.
    model: Option<crate::vision::embed::ModelId>,
    current: Option<Arc<IdentifyRuntime>>,
    answer_cells: Vec<Arc<std::sync::Mutex<Arc<Answering>>>>,
}

impl IdentifyState {
    /// Re-reads the gallery for the new config; on failure the running one stays.
    fn reload(&mut self, initial: &LoadedConfig, loaded: &LoadedConfig) {
        let Some(model) = &self.model else {
            if loaded.config.identify.is_some() {
                tracing::warn!("[identify] was added: it takes effect after a restart");
            }
            return;
        };
        if loaded.identify_paths().map(|p| p.0) != initial.identify_paths().map(|p| p.0) {
            tracing::warn!("identify.model changes take effect after a restart");
        }
        if loaded.config.identify.is_none() {
            tracing::info!("[identify] removed: counting per detector label");
            self.current = None;
            return;
        }
        match load_gallery(loaded, model) {
            Ok(Some(id)) => {
                for cell in &self.answer_cells {
                    if let Some(a) = answering(loaded, &id) {
                        *cell.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(a);
                    }
                }
                self.current = Some(id);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "gallery not reloaded; keeping the running one")
            }
        }
    }
}

/// What a reload (SIGHUP, MQTT cmd/reload) needs: the config as started and the
/// identification state it replaces.
struct Reloader<'a> {
    config_path: &'a Path,
    initial: &'a LoadedConfig,
    identify: IdentifyState,
}

impl Reloader<'_> {
    fn reload(&mut self, cameras: &[Camera]) {
        reload(self.config_path, self.initial, cameras, &mut self.identify)
    }
}

fn reload(
    config_path: &Path,
    initial: &LoadedConfig,
    cameras: &[Camera],
    identify: &mut IdentifyState,
) {
    tracing::info!(config = %config_path.display(), "SIGHUP: reloading zones and thresholds");
    let loaded = match Config::load(config_path) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(file = %e.file.display(), line = e.line, key = %e.key, message = %e.message, "invalid configuration; keeping the running one");
            }
            return;
        }
    };
    identify.reload(initial, &loaded);
    let new = &loaded.config;
    let old = &initial.config;
    if new.device.id != old.device.id
        || loaded.manifest_path() != initial.manifest_path()
        || new.model.input_size != old.model.input_size
        || loaded.occluder_model().map(|o| o.0) != initial.occluder_model().map(|o| o.0)
    {
        tracing::warn!(
            "device id, model, input size and occluder model changes take effect after a restart"
        );
    }
    for c in cameras {
        match new.cameras.iter().find(|n| n.id == c.id) {
            Some(cam) => {
                if old.cameras.iter().find(|o| o.id == c.id).map(|o| &o.source) != Some(&cam.source)
                {
                    tracing::warn!(camera = %c.id, "camera source changes take effect after a restart");
                }
                c.runtime
                    .replace(runtime_of(&loaded, cam, &identify.current));
            }
            None => {
                tracing::warn!(camera = %c.id, "camera removed from the config; it keeps running until a restart")
            }
        }
    }
    for n in &new.cameras {
        if !cameras.iter().any(|c| c.id == n.id) {
            tracing::warn!(camera = %n.id, "new camera; it starts after a restart");
        }
    }
}

/// Owns sequence numbers, the state file and the sinks.
struct Publisher {
    device: String,
    store: StateStore,
    saved: SavedState,
    sinks: Vec<Box<dyn Sink>>,
    /// The state file could not be written at the last batch (full disk): said once,
    /// not at every frame, and again when it recovers.
    state_save_failing: bool,
}

impl Publisher {
    fn run(mut self, rx: Receiver<Update>, initial: Vec<Update>) {
        let span = tracing::info_span!("publisher", device = %self.device);
        let _g = span.enter();
        for u in initial {
            self.handle(u);
        }
        self.finish_batch();
        while let Ok(u) = rx.recv() {
            self.handle(u);
            // Drain what is already queued, then persist once for the batch.
            while let Ok(u) = rx.try_recv() {
                self.handle(u);
            }
            self.finish_batch();
        }
        self.finish_batch();
        tracing::info!(seq = self.saved.seq, "publisher stopped; state saved");
    }

    fn handle(&mut self, u: Update) {
        let (body, at) = match u {
            Update::State {
                camera,
                zone,
                state,
                at,
            } => {
                self.saved
                    .zones
                    .insert(format!("{camera}/{zone}"), state.clone());
                (
                    Body::State {
                        camera,
                        zone,
                        state,
                    },
                    at,
                )
            }
            Update::Event {
                camera,
                zone,
                event,
                at,
            } => (
                Body::Event {
                    camera,
                    zone,
                    event,
                },
                at,
            ),
            Update::Health(h) => (Body::Health(h), SystemTime::now()),
            Update::Snapshot { camera, jpeg } => {
                for sink in &mut self.sinks {
                    sink.snapshot(&camera, &jpeg);
                }
                return;
            }
        };
        // Only after 2^53 messages (load() refuses a state file past that): dropping the
        // message is then the one way left that keeps `seq` from going back
        // (state::MAX_SEQ).
        let Some(seq) = self.saved.next_seq() else {
            tracing::error!(
                seq = self.saved.seq,
                "sequence numbers used up; message not published"
            );
            return;
        };
        let msg = Envelope {
            schema: publish::SCHEMA,
            device: self.device.clone(),
            seq,
            ts: publish::rfc3339(at),
            body,
        };
        let json = serde_json::to_string(&msg).expect("messages serialise");
        for sink in &mut self.sinks {
            if let Err(e) = sink.publish(&msg, &json) {
                tracing::error!(sink = %sink.name(), error = %e, "publish failed");
            }
        }
    }

    fn finish_batch(&mut self) {
        // The state (with seq) is saved before sinks are flushed: after a crash the next
        // run never reuses a sequence number a subscriber may have seen.
        match self.store.save(&self.saved) {
            Ok(()) if self.state_save_failing => {
                self.state_save_failing = false;
                tracing::info!(seq = self.saved.seq, "state saved again");
            }
            Ok(()) => {}
            Err(e) if self.state_save_failing => tracing::debug!(error = %e, "cannot save state"),
            Err(e) => {
                self.state_save_failing = true;
                tracing::error!(error = %e, seq = self.saved.seq,
                    "cannot save state; counting goes on, retried at every batch");
            }
        }
        for sink in &mut self.sinks {
            if let Err(e) = sink.flush() {
                tracing::error!(sink = %sink.name(), error = %e, "flush failed");
            }
        }
    }
}
