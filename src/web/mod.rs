//! The local web page, its JSON API and Prometheus `/metrics` (`[http]`).
//!
//! The server runs on the daemon's async runtime and never blocks it: what a page
//! shows comes from shared cells the workers and the publisher fill ([`feed`],
//! [`board`]), from the control loop over a channel ([`Request`]), and anything slow
//! (JPEG encoding, validating and writing the config, embedding a crop) runs on tokio's
//! blocking pool. Connections are capped and their headers must arrive in time; bodies
//! are size-limited. docs/web.md describes the pages, the API and the metrics.

mod api;
mod auth;
pub mod board;
pub mod feed;
pub mod metrics;
pub mod zones;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::{mpsc, oneshot};

use crate::config::{HttpConfig, ZoneConfig};
use crate::publish::Health;
use crate::vision::Embedder;

/// What the server asks of the daemon's control loop.
#[derive(Debug)]
pub enum Request {
    /// The health figures, every camera's zones and its inference histograms, now.
    Observe(oneshot::Sender<Observation>),
    /// Re-read the config as SIGHUP does; true when the new config took effect.
    Reload(oneshot::Sender<bool>),
}

/// The daemon as the control loop sees it at one moment.
#[derive(Debug, Clone)]
pub struct Observation {
    pub device: String,
    pub health: Health,
    pub cameras: Vec<CameraObservation>,
}

/// One camera at one moment.
#[derive(Debug, Clone)]
pub struct CameraObservation {
    pub id: String,
    /// The zones as currently configured (after the last reload).
    pub zones: Vec<ZoneConfig>,
    /// Inference time per model the camera runs.
    pub models: Vec<ModelTimes>,
    pub inference_errors: u64,
}

#[derive(Debug, Clone)]
pub struct ModelTimes {
    /// The model's manifest name.
    pub model: String,
    pub histogram: metrics::HistogramSnapshot,
}

/// What enrolment and identification from the page need, with `[identify]`.
pub struct Identification {
    /// A fork of the daemon's embedding model, used by one request at a time.
    pub embedder: Mutex<Embedder>,
    pub gallery_dir: PathBuf,
    pub top_k: usize,
    pub unknown_threshold: f32,
    /// Bounds on an uploaded image: the scanner requests' (`[identify]`'s request
    /// limits within `[decode]`).
    pub decode: crate::capture::DecodeLimits,
}

/// Everything the server needs, handed over by the daemon at start.
pub struct Web {
    pub config: HttpConfig,
    /// The token of `http.token-file`, read at start.
    pub token: Option<String>,
    /// The config file the zone editor rewrites.
    pub config_path: PathBuf,
    pub feeds: Vec<Arc<feed::CameraFeed>>,
    pub board: Arc<board::Board>,
    pub requests: mpsc::Sender<Request>,
    pub identification: Option<Identification>,
    /// One zone edit at a time: read, validate, write, reload.
    pub(crate) edit_lock: tokio::sync::Mutex<()>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("http.listen: cannot listen on {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
}

/// How long a client has to send a request's headers (also between requests on a kept
/// connection): a slow or idle client gives its connection back.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long (its request finished first), so a client
/// cannot hold one of the capped connections for ever.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// What a response still being written gets after the lifetime is up.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Binds `[http] listen` and serves on the current runtime. Returns the bound address.
pub fn start(web: Web, runtime: &tokio::runtime::Handle) -> Result<SocketAddr, WebError> {
    let address = web.config.address().expect("validated: http.listen parses");
    let listener = std::net::TcpListener::bind(address)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|error| WebError::Bind { address, error })?;
    let bound = listener.local_addr().unwrap_or(address);
    let _enter = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|error| WebError::Bind { address, error })?;
    let max_connections = web.config.max_connections;
    tracing::info!(address = %bound, auth = web.token.is_some(), edit = web.config.edit, "http server listening");
    let router = api::router(Arc::new(web));
    runtime.spawn(serve(listener, router, max_connections));
    Ok(bound)
}

async fn serve(listener: tokio::net::TcpListener, router: axum::Router, max_connections: usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut quiet_until = tokio::time::Instant::now();
    loop {
        // Full: further clients wait in the kernel's backlog, and nothing here grows.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: say so at most every 10 s and give
                // the process a moment, rather than spin on the error.
                if tokio::time::Instant::now() >= quiet_until {
                    tracing::warn!(error = %e, "http: cannot accept a connection");
                    quiet_until = tokio::time::Instant::now() + Duration::from_secs(10);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

/// Authentication, then the headers every answer carries.
async fn guard(State(web): State<Arc<Web>>, req: HttpRequest, next: Next) -> Response {
    if let Some(refusal) = auth::check(web.token.as_deref(), req.headers()) {
        return refusal;
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' blob:; object-src 'none'; frame-ancestors 'none'",
        ),
    );
    res
}
