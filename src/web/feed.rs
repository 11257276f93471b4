//! Each camera's latest counted frame, for the live view, the zone editor and enrolment:
//! the worker hands over the frame it has finished with (no copy), the server encodes it
//! to JPEG only when a page asks, once per frame however many pages ask.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::Frame;
use crate::vision::Detection;

/// A frame the counters have seen, with what the model found in it.
#[derive(Debug)]
pub struct Shown {
    /// The camera's count of processed frames when this one was done: increasing, so
    /// a page can tell a new frame from the one it shows.
    pub seq: u64,
    pub frame: Frame,
    pub detections: Vec<Detection>,
}

/// How many of the newest counted frames are kept.
const RECENT: usize = 3;
/// How many frames pages were shown are kept besides: a page shows a frame up to a
/// second old, which at a few frames/s is no longer among the newest.
const SERVED: usize = 2;
/// How many frames pages asked to keep (a box being drawn on them), and for how long:
/// drawing a box and typing a SKU takes a person longer than the camera keeps frames.
const PINNED: usize = 2;
pub const PIN_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Frames {
    recent: VecDeque<Arc<Shown>>,
    served: VecDeque<Arc<Shown>>,
    pinned: VecDeque<(Instant, Arc<Shown>)>,
}

impl Frames {
    fn all(&self) -> impl Iterator<Item = &Arc<Shown>> {
        self.recent
            .iter()
            .chain(&self.served)
            .chain(self.pinned.iter().map(|(_, s)| s))
    }
}

/// Pushes `s` unless it is there already, dropping the oldest beyond `cap`.
fn keep(q: &mut VecDeque<Arc<Shown>>, s: &Arc<Shown>, cap: usize) {
    if q.iter().any(|x| x.seq == s.seq) {
        return;
    }
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(s.clone());
}

/// One camera's recent frames and the JPEG of the newest.
#[derive(Debug)]
pub struct CameraFeed {
    pub camera: String,
    frames: Mutex<Frames>,
    jpeg: Mutex<Option<(u64, axum::body::Bytes)>>,
}

impl CameraFeed {
    pub fn new(camera: &str) -> Self {
        Self {
            camera: camera.to_owned(),
            frames: Mutex::new(Frames::default()),
            jpeg: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker's newest frame.
    pub fn show(&self, shown: Arc<Shown>) {
        keep(&mut self.lock().recent, &shown, RECENT);
    }

    pub fn latest(&self) -> Option<Arc<Shown>> {
        self.lock().recent.back().cloned()
    }

    /// A frame still kept (newest, shown to a page, or pinned) by its sequence number.
    pub fn find(&self, seq: u64) -> Option<Arc<Shown>> {
        let mut f = self.lock();
        f.pinned.retain(|(t, _)| t.elapsed() < PIN_FOR);
        let found = f.all().find(|s| s.seq == seq).cloned();
        found
    }

    /// Keeps frame `seq` for [`PIN_FOR`]; false when it is no longer kept at all.
    pub fn pin(&self, seq: u64) -> bool {
        let mut f = self.lock();
        f.pinned.retain(|(t, _)| t.elapsed() < PIN_FOR);
        let Some(s) = f.all().find(|s| s.seq == seq).cloned() else {
            return false;
        };
        f.pinned.retain(|(_, p)| p.seq != seq);
        if f.pinned.len() == PINNED {
            f.pinned.pop_front();
        }
        f.pinned.push_back((Instant::now(), s));
        true
    }

    /// The newest frame as JPEG, with its sequence number. Encodes (blocking, tens of
    /// milliseconds for a large frame) only when the newest frame is not encoded yet:
    /// call it off the async runtime. The frame is kept as one a page was shown.
    pub fn jpeg(&self) -> Option<(u64, axum::body::Bytes)> {
        let shown = self.latest()?;
        keep(&mut self.lock().served, &shown, SERVED);
        let mut cache = self.jpeg.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seq, bytes)) = cache.as_ref() {
            if *seq == shown.seq {
                return Some((*seq, bytes.clone()));
            }
        }
        let mut out = std::io::Cursor::new(Vec::new());
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        if let Err(e) = shown.frame.image.write_with_encoder(encoder) {
            tracing::error!(camera = %self.camera, error = %e, "cannot encode the live frame");
            return None;
        }
        let bytes = axum::body::Bytes::from(out.into_inner());
        *cache = Some((shown.seq, bytes.clone()));
        Some((shown.seq, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(seq: u64) -> Arc<Shown> {
        Arc::new(Shown {
            seq,
            frame: Frame {
                seq,
                captured_at: std::time::SystemTime::now(),
                kernel_timestamp: None,
                origin: None,
                image: image::RgbImage::from_pixel(8, 6, image::Rgb([seq as u8, 0, 0])),
            },
            detections: Vec::new(),
        })
    }

    #[test]
    fn a_recent_frame_is_found_by_its_number_and_an_old_one_is_gone() {
        let feed = CameraFeed::new("cam");
        for seq in 1..=5 {
            feed.show(shown(seq));
        }
        assert_eq!(feed.latest().unwrap().seq, 5);
        assert!(feed.find(3).is_some());
        assert!(feed.find(2).is_none(), "only the last {RECENT} are kept");
    }

    #[test]
    fn a_frame_a_page_was_shown_or_pinned_outlives_the_newest_ones() {
        let feed = CameraFeed::new("cam");
        feed.show(shown(1));
        feed.jpeg().unwrap();
        for seq in 2..=10 {
            feed.show(shown(seq));
        }
        assert!(feed.find(1).is_some(), "frame 1 was shown to a page");
        assert!(feed.pin(1));
        for seq in 11..=20 {
            feed.show(shown(seq));
            feed.jpeg().unwrap();
        }
        assert!(feed.find(1).is_some(), "pinned");
        assert!(feed.find(12).is_none(), "served long ago, not pinned");
        assert!(!feed.pin(5), "gone before it was pinned");
        assert!(feed.pin(19) && feed.pin(20));
        assert!(feed.find(1).is_none(), "two pins are kept, the oldest went");
    }

    #[test]
    fn the_jpeg_is_encoded_once_per_frame_and_follows_the_newest() {
        let feed = CameraFeed::new("cam");
        assert!(feed.jpeg().is_none(), "no frame yet");
        feed.show(shown(1));
        let (seq, a) = feed.jpeg().unwrap();
        let (_, b) = feed.jpeg().unwrap();
        assert_eq!(seq, 1);
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the second call reuses the encoding"
        );
        feed.show(shown(2));
        let (seq, c) = feed.jpeg().unwrap();
        assert_eq!(seq, 2);
        let img = image::load_from_memory(&c).unwrap();
        assert_eq!((img.width(), img.height()), (8, 6));
    }
}
