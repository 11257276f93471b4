//! `shelfwatch devices` and `shelfwatch capture`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::report;
use crate::capture::v4l2::{list_devices, DeviceInfo};
use crate::capture::{FrameSource, PixelFormat, V4l2Settings, V4l2Source};

#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// Device node or /dev/v4l/by-id link.
    #[arg(long, short)]
    pub device: PathBuf,
    /// Frames to save.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub count: u32,
    /// Directory for the frames (created if missing).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Pixel formats in order of preference (MJPG, YUYV, NV12, RGB24, GREY, ...).
    #[arg(long, value_delimiter = ',', value_parser = parse_format, default_value = "MJPG,YUYV,NV12")]
    pub format: Vec<PixelFormat>,
    /// Frame size WIDTHxHEIGHT to ask for.
    #[arg(long, value_parser = super::parse_size, default_value = "1280x720")]
    pub size: (u32, u32),
    /// Frame rate to ask for.
    #[arg(long, default_value_t = 5)]
    pub fps: u32,
    /// Save every Nth frame (spacing dataset frames out in time).
    #[arg(long, default_value_t = 1)]
    pub every: u32,
}

fn parse_format(s: &str) -> Result<PixelFormat, String> {
    PixelFormat::parse(s).ok_or_else(|| {
        let known: Vec<String> = PixelFormat::ALL.iter().map(|f| f.to_string()).collect();
        format!("unknown pixel format {s:?} (known: {})", known.join(", "))
    })
}

pub fn devices(args: DevicesArgs) -> ExitCode {
    let devices = list_devices();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&devices).expect("plain data")
        );
        return ExitCode::SUCCESS;
    }
    if devices.is_empty() {
        println!("No V4L2 capture devices found (no /dev/video* node offers video capture).");
        return ExitCode::SUCCESS;
    }
    for d in &devices {
        print_device(d);
    }
    ExitCode::SUCCESS
}

fn print_device(d: &DeviceInfo) {
    println!("{}: {} ({}, {})", d.path.display(), d.card, d.driver, d.bus);
    for l in &d.links {
        println!("  link: {}", l.display());
    }
    for f in &d.formats {
        let note = if f.supported {
            ""
        } else {
            "  [not supported by shelfwatch]"
        };
        println!("  [{}] {}{}", f.fourcc, f.description, note);
        for s in &f.sizes {
            let rates: Vec<String> = s.fps.iter().map(|r| format!("{r:.3}")).collect();
            match &s.range {
                Some(r) => println!("      Size: {r}"),
                None => println!(
                    "      Size: {}x{}  fps: {}",
                    s.width,
                    s.height,
                    rates.join(", ")
                ),
            }
        }
    }
    if !d.controls.is_empty() {
        println!("  controls:");
        for c in &d.controls {
            println!(
                "      {} (min {}, max {}, default {})",
                c.name, c.min, c.max, c.default
            );
        }
    }
}

pub fn capture(args: CaptureArgs) -> ExitCode {
    match capture_frames(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn capture_frames(args: &CaptureArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let mut settings = V4l2Settings::for_device(args.device.clone());
    settings.formats = args.format.clone();
    (settings.width, settings.height) = args.size;
    settings.fps = args.fps;
    let mut source = V4l2Source::new(settings);
    source.open()?;
    if let Some(n) = source.negotiated() {
        eprintln!(
            "capturing {} {}x{} at {:.1} fps{}",
            n.format,
            n.width,
            n.height,
            n.fps,
            if n.fell_back {
                " (the driver's choice: preferred format unavailable)"
            } else {
                ""
            }
        );
    }
    let (mut saved, mut seen, mut corrupt) = (0u32, 0u32, 0u32);
    while saved < args.count {
        match source.next_frame(&|| false) {
            Ok(frame) => {
                seen += 1;
                if (seen - 1) % args.every.max(1) != 0 {
                    continue;
                }
                let path = args.out.join(format!("frame-{:06}.png", frame.seq));
                frame
                    .image
                    .save(&path)
                    .with_context(|| format!("{}", path.display()))?;
                println!("{}", path.display());
                saved += 1;
            }
            Err(crate::capture::CaptureError::Corrupt(why)) => {
                corrupt += 1;
                eprintln!("skipped a corrupt frame: {why}");
                anyhow::ensure!(corrupt < 100, "100 corrupt frames in a row; giving up");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
