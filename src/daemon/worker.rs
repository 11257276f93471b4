//! One camera's inference and counting thread: newest frame -> detections -> zone
//! counters -> updates for the publisher. Never touches the async runtime.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use image::{Rgb, RgbImage};

use super::Update;
use crate::capture::{CaptureHandle, Frame, SourceStatus, Take};
use crate::counting::{CountingParams, EventKind, ZoneCounter, ZoneSpec, ZoneState};
use crate::fsutil;
use crate::identify::{check_mismatch, Gallery, TrackParams, Tracker};
use crate::vision::scale::ScaledDetector;
use crate::vision::{annotate, Detection, Detector, DetectorOptions, Embedder};
use crate::web::feed::{CameraFeed, Shown};
use crate::web::metrics::Histogram;

/// What a reload may change while the camera and model keep running.
#[derive(Debug, Clone)]
pub struct CameraRuntime {
    /// Zone specs are built per frame size, so they are kept as config here.
    pub zones: Vec<crate::config::ZoneConfig>,
    pub counting: crate::config::CountingConfig,
    pub params: CountingParams,
    pub detector: DetectorOptions,
    /// The occluder model's options, when `counting.occluder-model` is set.
    pub occluder: Option<DetectorOptions>,
    /// The gallery and tracking parameters, when identification is configured.
    pub identify: Option<Arc<IdentifyRuntime>>,
    /// How often each zone's product scale is measured again (`model.rescale-interval-s`).
    pub rescale_interval: Duration,
}

/// Identification as a reload leaves it: one gallery shared by every camera.
#[derive(Debug)]
pub struct IdentifyRuntime {
    pub gallery: Arc<Gallery>,
    pub params: TrackParams,
}

/// Shared between the control plane and the worker: the current runtime config and a
/// generation counter the worker checks each frame.
pub struct RuntimeCell {
    generation: AtomicU64,
    value: Mutex<Arc<CameraRuntime>>,
}

impl RuntimeCell {
    pub fn new(rt: CameraRuntime) -> Self {
        Self {
            generation: AtomicU64::new(0),
            value: Mutex::new(Arc::new(rt)),
        }
    }

    pub fn replace(&self, rt: CameraRuntime) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rt);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// What the camera runs with now.
    pub fn current(&self) -> Arc<CameraRuntime> {
        self.get().1
    }

    fn get(&self) -> (u64, Arc<CameraRuntime>) {
        let g = self.generation.load(Ordering::Acquire);
        (
            g,
            self.value.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        )
    }
}

/// Counters the health report and the watchdog read.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub processed: AtomicU64,
    pub inference_errors: AtomicU64,
    /// The last 256 inference times, for p50/p99.
    pub inference_ms: Mutex<VecDeque<f64>>,
    pub finished: AtomicBool,
    /// Crops embedded for identification, and those left for a later frame.
    pub embedded: AtomicU64,
    pub embed_deferred: AtomicU64,
    /// Frames the occluder model ran on (it is skipped on steady frames).
    pub occluder_runs: AtomicU64,
    /// Seconds per frame in each model: the counting model (all its zone crops and
    /// tiles), the occluder model, the embedder (all of a frame's crops).
    pub detector_seconds: Histogram,
    pub occluder_seconds: Histogram,
    pub embedder_seconds: Histogram,
}

impl WorkerStats {
    fn record(&self, ms: f64) {
        let mut q = self.inference_ms.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == 256 {
            q.pop_front();
        }
        q.push_back(ms);
    }

    /// (p50, p99) of recent inference times in milliseconds.
    pub fn percentiles(&self) -> (f64, f64) {
        let mut v: Vec<f64> = self
            .inference_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[(((p * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
        (at(0.5), at(0.99))
    }
}

/// Everything one worker needs.
pub struct Worker {
    pub camera: String,
    /// The counting model with the scale rule: each zone at its products' scale.
    pub detector: ScaledDetector,
    /// Present when `counting.occluder-model` is set: finds people in front of shelves
    /// for a counting model that knows none.
    pub occluder: Option<Detector>,
    /// Present when identification is configured: names detections by SKU.
    pub embedder: Option<Embedder>,
    pub capture: CaptureHandle,
    pub status: Receiver<(String, SourceStatus)>,
    pub runtime: Arc<RuntimeCell>,
    pub restored: BTreeMap<String, ZoneState>,
    pub updates: SyncSender<Update>,
    pub stats: Arc<WorkerStats>,
    pub stop: Arc<AtomicBool>,
    pub snapshot_now: Arc<AtomicBool>,
    pub snapshot_dir: Option<PathBuf>,
    pub snapshot_every: Option<Duration>,
    /// Where the web page finds the latest frame, with `[http]`.
    pub feed: Option<Arc<CameraFeed>>,
}

struct Zones {
    size: (u32, u32),
    counters: Vec<ZoneCounter>,
}

impl Worker {
    /// Runs until stop is requested or the source ends.
    pub fn run(mut self) {
        let span = tracing::info_span!("worker", camera = %self.camera);
        let _g = span.enter();
        let (mut generation, mut rt) = self.runtime.get();
        let mut zones: Option<Zones> = None;
        let mut last_snapshot = Instant::now();
        let mut latest: Option<Arc<Shown>> = None;
        let mut tracker = Tracker::default();
        loop {
            self.forward_status();
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let frame = match self.capture.slot.take(Duration::from_millis(200)) {
                Take::Item(f) => f,
                Take::Empty => {
                    self.maybe_snapshot(&latest, zones.as_ref(), &mut last_snapshot);
                    continue;
                }
                Take::Closed => break,
            };
            let (g, current) = self.runtime.get();
            if g != generation {
                generation = g;
                rt = current;
                self.apply_reload(&rt, zones.as_mut(), &mut tracker);
            }
            let z = self.zones_for(&mut zones, &rt, frame.image.dimensions());
            // None: the frame was skipped (its error is logged and counted).
            if let Some(detections) = self.process(&frame, z, &rt, &mut tracker) {
                let seq = self.stats.processed.fetch_add(1, Ordering::Relaxed) + 1;
                let shown = Arc::new(Shown {
                    seq,
                    frame,
                    detections,
                });
                if let Some(feed) = &self.feed {
                    feed.show(shown.clone());
                }
                latest = Some(shown);
                self.maybe_snapshot(&latest, zones.as_ref(), &mut last_snapshot);
            }
        }
        self.forward_status();
        self.stats.finished.store(true, Ordering::Relaxed);
        self.capture.stop();
        tracing::info!(
            frames = self.stats.processed.load(Ordering::Relaxed),
            occluder_runs = self.stats.occluder_runs.load(Ordering::Relaxed),
            "worker stopped"
        );
    }

    /// A reload took effect: new thresholds, zones and gallery from the next frame on.
    fn apply_reload(
        &mut self,
        rt: &CameraRuntime,
        zones: Option<&mut Zones>,
        tracker: &mut Tracker,
    ) {
        if let Err(e) = self.detector.detector.set_options(&rt.detector) {
            tracing::error!(error = %e, "new thresholds rejected; keeping the old ones");
        }
        if let (Some(d), Some(o)) = (self.occluder.as_mut(), &rt.occluder) {
            if let Err(e) = d.set_options(o) {
                tracing::error!(error = %e, "new occluder threshold rejected; keeping the old one");
            }
        }
        if let Some(z) = zones {
            rebuild(z, rt);
        }
        // Zones may have moved, and a reload is the user's way to ask for a new
        // measurement (a shelf re-stocked with other products).
        self.detector.reset();
        self.detector.set_interval(rt.rescale_interval);
        // SKUs of tracked products may differ under a new gallery or thresholds.
        tracker.clear();
        tracing::info!("configuration reloaded");
    }

    /// The zone counters for a frame of this size: made at the first frame (from the
    /// saved counts), rebuilt when the camera renegotiated another size.
    fn zones_for<'z>(
        &mut self,
        zones: &'z mut Option<Zones>,
        rt: &CameraRuntime,
        size: (u32, u32),
    ) -> &'z mut Zones {
        let z = zones.get_or_insert_with(|| Zones {
            size,
            counters: rt
                .zones
                .iter()
                .map(|zc| {
                    let spec = zc.spec(&rt.counting, size);
                    match self.restored.get(&zc.name) {
                        Some(state) => ZoneCounter::restored(spec, state),
                        None => ZoneCounter::new(spec),
                    }
                })
                .collect(),
        });
        if z.size != size {
            // Zones in normalised coordinates follow the new size; counts are kept.
            z.size = size;
            rebuild(z, rt);
            self.detector.reset();
        }
        z
    }

    /// One frame through detection, occluders, identification and the zone counters;
    /// None when it had to be skipped.
    fn process(
        &mut self,
        frame: &Frame,
        z: &mut Zones,
        rt: &CameraRuntime,
        tracker: &mut Tracker,
    ) -> Option<Vec<Detection>> {
        let t = Instant::now();
        let mut detections = self.detect(frame, z, t)?;
        self.add_occluders(frame, z, rt, &mut detections)?;
        let now = Instant::now();
        let tracks = self.identify(frame, &mut detections, rt, tracker, now);
        self.stats.record(t.elapsed().as_secs_f64() * 1e3);
        for counter in &mut z.counters {
            let u = counter.observe(now, &detections, &rt.params);
            if let (Some(id), Some(tracks)) = (&rt.identify, &tracks) {
                self.report_mismatches(counter, frame, &detections, tracks, id, tracker, rt);
            }
            let zone = counter.spec().name.clone();
            for event in u.events {
                self.send(Update::Event {
                    camera: self.camera.clone(),
                    zone: Some(zone.clone()),
                    event,
                    at: frame.captured_at,
                });
            }
            if u.state_changed {
                if let Some(state) = counter.state() {
                    self.send(Update::State {
                        camera: self.camera.clone(),
                        zone,
                        state,
                        at: frame.captured_at,
                    });
                }
            }
        }
        Some(detections)
    }

    /// The counting model on each zone at its scale; logs the scales it chose anew.
    fn detect(&mut self, frame: &Frame, z: &Zones, t: Instant) -> Option<Vec<Detection>> {
        let bounds: Vec<_> = z
            .counters
            .iter()
            .map(|c| c.spec().polygon.bounds())
            .collect();
        let (detections, report) = match self.detector.detect(&frame.image, &bounds, t) {
            Ok(found) => {
                self.stats
                    .detector_seconds
                    .observe(t.elapsed().as_secs_f64());
                found
            }
            Err(e) => {
                self.stats.inference_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "inference failed; frame skipped");
                return None;
            }
        };
        if !report.rescaled.is_empty() {
            let choices = self.detector.choices();
            for &i in &report.rescaled {
                let (Some(Some(c)), Some(counter)) = (choices.get(i), z.counters.get(i)) else {
                    continue;
                };
                tracing::info!(
                    zone = %counter.spec().name,
                    scale = c.scale,
                    tiles = c.tiles,
                    median_width_cells = c.median_width_cells,
                    passes = report.passes,
                    "zone scale chosen"
                );
            }
        }
        Some(detections)
    }

    /// Adds the occluder model's people to the detections; None skips the frame.
    fn add_occluders(
        &mut self,
        frame: &Frame,
        z: &Zones,
        rt: &CameraRuntime,
        detections: &mut Vec<Detection>,
    ) -> Option<()> {
        // The occluder model costs a second inference; it only matters on a frame that
        // could move a count, so steady frames (every zone repeating its stable total)
        // skip it.
        let steady = z
            .counters
            .iter()
            .all(|c| c.steady_on(detections, &rt.params));
        let Some(occluder) = self.occluder.as_mut().filter(|_| !steady) else {
            return Some(());
        };
        self.stats.occluder_runs.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        match occluder.detect(&frame.image) {
            Ok((found, _)) => {
                self.stats
                    .occluder_seconds
                    .observe(t.elapsed().as_secs_f64());
                detections.extend(
                    found
                        .into_iter()
                        .filter(|d| rt.params.occluders.contains(&d.label)),
                );
                Some(())
            }
            Err(e) => {
                // Without the occluders a person in front of a shelf would be counted as
                // an empty shelf: skip the frame rather than risk it.
                self.stats.inference_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "occluder inference failed; frame skipped");
                None
            }
        }
    }

    /// Names detections by SKU when identification is configured: the track of each
    /// detection, if it has one.
    fn identify(
        &mut self,
        frame: &Frame,
        detections: &mut [Detection],
        rt: &CameraRuntime,
        tracker: &mut Tracker,
        now: Instant,
    ) -> Option<Vec<Option<usize>>> {
        let (Some(id), Some(embedder)) = (&rt.identify, self.embedder.as_mut()) else {
            return None;
        };
        let (tracks, s) = tracker.label(
            &frame.image,
            detections,
            embedder,
            &id.gallery,
            &id.params,
            now,
        );
        self.stats
            .embedded
            .fetch_add(s.embedded as u64, Ordering::Relaxed);
        self.stats
            .embed_deferred
            .fetch_add(s.deferred as u64, Ordering::Relaxed);
        if s.embedded > 0 {
            self.stats.embedder_seconds.observe(s.embed_ms / 1e3);
            tracing::debug!(
                embedded = s.embedded,
                reused = s.reused,
                deferred = s.deferred,
                ms = s.embed_ms,
                "products identified"
            );
        }
        Some(tracks)
    }

    /// A product-mismatch event for each tracked product in this zone that is not what
    /// the zone expects (once per track).
    #[allow(clippy::too_many_arguments)] // one frame's state, borrowed apart
    fn report_mismatches(
        &self,
        counter: &ZoneCounter,
        frame: &Frame,
        detections: &[Detection],
        tracks: &[Option<usize>],
        id: &IdentifyRuntime,
        tracker: &mut Tracker,
        rt: &CameraRuntime,
    ) {
        let zone = &counter.spec().name;
        for (d, ti) in detections.iter().zip(tracks) {
            let Some(ti) = *ti else { continue };
            if !counter.admits(d, &rt.params) {
                continue;
            }
            let Some(m) = check_mismatch(
                tracker.track(ti),
                &counter.spec().expected,
                &id.gallery,
                id.params.mismatch_threshold,
            ) else {
                continue;
            };
            tracker.track_mut(ti).mismatch_reported = true;
            tracing::warn!(zone = %zone, found = %m.found, similarity = m.similarity, expected_similarity = ?m.expected_similarity, "product mismatch");
            self.send(Update::Event {
                camera: self.camera.clone(),
                zone: Some(zone.clone()),
                event: EventKind::ProductMismatch {
                    label: m.found,
                    similarity: m.similarity,
                    expected: m.expected,
                    expected_similarity: m.expected_similarity,
                },
                at: frame.captured_at,
            });
        }
    }

    fn send(&self, u: Update) {
        // Blocking on a full channel is intended: it slows inference, and the capture
        // slot then drops frames instead of anything growing without bound.
        if self.updates.send(u).is_err() {
            tracing::warn!("publisher gone; update lost");
        }
    }

    fn forward_status(&self) {
        for (camera, status) in self.status.try_iter() {
            let event = match status {
                SourceStatus::Online => EventKind::CameraOnline,
                SourceStatus::Offline { reason } => EventKind::CameraOffline { reason },
                SourceStatus::Ended => continue,
            };
            self.send(Update::Event {
                camera,
                zone: None,
                event,
                at: SystemTime::now(),
            });
        }
    }

    fn maybe_snapshot(
        &self,
        latest: &Option<Arc<Shown>>,
        zones: Option<&Zones>,
        last: &mut Instant,
    ) {
        let requested = self.snapshot_now.swap(false, Ordering::Relaxed);
        let due = self
            .snapshot_every
            .is_some_and(|every| last.elapsed() >= every);
        if !(requested || due) {
            return;
        }
        *last = Instant::now();
        let (Some(shown), Some(zones)) = (latest, zones) else {
            return;
        };
        let jpeg = render_snapshot(&shown.frame.image, &shown.detections, &zones.counters);
        if let Some(dir) = &self.snapshot_dir {
            let path = dir.join(format!("{}.jpg", self.camera));
            match write_snapshot(&path, &jpeg) {
                Ok(()) => tracing::info!(path = %path.display(), "snapshot written"),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write snapshot")
                }
            }
        }
        self.send(Update::Snapshot {
            camera: self.camera.clone(),
            jpeg,
        });
    }
}

/// Replaces a snapshot whole, so a viewer never reads half a JPEG. Not synced: the next
/// snapshot replaces it anyway.
fn write_snapshot(path: &Path, jpeg: &[u8]) -> Result<(), fsutil::WriteError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| fsutil::WriteError {
            path: dir.to_owned(),
            error,
        })?;
    }
    fsutil::write_atomic(path, fsutil::Durability::Unsynced, |f| f.write_all(jpeg))
}

fn rebuild(z: &mut Zones, rt: &CameraRuntime) {
    let mut old: BTreeMap<String, ZoneCounter> = z
        .counters
        .drain(..)
        .map(|c| (c.spec().name.clone(), c))
        .collect();
    z.counters = rt
        .zones
        .iter()
        .map(|zc| {
            let spec: ZoneSpec = zc.spec(&rt.counting, z.size);
            match old.remove(&zc.name) {
                Some(mut c) => {
                    c.set_spec(spec);
                    c
                }
                None => ZoneCounter::new(spec),
            }
        })
        .collect();
}

/// An annotated JPEG: zones with their stable counts, boxes with labels.
pub fn render_snapshot(
    frame: &RgbImage,
    detections: &[Detection],
    zones: &[ZoneCounter],
) -> Vec<u8> {
    let mut img = frame.clone();
    let scale = (img.width().max(img.height()) / 640).clamp(1, 4) + 1;
    let zone_colour = Rgb([255, 255, 255]);
    for z in zones {
        let spec = z.spec();
        annotate::draw_polygon(&mut img, spec.polygon.points(), zone_colour, scale);
        let text = match z.state() {
            Some(s) => {
                let counts: Vec<String> =
                    s.counts.iter().map(|(l, n)| format!("{l}: {n}")).collect();
                format!(
                    "{} [{}] {}",
                    spec.name,
                    counts.join(", "),
                    serde_json::to_value(s.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            }
            None => format!("{} [counting...]", spec.name),
        };
        let b = spec.polygon.bounds();
        annotate::draw_tag(
            &mut img,
            b.x1 as i64,
            b.y1 as i64 + 14 * scale as i64,
            &text,
            Rgb([40, 40, 40]),
            scale,
        );
    }
    annotate::draw_detections(&mut img, detections);
    let mut out = std::io::Cursor::new(Vec::new());
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
    if let Err(e) = img.write_with_encoder(encoder) {
        tracing::error!(error = %e, "cannot encode snapshot");
    }
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue #19: snapshots went through `.{camera}.jpg.tmp`, a fixed name a symlink
    // planted there redirected.
    #[test]
    fn a_symlink_at_the_old_snapshot_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let snapshots = dir.path().join("snapshots");
        std::fs::create_dir(&snapshots).unwrap();
        std::os::unix::fs::symlink(&victim, snapshots.join(".left.jpg.tmp")).unwrap();
        let path = snapshots.join("left.jpg");
        write_snapshot(&path, b"jpeg bytes").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"jpeg bytes");
    }
}
