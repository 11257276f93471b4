//! V4L2 cameras (USB UVC and CSI) through the `v4l` crate: format negotiation by
//! preference with read-back, frame rate, controls by name, MMAP streaming.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use v4l::buffer::Type;
use v4l::control::{Control, Description as ControlDescription, Type as ControlType, Value};
use v4l::format::Quantization;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, Format, FourCC};

use super::convert::{to_rgb, PixelFormat, RawLayout, YuvEncoding};
use super::{CaptureError, DecodeLimits, Frame, FrameSource};

/// `[cameras.source]` with `kind = "v4l2"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct V4l2Settings {
    /// Device node: `/dev/video0`, or better a stable `/dev/v4l/by-id/...` link that
    /// survives re-plugging and reboots.
    pub device: PathBuf,
    /// Pixel formats in order of preference; the first the camera offers is used.
    #[serde(default = "default_formats")]
    pub formats: Vec<PixelFormat>,
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    /// Frames per second requested from the driver (VIDIOC_S_PARM).
    #[serde(default = "default_camera_fps")]
    pub fps: u32,
    /// MMAP buffers queued in the driver.
    #[serde(default = "default_buffers")]
    pub buffers: u32,
    /// A camera that delivers no frame for this long is treated as stalled and reopened.
    #[serde(default = "default_frame_timeout_ms")]
    pub frame_timeout_ms: u64,
    /// Camera controls by name (as `shelfwatch devices` lists them), e.g.
    /// `auto_exposure = 1`, `exposure_time_absolute = 250`, `focus_automatic_continuous = 0`.
    #[serde(default)]
    pub controls: BTreeMap<String, i64>,
}

fn default_formats() -> Vec<PixelFormat> {
    vec![PixelFormat::Mjpg, PixelFormat::Yuyv, PixelFormat::Nv12]
}
fn default_width() -> u32 {
    1280
}
fn default_height() -> u32 {
    720
}
fn default_camera_fps() -> u32 {
    5
}
fn default_buffers() -> u32 {
    4
}
fn default_frame_timeout_ms() -> u64 {
    5000
}

impl V4l2Settings {
    /// Settings for `device` with every other value at its default.
    pub fn for_device(device: PathBuf) -> Self {
        Self {
            device,
            formats: default_formats(),
            width: default_width(),
            height: default_height(),
            fps: default_camera_fps(),
            buffers: default_buffers(),
            frame_timeout_ms: default_frame_timeout_ms(),
            controls: BTreeMap::new(),
        }
    }
}

/// What the driver agreed to, read back after setting it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Negotiated {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub fps: f64,
    pub full_range: bool,
    /// True when none of the preferred formats was accepted as asked and the driver's
    /// choice was taken instead.
    pub fell_back: bool,
}

/// A V4L2 capture device.
pub struct V4l2Source {
    settings: V4l2Settings,
    stream: Option<Stream<'static>>,
    device: Option<Device>,
    negotiated: Option<Negotiated>,
    buffer: RgbImage,
    limits: DecodeLimits,
}

impl V4l2Source {
    pub fn new(settings: V4l2Settings) -> Self {
        Self {
            settings,
            stream: None,
            device: None,
            negotiated: None,
            buffer: RgbImage::new(0, 0),
            limits: DecodeLimits::default(),
        }
    }

    /// Bounds MJPEG frames (further capped at the negotiated size).
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The format in use, once opened.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    fn open_err(&self, what: &str, e: io::Error) -> CaptureError {
        CaptureError::from_io(&self.settings.device.display().to_string(), what, e)
    }
}

fn fourcc_of(f: PixelFormat) -> FourCC {
    FourCC::new(&f.fourcc())
}

fn format_of(f: &Format) -> Option<PixelFormat> {
    PixelFormat::from_fourcc(f.fourcc.repr)
}

/// Normalises a control name for matching: `Exposure Time, Absolute` and
/// `exposure_time_absolute` are the same control.
pub fn control_key(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_owned()
}

impl FrameSource for V4l2Source {
    fn describe(&self) -> String {
        format!("v4l2 {}", self.settings.device.display())
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        self.close();
        let s = self.settings.clone();
        let dev = Device::with_path(&s.device).map_err(|e| self.open_err("open", e))?;
        let caps = dev
            .query_caps()
            .map_err(|e| self.open_err("VIDIOC_QUERYCAP", e))?;
        let offered: Vec<PixelFormat> = dev
            .enum_formats()
            .map_err(|e| self.open_err("VIDIOC_ENUM_FMT", e))?
            .iter()
            .filter_map(|d| PixelFormat::from_fourcc(d.fourcc.repr))
            .collect();
        let wanted = s.formats.iter().copied().find(|f| offered.contains(f));
        let request =
            wanted
                .or_else(|| offered.first().copied())
                .ok_or_else(|| CaptureError::Open {
                    source_name: s.device.display().to_string(),
                    message: "the camera offers no pixel format shelfwatch can convert".into(),
                })?;
        let asked = Format::new(s.width, s.height, fourcc_of(request));
        let agreed = dev
            .set_format(&asked)
            .map_err(|e| self.open_err("VIDIOC_S_FMT", e))?;
        // Drivers adjust what they cannot do; what they return is the truth.
        let agreed = dev.format().unwrap_or(agreed);
        let format = format_of(&agreed).ok_or_else(|| CaptureError::Open {
            source_name: s.device.display().to_string(),
            message: format!(
                "driver chose {}, which shelfwatch cannot convert",
                agreed.fourcc
            ),
        })?;
        let fell_back = wanted != Some(format) || s.formats.first() != Some(&format);
        if fell_back {
            tracing::warn!(
                device = %s.device.display(),
                preferred = ?s.formats,
                using = %format,
                "preferred pixel format not available; using the driver's choice"
            );
        }
        let fps = match dev.set_params(&v4l::video::capture::Parameters::with_fps(s.fps)) {
            Ok(p) if p.interval.numerator > 0 => {
                p.interval.denominator as f64 / p.interval.numerator as f64
            }
            Ok(_) => 0.0,
            Err(e) => {
                tracing::warn!(device = %s.device.display(), error = %e, "cannot set the frame rate");
                0.0
            }
        };
        apply_controls(&dev, &s.device, &s.controls);
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, s.buffers.max(2))
            .map_err(|e| self.open_err("VIDIOC_REQBUFS", e))?;
        stream.set_timeout(Duration::from_millis(s.frame_timeout_ms));
        let negotiated = Negotiated {
            format,
            width: agreed.width,
            height: agreed.height,
            stride: agreed.stride,
            fps,
            full_range: matches!(agreed.quantization, Quantization::FullRange),
            fell_back,
        };
        tracing::info!(
            device = %s.device.display(),
            card = %caps.card,
            driver = %caps.driver,
            format = %negotiated.format,
            width = negotiated.width,
            height = negotiated.height,
            stride = negotiated.stride,
            fps = negotiated.fps,
            requested_width = s.width,
            requested_height = s.height,
            requested_fps = s.fps,
            "camera opened"
        );
        self.negotiated = Some(negotiated);
        self.stream = Some(stream);
        self.device = Some(dev);
        Ok(())
    }

    fn close(&mut self) {
        // The stream's buffers are unmapped before the device handle goes.
        self.stream = None;
        self.device = None;
    }

    fn next_frame(&mut self, _stop: &dyn Fn() -> bool) -> Result<Frame, CaptureError> {
        let name = self.settings.device.display().to_string();
        let (Some(stream), Some(n)) = (self.stream.as_mut(), self.negotiated.as_ref()) else {
            return Err(CaptureError::Disconnected {
                source_name: name,
                message: "not open".into(),
            });
        };
        let (data, meta) = stream
            .next()
            .map_err(|e| CaptureError::from_io(&name, "VIDIOC_DQBUF", e))?;
        let used = (meta.bytesused as usize).min(data.len());
        let layout = RawLayout {
            format: n.format,
            width: n.width,
            height: n.height,
            stride: n.stride,
            encoding: YuvEncoding {
                full_range: n.full_range,
                bt709: false,
            },
            limits: self.limits,
        };
        let kernel_timestamp = Some(Duration::new(
            meta.timestamp.sec.max(0) as u64,
            (meta.timestamp.usec.max(0) as u32) * 1000,
        ));
        let sequence = meta.sequence as u64;
        to_rgb(&layout, &data[..used], &mut self.buffer)
            .map_err(|e| CaptureError::Corrupt(e.to_string()))?;
        Ok(Frame {
            seq: sequence,
            captured_at: SystemTime::now(),
            kernel_timestamp,
            origin: None,
            image: self.buffer.clone(),
        })
    }
}

/// Sets each configured control, reporting unknown names (with the names that exist)
/// and values the driver rejects. A camera with a bad control still streams.
fn apply_controls(dev: &Device, path: &Path, wanted: &BTreeMap<String, i64>) {
    if wanted.is_empty() {
        return;
    }
    let available = match dev.query_controls() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(device = %path.display(), error = %e, "cannot list camera controls");
            return;
        }
    };
    for (name, &value) in wanted {
        let key = control_key(name);
        let Some(desc) = available.iter().find(|d| control_key(&d.name) == key) else {
            let names: Vec<String> = available
                .iter()
                .filter(|d| d.typ != ControlType::CtrlClass)
                .map(|d| control_key(&d.name))
                .collect();
            tracing::error!(
                device = %path.display(),
                control = %name,
                available = %names.join(", "),
                "unknown camera control"
            );
            continue;
        };
        if value < desc.minimum || value > desc.maximum {
            tracing::error!(
                device = %path.display(),
                control = %name,
                value,
                min = desc.minimum,
                max = desc.maximum,
                "camera control value out of range"
            );
            continue;
        }
        let v = match desc.typ {
            ControlType::Boolean => Value::Boolean(value != 0),
            _ => Value::Integer(value),
        };
        match dev.set_control(Control {
            id: desc.id,
            value: v,
        }) {
            Ok(()) => {
                tracing::info!(device = %path.display(), control = %name, value, "camera control set")
            }
            Err(e) => tracing::error!(
                device = %path.display(),
                control = %name,
                value,
                error = %e,
                "camera rejected control"
            ),
        }
    }
}

/// One camera as `shelfwatch devices` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub path: PathBuf,
    /// Stable `/dev/v4l/by-id` names pointing at this node.
    pub links: Vec<PathBuf>,
    pub card: String,
    pub driver: String,
    pub bus: String,
    pub formats: Vec<FormatInfo>,
    pub controls: Vec<ControlInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FormatInfo {
    pub fourcc: String,
    pub description: String,
    /// Whether shelfwatch can convert it.
    pub supported: bool,
    pub sizes: Vec<SizeInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeInfo {
    pub width: u32,
    pub height: u32,
    /// Frame rates offered at this size (frames per second).
    pub fps: Vec<f64>,
    /// For stepwise/continuous sizes: the range, as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlInfo {
    pub name: String,
    pub min: i64,
    pub max: i64,
    pub default: i64,
}

/// Lists V4L2 capture devices (nodes without video capture, such as metadata nodes, are
/// left out).
pub fn list_devices() -> Vec<DeviceInfo> {
    let mut nodes: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("video"))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.trim_start_matches("video").parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let links: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/dev/v4l/by-id")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let link = e.path();
                    std::fs::canonicalize(&link).ok().map(|t| (link, t))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes
        .into_iter()
        .filter_map(|path| {
            let info = describe_device(&path).ok()?;
            let canonical = std::fs::canonicalize(&path).unwrap_or(path.clone());
            Some(DeviceInfo {
                links: links
                    .iter()
                    .filter(|(_, t)| *t == canonical)
                    .map(|(l, _)| l.clone())
                    .collect(),
                ..info
            })
        })
        .collect()
}

/// Formats, sizes, rates and controls of one device node.
pub fn describe_device(path: &Path) -> io::Result<DeviceInfo> {
    let dev = Device::with_path(path)?;
    let caps = dev.query_caps()?;
    if !caps
        .capabilities
        .contains(v4l::capability::Flags::VIDEO_CAPTURE)
    {
        return Err(io::Error::other("not a video capture node"));
    }
    let mut formats = Vec::new();
    for d in dev.enum_formats()? {
        let mut sizes = Vec::new();
        for fs in dev.enum_framesizes(d.fourcc).unwrap_or_default() {
            match fs.size {
                FrameSizeEnum::Discrete(s) => sizes.push(SizeInfo {
                    width: s.width,
                    height: s.height,
                    fps: rates(&dev, d.fourcc, s.width, s.height),
                    range: None,
                }),
                FrameSizeEnum::Stepwise(s) => sizes.push(SizeInfo {
                    width: s.max_width,
                    height: s.max_height,
                    fps: rates(&dev, d.fourcc, s.max_width, s.max_height),
                    range: Some(format!(
                        "{}x{} to {}x{} in steps of {}x{}",
                        s.min_width,
                        s.min_height,
                        s.max_width,
                        s.max_height,
                        s.step_width,
                        s.step_height
                    )),
                }),
            }
        }
        formats.push(FormatInfo {
            fourcc: d.fourcc.str().unwrap_or("????").to_owned(),
            description: d.description.clone(),
            supported: PixelFormat::from_fourcc(d.fourcc.repr).is_some(),
            sizes,
        });
    }
    let controls = dev
        .query_controls()
        .unwrap_or_default()
        .into_iter()
        .filter(|c: &ControlDescription| c.typ != ControlType::CtrlClass)
        .map(|c| ControlInfo {
            name: control_key(&c.name),
            min: c.minimum,
            max: c.maximum,
            default: c.default,
        })
        .collect();
    Ok(DeviceInfo {
        path: path.to_owned(),
        links: Vec::new(),
        card: caps.card,
        driver: caps.driver,
        bus: caps.bus,
        formats,
        controls,
    })
}

fn rates(dev: &Device, fourcc: FourCC, w: u32, h: u32) -> Vec<f64> {
    let mut out: Vec<f64> = dev
        .enum_frameintervals(fourcc, w, h)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|fi| match fi.interval {
            FrameIntervalEnum::Discrete(f) if f.numerator > 0 => {
                Some(f.denominator as f64 / f.numerator as f64)
            }
            FrameIntervalEnum::Stepwise(s) if s.min.numerator > 0 => {
                Some(s.min.denominator as f64 / s.min.numerator as f64)
            }
            _ => None,
        })
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_names_match_whatever_their_spelling() {
        assert_eq!(
            control_key("Exposure Time, Absolute"),
            "exposure_time_absolute"
        );
        assert_eq!(
            control_key("exposure_time_absolute"),
            "exposure_time_absolute"
        );
        assert_eq!(
            control_key("White Balance Temperature"),
            "white_balance_temperature"
        );
        assert_eq!(
            control_key("Focus, Automatic Continuous"),
            "focus_automatic_continuous"
        );
    }

    #[test]
    fn opening_a_missing_device_is_a_disconnection_to_retry() {
        let mut s = V4l2Source::new(V4l2Settings::for_device("/dev/video-none-here".into()));
        let err = s.open().unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("/dev/video-none-here"), "{err}");
    }
}
