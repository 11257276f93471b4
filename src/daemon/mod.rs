//! The `shelfwatch run` daemon: wires capture -> vision -> counting -> publish for every
//! configured camera, and runs the control plane (signals, reload, health, systemd).
//!
//! Threads: per camera a capture thread and an inference+counting worker (each with
//! forks of the models loaded at start); one publisher thread that stamps sequence
//! numbers, persists state and writes to the sinks. The main thread runs a
//! single-threaded async runtime: the control plane (signals, timers, MQTT commands)
//! and, per MQTT sink, the client task. An MQTT sink may also start the embedded
//! broker's threads and a scanner request thread (see [`crate::publish::mqtt`]).

mod http;
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
use crate::publish::{self, mqtt, Body, CameraHealth, Envelope, Health, Sink};
use crate::vision::{Detector, Embedder};
use crate::web;
use http::{next_request, observe, HttpParts, Rates};
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
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Gallery(#[from] crate::identify::GalleryError),
    #[error(transparent)]
    Web(#[from] web::WebError),
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

struct Camera {
    id: String,
    runtime: Arc<RuntimeCell>,
    stats: Arc<WorkerStats>,
    capture: Arc<capture::CaptureStats>,
    dropped: Arc<dyn Fn() -> u64 + Send + Sync>,
    snapshot_now: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    /// The manifest names of the models this camera runs: counting, occluder, embedder.
    models: ModelNames,
}

#[derive(Debug, Clone)]
struct ModelNames {
    detector: String,
    occluder: Option<String>,
    embedder: Option<String>,
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
    let loaded = load_config(config_path)?;
    let started = Instant::now();
    let state_dir = loaded.resolve(&loaded.config.state.dir);
    let (store, saved) = load_state(&state_dir)?;
    let models = load_models(&loaded)?;
    memory::release_free_heap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut sinks, mut mqtt) = open_sinks(&loaded, &state_dir, &models, rt.handle())?;
    let http = HttpParts::new(&loaded);
    if let Some(h) = &http {
        sinks.push(Box::new(web::board::BoardSink(h.board.clone())));
    }
    let (updates, publisher) = start_publisher(&loaded.config, store, &saved, sinks)?;
    if let Some(h) = &http {
        h.start(&loaded, config_path, &models, rt.handle())?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let feeds = http.as_ref().map(|h| h.feeds.clone()).unwrap_or_default();
    let cameras = start_cameras(&loaded, &models, &saved, &updates, &stop, &feeds)?;
    // Every camera has its own forks now: the models loaded here are released.
    let Models { identify, .. } = models;
    let mut reloader = Reloader {
        config_path,
        initial: &loaded,
        identify: IdentifyState {
            model: identify.as_ref().map(|i| i.gallery.model().clone()),
            current: identify,
            answer_cells: mqtt.answer_cells(),
        },
    };
    let mut requests = http.and_then(|h| h.requests);
    let result = rt.block_on(control(
        &mut reloader,
        &cameras,
        &updates,
        started,
        &mut mqtt,
        &mut requests,
    ));
    shut_down(&rt, &stop, cameras, updates, publisher, mqtt);
    tracing::info!(uptime_s = started.elapsed().as_secs_f64(), "stopped");
    result
}

/// The configuration, which must name at least one camera.
fn load_config(config_path: &Path) -> Result<LoadedConfig, DaemonError> {
    let loaded = Config::load(config_path)?;
    if loaded.config.cameras.is_empty() {
        return Err(DaemonError::NoCameras);
    }
    Ok(loaded)
}

/// Locks the state directory and reads the saved counts and sequence number.
fn load_state(state_dir: &Path) -> Result<(StateStore, SavedState), DaemonError> {
    let store = StateStore::open(state_dir)?;
    let saved = store.load()?;
    tracing::info!(state = %store.path().display(), seq = saved.seq, zones = saved.zones.len(), "state loaded");
    Ok((store, saved))
}

/// The models loaded at start: every camera (and scanner request thread) gets forks of
/// them; only the identification runtime is kept afterwards, for reloads.
struct Models {
    detector: Detector,
    occluder: Option<Detector>,
    embedder: Option<Embedder>,
    identify: Option<Arc<IdentifyRuntime>>,
}

/// Loads the counting model, the occluder model, the embedder and its gallery.
fn load_models(loaded: &LoadedConfig) -> Result<Models, DaemonError> {
    let detector = Detector::load(&loaded.manifest_path(), &loaded.detector_options())?;
    let occluder = match loaded.occluder_model() {
        Some((manifest, options)) => Some(Detector::load(&manifest, &options)?),
        None => {
            let unknown: Vec<&String> = loaded
                .config
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
        Some(e) => load_gallery(loaded, &e.model_id())?,
        None => None,
    };
    Ok(Models {
        detector,
        occluder,
        embedder,
        identify,
    })
}

/// Opens the configured sinks. MQTT sinks start what they run beside the publisher
/// (see [`publish::mqtt::Background`]); the client tasks run on `runtime`.
fn open_sinks(
    loaded: &LoadedConfig,
    state_dir: &Path,
    models: &Models,
    runtime: &tokio::runtime::Handle,
) -> Result<(Vec<Box<dyn Sink>>, mqtt::Background), DaemonError> {
    let config = &loaded.config;
    let zones: Vec<mqtt::ZoneInfo> = config
        .cameras
        .iter()
        .flat_map(|c| {
            c.zones.iter().map(|z| mqtt::ZoneInfo {
                camera: c.id.clone(),
                zone: z.name.clone(),
                labels: z.labels.clone(),
            })
        })
        .collect();
    let wiring = mqtt::Wiring {
        device: &config.device.id,
        state_dir,
        zones: &zones,
        runtime,
        scanner: scanner_parts(loaded, models),
    };
    Ok(publish::open_sinks(
        &config.sinks,
        &|p| loaded.resolve(p),
        &wiring,
    )?)
}

/// What scanner requests are answered with, when `[identify]` has `requests = true`.
fn scanner_parts<'a>(
    loaded: &'a LoadedConfig,
    models: &'a Models,
) -> Option<mqtt::ScannerParts<'a>> {
    let identify = loaded.config.identify.as_ref().filter(|c| c.requests)?;
    Some(mqtt::ScannerParts {
        embedder: models.embedder.as_ref()?,
        answering: answering(loaded, models.identify.as_deref()?)?,
        identify,
    })
}

/// Starts the publisher thread; it first publishes the saved counts of the zones still
/// configured, so subscribers get the last known counts at once, never a false zero
/// after a restart.
fn start_publisher(
    config: &Config,
    store: StateStore,
    saved: &SavedState,
    sinks: Vec<Box<dyn Sink>>,
) -> Result<(SyncSender<Update>, JoinHandle<()>), DaemonError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Update>(UPDATE_QUEUE);
    let publisher = Publisher {
        device: config.device.id.clone(),
        store,
        saved: saved.clone(),
        sinks,
        state_save_failing: false,
    };
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
    let thread = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || publisher.run(rx, restored))?;
    Ok((tx, thread))
}

/// Starts every configured camera: its capture thread and its inference worker.
fn start_cameras(
    loaded: &LoadedConfig,
    models: &Models,
    saved: &SavedState,
    updates: &SyncSender<Update>,
    stop: &Arc<AtomicBool>,
    feeds: &[Arc<web::feed::CameraFeed>],
) -> Result<Vec<Camera>, DaemonError> {
    let snapshots = &loaded.config.snapshots;
    let starter = CameraStarter {
        loaded,
        models,
        saved,
        updates,
        stop,
        feeds,
        snapshot_dir: snapshots.dir.as_ref().map(|d| loaded.resolve(d)),
        snapshot_every: snapshots
            .interval_s
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
    };
    loaded
        .config
        .cameras
        .iter()
        .map(|cam| starter.start(cam))
        .collect()
}

/// What every camera's worker is started with.
struct CameraStarter<'a> {
    loaded: &'a LoadedConfig,
    models: &'a Models,
    saved: &'a SavedState,
    updates: &'a SyncSender<Update>,
    stop: &'a Arc<AtomicBool>,
    feeds: &'a [Arc<web::feed::CameraFeed>],
    snapshot_dir: Option<std::path::PathBuf>,
    snapshot_every: Option<Duration>,
}

impl CameraStarter<'_> {
    fn start(&self, cam: &crate::config::CameraConfig) -> Result<Camera, DaemonError> {
        let loaded = self.loaded;
        let source = cam
            .source
            .build(|p| loaded.resolve(p), loaded.config.decode);
        let (status_tx, status_rx) = std::sync::mpsc::sync_channel(64);
        let handle = capture::spawn(cam.id.clone(), source, Backoff::default(), Some(status_tx))?;
        let runtime = Arc::new(RuntimeCell::new(runtime_of(
            loaded,
            cam,
            &self.models.identify,
        )));
        let stats = Arc::new(WorkerStats::default());
        let snapshot_now = Arc::new(AtomicBool::new(false));
        let restored: BTreeMap<String, ZoneState> = self
            .saved
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
                self.models.detector.fork()?,
                loaded.detector_options().input_size,
                Duration::from_secs(loaded.config.model.rescale_interval_s),
            ),
            occluder: self
                .models
                .occluder
                .as_ref()
                .map(Detector::fork)
                .transpose()?,
            embedder: self
                .models
                .embedder
                .as_ref()
                .map(Embedder::fork)
                .transpose()?,
            capture: handle,
            status: status_rx,
            runtime: runtime.clone(),
            restored,
            updates: self.updates.clone(),
            stats: stats.clone(),
            stop: self.stop.clone(),
            snapshot_now: snapshot_now.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            snapshot_every: self.snapshot_every,
            feed: self.feeds.iter().find(|f| f.camera == cam.id).cloned(),
        };
        let models = ModelNames {
            detector: self.models.detector.manifest().manifest.name.clone(),
            occluder: self
                .models
                .occluder
                .as_ref()
                .map(|o| o.manifest().manifest.name.clone()),
            embedder: self.models.embedder.as_ref().map(|e| e.model_id().name),
        };
        let thread = std::thread::Builder::new()
            .name(format!("infer-{}", cam.id))
            .spawn(move || worker.run())?;
        Ok(Camera {
            id: cam.id.clone(),
            runtime,
            stats,
            capture: capture_stats,
            dropped: Arc::new(move || slot.dropped()),
            snapshot_now,
            thread,
            models,
        })
    }
}

/// Stops the cameras, lets the publisher write (and spool) what they sent, then gives
/// the MQTT clients their moment to deliver it and to say offline.
fn shut_down(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    cameras: Vec<Camera>,
    updates: SyncSender<Update>,
    publisher: JoinHandle<()>,
    mqtt: mqtt::Background,
) {
    stop.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for c in cameras {
        let _ = c.thread.join();
    }
    drop(updates);
    let _ = publisher.join();
    rt.block_on(mqtt.shut_down());
}

/// The control plane: signals, reload, commands, health, readiness and the watchdog.
async fn control(
    reloader: &mut Reloader<'_>,
    cameras: &[Camera],
    updates: &SyncSender<Update>,
    started: Instant,
    mqtt: &mut mqtt::Background,
    requests: &mut Option<tokio::sync::mpsc::Receiver<web::Request>>,
) -> Result<(), DaemonError> {
    let mut signals = Signals::new()?;
    let mut rates = Rates::new(cameras);
    let health_every = reloader.initial.config.health.interval_s;
    let mut health_tick = tokio::time::interval(Duration::from_secs(health_every.max(1)));
    health_tick.tick().await;
    let mut health = HealthReporter::new(cameras, started, reloader.identify.model.is_some());
    let mut watchdog = Watchdog::new(cameras);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ready = false;
    loop {
        tokio::select! {
            _ = signals.term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = signals.int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = signals.hup.recv() => { reloader.reload(cameras); }
            Some(req) = next_request(requests) => match req {
                web::Request::Observe(reply) => {
                    let _ = reply.send(observe(reloader, cameras, started, &rates, mqtt.health()));
                }
                web::Request::Reload(reply) => { let _ = reply.send(reloader.reload(cameras)); }
            },
            Some(cmd) = mqtt.command() => match cmd {
                mqtt::Command::Reload => { reloader.reload(cameras); }
                mqtt::Command::Snapshot(which) => request_snapshots(cameras, which.as_deref()),
            },
            _ = signals.usr1.recv() => {
                tracing::info!("SIGUSR1: snapshot requested");
                request_snapshots(cameras, None);
            }
            _ = health_tick.tick(), if health_every > 0 => {
                let _ = updates.try_send(Update::Health(health.report(cameras, mqtt.health())));
            }
            _ = watchdog.interval.tick(), if watchdog.enabled => watchdog.pet_if_moving(cameras, ready),
            _ = tick.tick() => {
                rates.sample(cameras);
                if !ready && cameras.iter().all(|c| c.stats.processed.load(Ordering::Relaxed) > 0) {
                    ready = true;
                    announce_ready(cameras, started);
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

/// The signals the daemon answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Asks `camera` (every camera when None) for an annotated snapshot.
fn request_snapshots(cameras: &[Camera], camera: Option<&str>) {
    for c in cameras.iter().filter(|c| camera.is_none_or(|w| w == c.id)) {
        c.snapshot_now.store(true, Ordering::Relaxed);
    }
}

/// Every camera delivers counted frames: tells systemd the service is ready.
fn announce_ready(cameras: &[Camera], started: Instant) {
    tracing::info!(
        cameras = cameras.len(),
        startup_s = started.elapsed().as_secs_f64(),
        "ready: every camera is delivering counted frames"
    );
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("counting"),
        ],
    );
}

/// Health records: per camera the frame rate since the last record.
struct HealthReporter {
    started: Instant,
    identifying: bool,
    last_processed: Vec<u64>,
    last: Instant,
}

impl HealthReporter {
    fn new(cameras: &[Camera], started: Instant, identifying: bool) -> Self {
        Self {
            started,
            identifying,
            last_processed: vec![0; cameras.len()],
            last: Instant::now(),
        }
    }

    fn report(&mut self, cameras: &[Camera], mqtt: Option<publish::MqttHealth>) -> Health {
        let dt = self.last.elapsed().as_secs_f64().max(1e-3);
        self.last = Instant::now();
        Health {
            uptime_s: self.started.elapsed().as_secs_f64(),
            cameras: cameras
                .iter()
                .zip(self.last_processed.iter_mut())
                .map(|(c, last)| {
                    let processed = c.stats.processed.load(Ordering::Relaxed);
                    let fps = (processed - *last) as f64 / dt;
                    *last = processed;
                    camera_health(c, fps, self.identifying)
                })
                .collect(),
            mqtt,
        }
    }
}

/// One camera's figures, with its frame rate measured by the caller.
fn camera_health(c: &Camera, fps: f64, identifying: bool) -> CameraHealth {
    let (p50, p99) = c.stats.percentiles();
    CameraHealth {
        camera: c.id.clone(),
        online: c.capture.online.load(Ordering::Relaxed),
        fps,
        inference_ms_p50: p50,
        inference_ms_p99: p99,
        frames_captured: c.capture.frames.load(Ordering::Relaxed),
        frames_processed: c.stats.processed.load(Ordering::Relaxed),
        frames_dropped: (c.dropped)(),
        frames_corrupt: c.capture.corrupt.load(Ordering::Relaxed),
        reconnects: c.capture.reconnects.load(Ordering::Relaxed),
        products_embedded: identifying.then(|| c.stats.embedded.load(Ordering::Relaxed)),
        embeddings_deferred: identifying.then(|| c.stats.embed_deferred.load(Ordering::Relaxed)),
    }
}

/// systemd's watchdog (`WatchdogSec=`), petted at half its period while the pipeline
/// moves.
struct Watchdog {
    enabled: bool,
    interval: tokio::time::Interval,
    /// Frames each camera had processed at the last tick.
    processed: Vec<u64>,
}

impl Watchdog {
    fn new(cameras: &[Camera]) -> Self {
        let mut usec = 0u64;
        let enabled = sd_notify::watchdog_enabled(false, &mut usec);
        Self {
            enabled,
            interval: tokio::time::interval(if enabled {
                Duration::from_micros(usec / 2)
            } else {
                Duration::from_secs(3600)
            }),
            processed: vec![0; cameras.len()],
        }
    }

    /// Pets the watchdog only while the pipeline moves: every camera that has frames to
    /// give processed at least one since the last tick. A stuck inference thread thus
    /// gets the service restarted; an unplugged camera (handled by reconnect backoff)
    /// does not.
    fn pet_if_moving(&mut self, cameras: &[Camera], ready: bool) {
        let mut alive = true;
        for (c, last) in cameras.iter().zip(self.processed.iter_mut()) {
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
}

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
    /// True when the config on disk was valid and took effect.
    fn reload(&mut self, cameras: &[Camera]) -> bool {
        reload(self.config_path, self.initial, cameras, &mut self.identify)
    }
}

/// SIGHUP (or MQTT `cmd/reload`): re-reads the config and applies zones and thresholds;
/// an invalid config is reported (key and line) and the running one kept.
fn reload(
    config_path: &Path,
    initial: &LoadedConfig,
    cameras: &[Camera],
    identify: &mut IdentifyState,
) -> bool {
    tracing::info!(config = %config_path.display(), "SIGHUP: reloading zones and thresholds");
    let loaded = match Config::load(config_path) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(file = %e.file.display(), line = e.line, key = %e.key, message = %e.message, "invalid configuration; keeping the running one");
            }
            return false;
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
    true
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
