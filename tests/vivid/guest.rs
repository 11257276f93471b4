//! Runs inside the vivid VM (tests/vivid/run-vm.sh): shelfwatch's own V4L2 capture code
//! against the real vivid driver. Exit 0 only if every check passes.
//!
//! Checks, per format (YUYV, NV12, RGB24, GREY at 640x480): the driver agreed to the
//! format and size; frames arrive with rising kernel timestamps; consecutive frames
//! differ (vivid draws a running clock); the converted colour bars have the expected
//! colours. A request for MJPEG (vivid has none) must be reported as a fallback.

use std::process::ExitCode;
use std::time::Duration;

use shelfwatch::capture::{FrameSource, PixelFormat, V4l2Settings, V4l2Source};

/// vivid's default pattern: 75% colour bars, left to right.
const BARS: [(&str, [u8; 3]); 8] = [
    ("white", [191, 191, 191]),
    ("yellow", [191, 191, 0]),
    ("cyan", [0, 191, 191]),
    ("green", [0, 191, 0]),
    ("magenta", [191, 0, 191]),
    ("red", [191, 0, 0]),
    ("blue", [0, 0, 191]),
    ("black", [0, 0, 0]),
];

/// vivid renders GREY as the sRGB/Rec. 709 luma of its pattern (its YUV formats use the
/// BT.601 encoding that V4L2 defaults to for sRGB).
fn luma(c: [u8; 3]) -> f32 {
    0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32
}

fn check_format(device: &str, format: PixelFormat) -> Result<(), String> {
    let mut settings = V4l2Settings::for_device(device.into());
    settings.formats = vec![format];
    settings.width = 640;
    settings.height = 480;
    settings.fps = 25;
    settings.frame_timeout_ms = 10_000;
    let mut source = V4l2Source::new(settings);
    source.open().map_err(|e| format!("open: {e}"))?;
    let n = source.negotiated().cloned().ok_or("no negotiated format")?;
    println!(
        "{format}: driver agreed to {} {}x{} stride {} at {:.1} fps",
        n.format, n.width, n.height, n.stride, n.fps
    );
    if n.format != format || n.fell_back || (n.width, n.height) != (640, 480) {
        return Err(format!(
            "asked {format} 640x480, got {} {}x{}",
            n.format, n.width, n.height
        ));
    }
    let mut frames = Vec::new();
    for _ in 0..4 {
        frames.push(
            source
                .next_frame(&|| false)
                .map_err(|e| format!("capture: {e}"))?,
        );
    }
    let ts: Vec<Duration> = frames.iter().filter_map(|f| f.kernel_timestamp).collect();
    if ts.len() != frames.len() || ts.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("kernel timestamps missing or not rising: {ts:?}"));
    }
    let changed = frames
        .windows(2)
        .filter(|w| w[0].image != w[1].image)
        .count();
    if changed == 0 {
        return Err("consecutive frames are identical".into());
    }
    let img = &frames[3].image;
    let bar_w = img.width() / 8;
    let y = img.height() * 3 / 4;
    for (i, (name, want)) in BARS.iter().enumerate() {
        let got = img.get_pixel(i as u32 * bar_w + bar_w / 2, y).0;
        let ok = if format == PixelFormat::Grey {
            (got[0] as f32 - luma(*want)).abs() <= 6.0 && got[0] == got[1] && got[1] == got[2]
        } else {
            got.iter()
                .zip(want)
                .all(|(g, w)| (*g as i32 - *w as i32).abs() <= 12)
        };
        println!(
            "{format}: {name:>7} bar = {got:?} (expected {want:?}{})",
            if format == PixelFormat::Grey {
                ", as luma"
            } else {
                ""
            }
        );
        if !ok {
            return Err(format!("{name} bar is {got:?}"));
        }
    }
    source.close();
    Ok(())
}

fn check_mjpeg_fallback(device: &str) -> Result<(), String> {
    let mut settings = V4l2Settings::for_device(device.into());
    settings.formats = vec![PixelFormat::Mjpg];
    settings.width = 640;
    settings.height = 480;
    let mut source = V4l2Source::new(settings);
    source.open().map_err(|e| format!("open: {e}"))?;
    let n = source.negotiated().cloned().ok_or("no negotiated format")?;
    println!(
        "MJPG requested: fell back to {} (fell_back = {})",
        n.format, n.fell_back
    );
    if n.format == PixelFormat::Mjpg || !n.fell_back {
        return Err("vivid has no MJPEG; a fallback must be reported".into());
    }
    source
        .next_frame(&|| false)
        .map_err(|e| format!("capture after fallback: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stdout)
        .init();
    let device = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/video0".into());
    let mut failed = 0;
    let results = [
        ("YUYV", check_format(&device, PixelFormat::Yuyv)),
        ("NV12", check_format(&device, PixelFormat::Nv12)),
        ("RGB24", check_format(&device, PixelFormat::Rgb3)),
        ("GREY", check_format(&device, PixelFormat::Grey)),
        ("MJPG fallback", check_mjpeg_fallback(&device)),
    ];
    for (name, result) in results {
        match result {
            Ok(()) => println!("PASS {name}"),
            Err(e) => {
                println!("FAIL {name}: {e}");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
