//! Command-line interface: the binary's edge, where errors become messages and exit
//! codes. Everything it calls lives in the library modules.

mod bench;
mod camera;
mod detect;
mod eval;
mod identify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, LoadedConfig, DEFAULT_CONFIG, EX_CONFIG};

/// Counts products on warehouse shelves from cameras and publishes stable counts.
#[derive(Debug, Parser)]
#[command(name = "shelfwatch", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `shelfwatch=debug`.
    #[arg(
        long,
        global = true,
        env = "SHELFWATCH_LOG",
        default_value = "info,rumqttd=warn"
    )]
    pub log: String,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: count products per shelf zone and publish stable counts.
    Run {
        /// Config file.
        #[arg(long, short, default_value = "/etc/shelfwatch/shelfwatch.toml")]
        config: PathBuf,
    },
    /// Detect objects in images: one JSON object per image on stdout.
    Detect(detect::DetectArgs),
    /// Measure preprocessing, inference and decoding on images.
    Bench(bench::BenchArgs),
    /// Detection quality on labelled images (YOLO txt or COCO JSON): precision, recall,
    /// F1, AP and count error per label.
    Eval(eval::EvalArgs),
    /// Add reference photos of a product (SKU) to a gallery.
    Enroll(identify::EnrollArgs),
    /// Which enrolled product is in each image (or each detection): top-k SKUs with
    /// similarity, `unknown` below the threshold.
    Identify(identify::IdentifyArgs),
    /// Inspect and edit a gallery.
    #[command(subcommand)]
    Gallery(identify::GalleryCommand),
    /// List V4L2 cameras with their formats, sizes, frame rates and controls.
    Devices(camera::DevicesArgs),
    /// Save frames from a camera (to build datasets).
    Capture(camera::CaptureArgs),
    /// Validate a config file: exit 0, or 78 naming the key and line.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Print the commented default configuration.
    PrintDefaultConfig,
}

/// Model choice shared by the commands that run a detector.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Config file; the built-in defaults when absent.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Model manifest to use instead of the configured one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Score threshold for every label, instead of the configured one.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// `auto`: the scale rule (a model with a `[scale]` band runs where its products
    /// are the trained size, tiled where needed; docs/counting-model.md), or
    /// WIDTHxHEIGHT: the whole image at this input size (fully convolutional models).
    /// Default: the config's `[model] input-size`, which defaults to auto.
    #[arg(long, value_parser = parse_input_size, value_name = "auto|WxH")]
    pub input_size: Option<crate::config::InputSize>,
    /// Threads for one inference, instead of the configured `[model] threads`.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=crate::config::MAX_THREADS as i64))]
    pub threads: Option<u16>,
    /// Whose kernels run the depthwise convolutions: `shelfwatch` (its own, fused with
    /// ReLU6) or `tract`, instead of the configured `[model] kernels`.
    #[arg(long, value_name = "shelfwatch|tract")]
    pub kernels: Option<crate::vision::kernels::Kernels>,
    /// Cache the decluttered model in this directory, as the daemon does in its state
    /// directory (`[model] cache`); without it, these commands read the ONNX file.
    #[arg(long, value_name = "DIR")]
    pub model_cache: Option<PathBuf>,
}

fn parse_input_size(s: &str) -> Result<crate::config::InputSize, String> {
    if s == "auto" {
        return Ok(crate::config::InputSize::Auto);
    }
    parse_size(s).map(|(w, h)| crate::config::InputSize::Fixed([w, h]))
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let p = |v: &str| v.parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    let (w, h) = (p(w)?, p(h)?);
    if w == 0 || h == 0 {
        return Err("width and height must be positive".into());
    }
    Ok((w, h))
}

impl ModelArgs {
    /// The config file, or the built-in defaults; a config error is reported and becomes
    /// exit status 78.
    fn config(&self) -> Result<LoadedConfig, ExitCode> {
        Self::config_at(&self.config)
    }

    fn config_at(config: &Option<PathBuf>) -> Result<LoadedConfig, ExitCode> {
        match config {
            Some(path) => Config::load(path).map_err(|e| {
                eprintln!("{e}");
                ExitCode::from(EX_CONFIG)
            }),
            None => Ok(LoadedConfig::defaults()),
        }
    }

    /// The config (or defaults) with command-line overrides applied. A config error is
    /// reported and becomes exit status 78.
    fn load(&self) -> Result<(PathBuf, crate::vision::DetectorOptions), ExitCode> {
        self.load_with_config().map(|(m, o, _)| (m, o))
    }

    /// [`ModelArgs::load`], with the config it came from.
    fn load_with_config(
        &self,
    ) -> Result<(PathBuf, crate::vision::DetectorOptions, LoadedConfig), ExitCode> {
        let loaded = self.config()?;
        let manifest = self.model.clone().unwrap_or_else(|| loaded.manifest_path());
        let mut options = loaded.detector_options();
        if let Some(t) = self.threshold {
            if !(t > 0.0 && t <= 1.0) {
                eprintln!("--threshold must be in (0, 1], got {t}");
                return Err(ExitCode::from(2));
            }
            options.score_threshold = Some(t);
            options.label_thresholds.clear();
        }
        if let Some(size) = self.input_size {
            options.input_size = size.fixed();
        }
        if let Some(t) = self.threads {
            options.threads = usize::from(t);
        }
        if let Some(k) = self.kernels {
            options.kernels = k;
        }
        // One-off commands do not write into the daemon's state directory.
        options.cache_dir = self.model_cache.clone();
        Ok((manifest, options, loaded))
    }
}

/// Sets up `tracing` on stderr; stdout is kept for command output.
pub fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        // Logging is no reason to refuse to count: say so once, and go on at `info`.
        eprintln!("shelfwatch: --log / SHELFWATCH_LOG {filter:?} is not a log filter ({e}); logging at \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colour only for a person at a terminal: under systemd stderr goes to the journal,
    // where escape codes would land in every line.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(crate::publish::mqtt::BrokerNoiseFilter::default());
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(lines).init(),
        LogFormat::Json => registry.with(lines.json()).init(),
    }
}

/// Runs a parsed command line and returns the process exit status.
pub fn run(cli: Cli) -> ExitCode {
    crate::daemon::memory::limit_heap_arenas();
    match cli.command {
        Command::Run { config } => match crate::daemon::run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(crate::daemon::DaemonError::Config(e)) => {
                eprintln!("{e}");
                ExitCode::from(EX_CONFIG)
            }
            // A config error too: systemd must not restart into the same refusal
            // (RestartPreventExitStatus=78).
            Err(e @ crate::daemon::DaemonError::NoCameras) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EX_CONFIG)
            }
            Err(e) => {
                report(&e.into());
                ExitCode::FAILURE
            }
        },
        Command::Detect(args) => detect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Enroll(args) => identify::enroll(args),
        Command::Identify(args) => identify::identify(args),
        Command::Gallery(cmd) => identify::gallery(cmd),
        Command::Devices(args) => camera::devices(args),
        Command::Capture(args) => camera::capture(args),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
    }
}

/// Prints an error chain on stderr the way every command does.
fn report(err: &anyhow::Error) {
    eprintln!("error: {err:#}");
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// A daemon whose manifest names a model file that is not there: the error chain that
    /// `report` prints must say so once, not once per layer that wraps it.
    #[test]
    fn a_missing_model_file_is_named_once_in_the_error() {
        let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        for f in ["shelf_counter.toml", "shelf_counter.labels"] {
            std::fs::copy(tree.join("models").join(f), dir.path().join(f)).unwrap();
        }
        let config = dir.path().join("shelfwatch.toml");
        std::fs::write(
            &config,
            format!(
                "[model]\nmanifest = \"./shelf_counter.toml\"\ncache = false\n\
                 [state]\ndir = \"state\"\n\
                 [[cameras]]\nid = \"c\"\n[cameras.source]\nkind = \"files\"\npath = {:?}\n",
                tree.join("tests/fixtures/photos/coffee.png")
            ),
        )
        .unwrap();
        let err = crate::daemon::run(&config).unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(text.matches("shelf_counter.onnx").count(), 1, "{text}");
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }
}
