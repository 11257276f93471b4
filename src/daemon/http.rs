//! The daemon's side of the web server (`[http]`): what it shares with the server at
//! start, and the control loop's answers to the server's requests.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::{camera_health, Camera, DaemonError, Models, Reloader};
use crate::config::LoadedConfig;
use crate::publish::{Health, MqttHealth};
use crate::web::{self, feed::CameraFeed, CameraObservation, ModelTimes, Observation};

/// Requests the server may have waiting on the control loop: a page polls a few
/// endpoints a second, so a handful is plenty, and a full queue makes the server wait
/// rather than grow.
const REQUEST_QUEUE: usize = 16;

/// What the daemon and the server share, made before the cameras start (they need the
/// feeds) and the publisher (it needs the board).
pub struct HttpParts {
    pub board: Arc<web::board::Board>,
    pub feeds: Vec<Arc<CameraFeed>>,
    pub requests: Option<mpsc::Receiver<web::Request>>,
    sender: mpsc::Sender<web::Request>,
}

impl HttpParts {
    /// None without `[http]`.
    pub fn new(loaded: &LoadedConfig) -> Option<Self> {
        loaded.config.http.as_ref()?;
        let (sender, requests) = mpsc::channel(REQUEST_QUEUE);
        Some(Self {
            board: Arc::new(web::board::Board::default()),
            feeds: loaded
                .config
                .cameras
                .iter()
                .map(|c| Arc::new(CameraFeed::new(&c.id)))
                .collect(),
            requests: Some(requests),
            sender,
        })
    }

    /// Binds and starts serving on `runtime`.
    pub fn start(
        &self,
        loaded: &LoadedConfig,
        config_path: &Path,
        models: &Models,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), DaemonError> {
        let config = loaded
            .config
            .http
            .clone()
            .expect("HttpParts exist with [http]");
        let token = match &config.token_file {
            Some(p) => Some(
                crate::config::read_token(&loaded.resolve(p)).map_err(|message| {
                    crate::config::ConfigErrors(vec![crate::config::ConfigError {
                        file: config_path.to_owned(),
                        key: "http.token-file".into(),
                        line: None,
                        message,
                    }])
                })?,
            ),
            None => None,
        };
        let identification = match (
            &models.embedder,
            &loaded.config.identify,
            loaded.identify_paths(),
        ) {
            (Some(e), Some(cfg), Some((_, gallery_dir))) => Some(web::Identification {
                embedder: Mutex::new(e.fork()?),
                gallery_dir,
                top_k: cfg.top_k,
                unknown_threshold: cfg.unknown_threshold,
                decode: crate::identify::requests::Answering::request_limits(
                    &loaded.config.decode,
                    cfg.max_request_pixels,
                    cfg.max_request_bytes,
                ),
            }),
            _ => None,
        };
        web::start(
            web::Web {
                config,
                token,
                config_path: config_path.to_owned(),
                feeds: self.feeds.clone(),
                board: self.board.clone(),
                requests: self.sender.clone(),
                identification,
                edit_lock: tokio::sync::Mutex::new(()),
            },
            runtime,
        )?;
        Ok(())
    }
}

/// The next request of the server; never, without one.
pub async fn next_request(
    requests: &mut Option<mpsc::Receiver<web::Request>>,
) -> Option<web::Request> {
    match requests {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// How far back the frame rate of the pages and `/metrics` looks.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// Frames processed per camera, sampled by the control loop's tick: the pages' frame
/// rate is over the last few seconds whenever they ask, unlike the health records',
/// which is over their interval.
pub struct Rates {
    samples: VecDeque<(Instant, Vec<u64>)>,
}

impl Rates {
    pub fn new(cameras: &[Camera]) -> Self {
        let mut r = Self {
            samples: VecDeque::new(),
        };
        r.sample(cameras);
        r
    }

    pub fn sample(&mut self, cameras: &[Camera]) {
        let now = Instant::now();
        let processed = cameras
            .iter()
            .map(|c| c.stats.processed.load(Ordering::Relaxed))
            .collect();
        self.samples.push_back((now, processed));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Frames per second of camera `i` over the window.
    pub fn fps(&self, i: usize) -> f64 {
        let (Some((t0, a)), Some((t1, b))) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return 0.0;
        }
        (b[i].saturating_sub(a[i])) as f64 / dt
    }
}

/// The daemon now, for the server.
pub fn observe(
    reloader: &Reloader<'_>,
    cameras: &[Camera],
    started: Instant,
    rates: &Rates,
    mqtt: Option<MqttHealth>,
) -> Observation {
    let identifying = reloader.identify.model.is_some();
    Observation {
        device: reloader.initial.config.device.id.clone(),
        health: Health {
            uptime_s: started.elapsed().as_secs_f64(),
            cameras: cameras
                .iter()
                .enumerate()
                .map(|(i, c)| camera_health(c, rates.fps(i), identifying))
                .collect(),
            mqtt,
        },
        cameras: cameras
            .iter()
            .map(|c| {
                let m = &c.models;
                let mut models = vec![ModelTimes {
                    model: m.detector.clone(),
                    histogram: c.stats.detector_seconds.snapshot(),
                }];
                if let Some(name) = &m.occluder {
                    models.push(ModelTimes {
                        model: name.clone(),
                        histogram: c.stats.occluder_seconds.snapshot(),
                    });
                }
                if let (Some(name), true) = (&m.embedder, identifying) {
                    models.push(ModelTimes {
                        model: name.clone(),
                        histogram: c.stats.embedder_seconds.snapshot(),
                    });
                }
                CameraObservation {
                    id: c.id.clone(),
                    zones: c.runtime.current().zones.clone(),
                    models,
                    inference_errors: c.stats.inference_errors.load(Ordering::Relaxed),
                }
            })
            .collect(),
    }
}
