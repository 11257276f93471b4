//! A frame source over image files: one file, a directory or a glob (sorted), played
//! once or looping at a fixed rate. For demos, replays of recorded shelves, and tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{load_image_within, CaptureError, DecodeLimits, Frame, FrameSource};

/// `[cameras.source]` with `kind = "files"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileSettings {
    /// An image file, a directory of images, or a glob such as `frames/*.jpg`.
    /// Relative to the config file.
    pub path: PathBuf,
    /// Start again from the first image after the last one.
    #[serde(default = "default_loop", rename = "loop")]
    pub looping: bool,
    /// Frames per second to deliver.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Wait for inference to take each frame instead of dropping it when inference is
    /// slower than `fps`: every recorded frame is counted (replays, evaluation, tests).
    #[serde(default)]
    pub every_frame: bool,
}

fn default_loop() -> bool {
    true
}
fn default_fps() -> f64 {
    2.0
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "ppm"];

/// Expands `path` into a sorted list of image files.
pub fn expand(path: &Path) -> Result<Vec<PathBuf>, CaptureError> {
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| CaptureError::Open {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        for e in entries.flatten() {
            let p = e.path();
            let is_image = p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
            if p.is_file() && is_image {
                files.push(p);
            }
        }
    } else if path.is_file() {
        files.push(path.to_owned());
    } else {
        let pattern = path.to_string_lossy();
        let paths = glob::glob(&pattern).map_err(|e| CaptureError::Open {
            source_name: pattern.to_string(),
            message: format!("bad glob pattern: {e}"),
        })?;
        files.extend(paths.flatten().filter(|p| p.is_file()));
    }
    files.sort();
    if files.is_empty() {
        return Err(CaptureError::Open {
            source_name: path.display().to_string(),
            message: "no image files found".into(),
        });
    }
    Ok(files)
}

/// Plays image files as frames.
pub struct FileSource {
    settings: FileSettings,
    files: Vec<PathBuf>,
    next: usize,
    seq: u64,
    started: Option<Instant>,
    delivered: u64,
    limits: DecodeLimits,
}

impl FileSource {
    pub fn new(settings: FileSettings) -> Self {
        Self {
            settings,
            files: Vec::new(),
            next: 0,
            seq: 0,
            started: None,
            delivered: 0,
            limits: DecodeLimits::default(),
        }
    }

    /// Bounds every image decoded (a decompression bomb in the directory is a skipped,
    /// counted frame, not an abort).
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The files being played, once opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl FrameSource for FileSource {
    fn describe(&self) -> String {
        format!("files {}", self.settings.path.display())
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        self.files = expand(&self.settings.path)?;
        tracing::info!(
            path = %self.settings.path.display(),
            files = self.files.len(),
            fps = self.settings.fps,
            looping = self.settings.looping,
            "file source opened"
        );
        Ok(())
    }

    fn close(&mut self) {}

    fn lossless(&self) -> bool {
        self.settings.every_frame
    }

    fn next_frame(&mut self, stop: &dyn Fn() -> bool) -> Result<Frame, CaptureError> {
        if self.next >= self.files.len() {
            if !self.settings.looping || self.files.is_empty() {
                return Err(CaptureError::End);
            }
            self.next = 0;
        }
        // Frames are due at start + n / fps: the rate holds however long decoding takes,
        // and a pause (a slow consumer) does not cause a burst afterwards.
        let period = Duration::from_secs_f64(1.0 / self.settings.fps);
        let now = Instant::now();
        let start = *self.started.get_or_insert(now);
        let due = start + period.mul_f64(self.delivered as f64);
        if due > now {
            sleep_unless(due - now, stop);
        } else if now - due > period * 2 {
            self.started = Some(now);
            self.delivered = 0;
        }
        if stop() {
            return Err(CaptureError::Stopped);
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        self.delivered += 1;
        let seq = self.seq;
        self.seq += 1;
        let image = load_image_within(&path, &self.limits)
            .map_err(|e| CaptureError::Corrupt(e.to_string()))?;
        Ok(Frame {
            seq,
            captured_at: SystemTime::now(),
            kernel_timestamp: None,
            origin: Some(path),
            image,
        })
    }
}

/// Sleeps `d` in short slices so a stop request is honoured promptly.
pub(crate) fn sleep_unless(d: Duration, stop: &dyn Fn() -> bool) {
    let end = Instant::now() + d;
    while !stop() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_images(dir: &Path, names: &[&str]) {
        for (i, n) in names.iter().enumerate() {
            image::RgbImage::from_pixel(4, 4, image::Rgb([i as u8 * 10, 0, 0]))
                .save(dir.join(n))
                .unwrap();
        }
    }

    fn source(path: PathBuf, looping: bool, fps: f64) -> FileSource {
        let mut s = FileSource::new(FileSettings {
            path,
            looping,
            fps,
            every_frame: false,
        });
        s.open().unwrap();
        s
    }

    #[test]
    fn a_directory_plays_its_images_in_sorted_order_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        write_images(dir.path(), &["b.png", "a.png", "c.png"]);
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let mut s = source(dir.path().to_owned(), false, 1000.0);
        let names: Vec<_> = (0..3)
            .map(|_| s.next_frame(&|| false).unwrap().origin.unwrap())
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.png", "b.png", "c.png"]);
        assert!(matches!(s.next_frame(&|| false), Err(CaptureError::End)));
    }

    #[test]
    fn a_looping_glob_starts_again_and_sequence_numbers_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        write_images(dir.path(), &["f1.png", "f2.png", "other.png"]);
        let mut s = source(dir.path().join("f*.png"), true, 1000.0);
        let frames: Vec<_> = (0..5).map(|_| s.next_frame(&|| false).unwrap()).collect();
        let names: Vec<_> = frames
            .iter()
            .map(|f| f.origin.as_ref().unwrap().file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["f1.png", "f2.png", "f1.png", "f2.png", "f1.png"]);
        assert_eq!(
            frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn frames_are_delivered_at_the_configured_rate() {
        let dir = tempfile::tempdir().unwrap();
        write_images(dir.path(), &["a.png"]);
        let mut s = source(dir.path().to_owned(), true, 20.0);
        let t = Instant::now();
        for _ in 0..5 {
            s.next_frame(&|| false).unwrap();
        }
        // Five frames at 20/s: the first at once, the fifth 200 ms later.
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(195), "{elapsed:?}");
    }

    #[test]
    fn a_path_with_no_images_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSource::new(FileSettings {
            path: dir.path().join("*.jpg"),
            looping: true,
            fps: 1.0,
            every_frame: false,
        });
        let err = s.open().unwrap_err().to_string();
        assert!(err.contains("no image files found"), "{err}");
    }

    #[test]
    fn a_corrupt_file_is_reported_as_corrupt_and_the_next_one_still_plays() {
        let dir = tempfile::tempdir().unwrap();
        write_images(dir.path(), &["b.png"]);
        std::fs::write(dir.path().join("a.png"), b"garbage").unwrap();
        let mut s = source(dir.path().to_owned(), false, 1000.0);
        assert!(matches!(
            s.next_frame(&|| false),
            Err(CaptureError::Corrupt(_))
        ));
        assert!(s.next_frame(&|| false).is_ok());
    }
}
