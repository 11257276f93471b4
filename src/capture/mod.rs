//! Capture: frames from cameras and files, converted to RGB, handed to the vision stage
//! over a newest-frame-wins slot by a dedicated thread that survives camera loss.

pub mod compressed;
pub mod convert;
pub mod files;
pub mod slot;
pub mod v4l2;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use image::RgbImage;
use serde::Deserialize;

pub use compressed::{
    decode_image, decode_image_within, load_image, load_image_within, DecodeError, DecodeLimits,
};
pub use convert::PixelFormat;
pub use files::{FileSettings, FileSource};
pub use slot::{LatestSlot, Take};
pub use v4l2::{V4l2Settings, V4l2Source};

/// One captured frame, converted to RGB.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Source sequence number (the driver's for V4L2).
    pub seq: u64,
    /// Wall-clock time when the frame reached shelfwatch.
    pub captured_at: SystemTime,
    /// The kernel's capture timestamp (CLOCK_MONOTONIC) for V4L2 frames.
    pub kernel_timestamp: Option<Duration>,
    /// The file a frame came from, for file sources.
    pub origin: Option<PathBuf>,
    pub image: RgbImage,
}

/// Why a source gave no frame.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The source cannot be opened now (missing device, busy, no files); retried.
    #[error("{source_name}: {message}")]
    Open {
        source_name: String,
        message: String,
    },
    /// The device vanished or failed mid-stream (ENODEV, EIO); reopened with backoff.
    #[error("{source_name}: {message}")]
    Disconnected {
        source_name: String,
        message: String,
    },
    /// No frame within the frame timeout; reopened with backoff.
    #[error("{source_name}: no frame within the timeout")]
    Stalled { source_name: String },
    /// One frame was unusable (corrupt JPEG, short buffer); skipped and counted.
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    /// A file source played its last file and does not loop.
    #[error("end of input")]
    End,
    /// Stop was requested.
    #[error("stopped")]
    Stopped,
}

impl CaptureError {
    /// Maps an I/O error from a device call to the right recovery.
    pub fn from_io(source_name: &str, what: &str, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::TimedOut {
            return CaptureError::Stalled {
                source_name: source_name.to_owned(),
            };
        }
        CaptureError::Disconnected {
            source_name: source_name.to_owned(),
            message: format!("{what}: {e}"),
        }
    }

    /// Whether reopening the source may help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CaptureError::Open { .. }
                | CaptureError::Disconnected { .. }
                | CaptureError::Stalled { .. }
        )
    }
}

/// Something that produces frames: a camera or a set of files.
pub trait FrameSource: Send {
    /// Human-readable name for logs.
    fn describe(&self) -> String;
    /// Opens (or reopens) the source.
    fn open(&mut self) -> Result<(), CaptureError>;
    /// Releases the device; `open` may be called again.
    fn close(&mut self);
    /// Whether every frame must reach inference (the producer waits instead of dropping).
    fn lossless(&self) -> bool {
        false
    }
    /// Blocks until the next frame. `stop` says whether to give up waiting.
    fn next_frame(&mut self, stop: &dyn Fn() -> bool) -> Result<Frame, CaptureError>;
}

/// `[cameras.source]`: where a camera's frames come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceSettings {
    V4l2(V4l2Settings),
    Files(FileSettings),
}

impl SourceSettings {
    /// Builds the source; `resolve` makes config-relative paths usable.
    /// Every image it decodes stays within `limits`.
    pub fn build(
        &self,
        resolve: impl Fn(&std::path::Path) -> PathBuf,
        limits: DecodeLimits,
    ) -> Box<dyn FrameSource> {
        match self {
            SourceSettings::V4l2(s) => Box::new(V4l2Source::new(s.clone()).with_limits(limits)),
            SourceSettings::Files(s) => Box::new(
                FileSource::new(FileSettings {
                    path: resolve(&s.path),
                    ..s.clone()
                })
                .with_limits(limits),
            ),
        }
    }
}

/// Reconnect pacing after a camera failure: exponential, capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Camera availability changes, sent to whoever turns them into events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStatus {
    Online,
    Offline {
        reason: String,
    },
    /// A non-looping file source is finished.
    Ended,
}

/// Counters of one capture thread.
#[derive(Debug, Default)]
pub struct CaptureStats {
    pub frames: AtomicU64,
    pub corrupt: AtomicU64,
    pub reconnects: AtomicU64,
    pub online: AtomicBool,
}

/// A running capture thread and the slot it fills.
pub struct CaptureHandle {
    pub slot: Arc<LatestSlot<Frame>>,
    pub stats: Arc<CaptureStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CaptureHandle {
    /// Frames replaced in the slot before inference took them.
    pub fn dropped(&self) -> u64 {
        self.slot.dropped()
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts a capture thread for `source`. Status changes go to `status` (never blocking:
/// a full channel drops the notice, the stats keep the truth).
pub fn spawn(
    camera: String,
    mut source: Box<dyn FrameSource>,
    backoff: Backoff,
    status: Option<SyncSender<(String, SourceStatus)>>,
) -> io::Result<CaptureHandle> {
    let slot = Arc::new(LatestSlot::new());
    let stats = Arc::new(CaptureStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (slot2, stats2, stop2) = (slot.clone(), stats.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name(format!("capture-{camera}"))
        .spawn(move || {
            let span =
                tracing::info_span!("capture", camera = %camera, source = %source.describe());
            let _g = span.enter();
            let notify = |s: SourceStatus| {
                if let Some(tx) = &status {
                    let _ = tx.try_send((camera.clone(), s));
                }
            };
            run_capture(&mut *source, &slot2, &stats2, &stop2, backoff, &notify);
            source.close();
            slot2.close();
        })?;
    Ok(CaptureHandle {
        slot,
        stats,
        stop,
        thread: Some(thread),
    })
}

fn run_capture(
    source: &mut dyn FrameSource,
    slot: &LatestSlot<Frame>,
    stats: &CaptureStats,
    stop: &AtomicBool,
    backoff: Backoff,
    notify: &dyn Fn(SourceStatus),
) {
    let stopped = || stop.load(Ordering::Relaxed);
    let mut delay = backoff.initial;
    let mut open = false;
    // Whether subscribers were told the camera is offline; reported once per outage.
    let mut reported_offline = false;
    let mut corrupt_log = Throttle::new(CORRUPT_LOG_EVERY);
    while !stopped() {
        if !open {
            match source.open() {
                Ok(()) => {
                    open = true;
                    stats.online.store(true, Ordering::Relaxed);
                    notify(SourceStatus::Online);
                    reported_offline = false;
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open source");
                    if !reported_offline {
                        notify(SourceStatus::Offline {
                            reason: e.to_string(),
                        });
                        reported_offline = true;
                    }
                    files::sleep_unless(delay, &stopped);
                    delay = (delay * 2).min(backoff.max);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "source failed");
                    notify(SourceStatus::Ended);
                    return;
                }
            }
        }
        match source.next_frame(&stopped) {
            Ok(frame) => {
                stats.frames.fetch_add(1, Ordering::Relaxed);
                delay = backoff.initial;
                if source.lossless() {
                    slot.put_when_empty(frame, &stopped);
                } else {
                    slot.put(frame);
                }
            }
            Err(CaptureError::Corrupt(why)) => {
                stats.corrupt.fetch_add(1, Ordering::Relaxed);
                if let Some(not_logged) = corrupt_log.admit(std::time::Instant::now()) {
                    tracing::warn!(reason = %why, not_logged,
                        "corrupt frame skipped (logged at most once a minute; health's frames_corrupt counts every one)");
                }
            }
            Err(CaptureError::End) => {
                tracing::info!("source finished");
                notify(SourceStatus::Ended);
                return;
            }
            Err(CaptureError::Stopped) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "camera lost; reopening");
                source.close();
                open = false;
                stats.online.store(false, Ordering::Relaxed);
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                notify(SourceStatus::Offline {
                    reason: e.to_string(),
                });
                reported_offline = true;
                files::sleep_unless(delay, &stopped);
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}

/// A flaky cable can corrupt every frame: one line a minute says so, the count is in
/// health.
const CORRUPT_LOG_EVERY: Duration = Duration::from_secs(60);

/// Lets one event in each period through to the log and counts the rest.
struct Throttle {
    every: Duration,
    last: Option<std::time::Instant>,
    quiet: u64,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            quiet: 0,
        }
    }

    /// `Some(events held back since the last one logged)` when this one is to be logged.
    fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[test]
    fn a_throttle_logs_the_first_event_then_one_a_period_with_the_count_held_back() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.admit(at(0)), Some(0));
        assert_eq!(t.admit(at(1)), None);
        assert_eq!(t.admit(at(59)), None);
        assert_eq!(t.admit(at(60)), Some(2));
        assert_eq!(t.admit(at(61)), None);
        assert_eq!(t.admit(at(500)), Some(1));
    }

    /// A source following a script of outcomes, recording the times it was opened.
    struct Scripted {
        opens: Arc<Mutex<Vec<std::time::Instant>>>,
        open_results: VecDeque<bool>,
        frames: VecDeque<Result<(), &'static str>>,
    }

    impl FrameSource for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }
        fn open(&mut self) -> Result<(), CaptureError> {
            self.opens.lock().unwrap().push(std::time::Instant::now());
            if self.open_results.pop_front().unwrap_or(true) {
                Ok(())
            } else {
                Err(CaptureError::Open {
                    source_name: "cam".into(),
                    message: "No such device".into(),
                })
            }
        }
        fn close(&mut self) {}
        fn next_frame(&mut self, _stop: &dyn Fn() -> bool) -> Result<Frame, CaptureError> {
            match self.frames.pop_front() {
                None => Err(CaptureError::End),
                Some(Ok(())) => Ok(Frame {
                    seq: 0,
                    captured_at: SystemTime::now(),
                    kernel_timestamp: None,
                    origin: None,
                    image: RgbImage::new(1, 1),
                }),
                Some(Err("corrupt")) => Err(CaptureError::Corrupt("bad jpeg".into())),
                Some(Err(_)) => Err(CaptureError::Disconnected {
                    source_name: "cam".into(),
                    message: "ENODEV".into(),
                }),
            }
        }
    }

    #[test]
    fn a_vanished_camera_is_reopened_with_growing_delays_and_resumes() {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let source = Scripted {
            opens: opens.clone(),
            open_results: [true, false, false, true].into(),
            frames: [Ok(()), Err("gone"), Ok(()), Err("corrupt"), Ok(())].into(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(1000),
        };
        let h = spawn("cam".into(), Box::new(source), backoff, Some(tx)).unwrap();
        let mut got = 0;
        while let Take::Item(_) = h.slot.take(Duration::from_secs(5)) {
            got += 1;
        }
        assert!(got >= 1);
        assert_eq!(h.stats.frames.load(Ordering::Relaxed), 3);
        assert_eq!(h.stats.corrupt.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.reconnects.load(Ordering::Relaxed), 1);
        let statuses: Vec<_> = rx.try_iter().map(|(_, s)| s).collect();
        assert_eq!(statuses[0], SourceStatus::Online);
        assert!(matches!(statuses[1], SourceStatus::Offline { .. }));
        assert_eq!(
            statuses[2],
            SourceStatus::Online,
            "offline reported once per outage"
        );
        assert_eq!(statuses[3], SourceStatus::Ended);
        // Opens after the loss: delays 20 ms, 40 ms, 80 ms (doubling, no busy loop).
        let t = opens.lock().unwrap().clone();
        assert_eq!(t.len(), 4);
        let gaps: Vec<_> = t.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[0] >= Duration::from_millis(40) && gaps[1] >= Duration::from_millis(80),
            "{gaps:?}"
        );
        h.stop();
    }
}
