//! The routes: the pages, `/metrics` and the JSON API (docs/web.md, schemas in
//! docs/schemas/api-*.schema.json).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use super::{zones::ZoneEdit, Observation, Request, Web};
use crate::config::{Config, Coordinates, ZoneConfig};
use crate::identify::gallery::{check_sku, open_for_change};
use crate::identify::{GalleryLock, Reference};
use crate::vision::BBox;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

pub fn router(web: Arc<Web>) -> Router {
    let limit = web.config.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/zones", get(page))
        .route("/health", get(page))
        .route("/identify", get(page))
        .route(
            "/assets/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/assets/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route("/metrics", get(metrics))
        .route("/api/state", get(state))
        .route("/api/health", get(health))
        .route("/api/events", get(events))
        .route("/api/cameras", get(cameras))
        .route("/api/cameras/:camera/frame.jpg", get(frame))
        .route("/api/cameras/:camera/zones", put(save_zones))
        .route("/api/cameras/:camera/enrol", post(enrol))
        .route("/api/cameras/:camera/identify", post(identify))
        .route("/api/cameras/:camera/pin", post(pin))
        .route("/api/identify", post(identify_upload))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            super::guard,
        ))
        .with_state(web)
}

/// An error answer: `{"error": "..."}`, with the config problems when there are some.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    problems: Vec<Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// A failure of the daemon's own (a model, the gallery on disk): 500 with its text.
    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.problems.is_empty() {
            body["problems"] = Value::Array(self.problems);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON body that did not parse, was too large (413) or not JSON (415): answered as
/// JSON like every other API error, with axum's own explanation.
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    parsed
        .map(|Json(v)| v)
        .map_err(|r| ApiError::new(r.status(), r.body_text()))
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML).await
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Asks the control loop; it answers between two of its own steps.
async fn observe(web: &Web) -> ApiResult<Observation> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )
    };
    web.requests
        .send(Request::Observe(tx))
        .await
        .map_err(|_| gone())?;
    // The control loop answers within a step; a loop stuck longer is a daemon in
    // trouble, and the page says so rather than hang.
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon did not answer within 5 s",
        )),
    }
}

async fn reload(web: &Web) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if web.requests.send(Request::Reload(tx)).await.is_err() {
        return false;
    }
    rx.await.unwrap_or(false)
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)
}

async fn metrics(State(web): State<Arc<Web>>) -> ApiResult<Response> {
    let o = observe(&web).await?;
    let text = super::metrics::render(&o, &web.board);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn health(State(web): State<Arc<Web>>) -> ApiResult<Json<Value>> {
    let o = observe(&web).await?;
    Ok(Json(json!({
        "device": o.device,
        "health": o.health,
        "events": web.board.events(),
    })))
}

async fn events(State(web): State<Arc<Web>>) -> Json<Value> {
    Json(json!({ "events": web.board.events() }))
}

async fn state(State(web): State<Arc<Web>>) -> ApiResult<Json<Value>> {
    let o = observe(&web).await?;
    let cameras: Vec<Value> = o
        .cameras
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "zones": c.zones.iter().map(|z| json!({
                    "name": z.name,
                    "state": web.board.zone(&c.id, &z.name),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "device": o.device, "cameras": cameras })))
}

/// The config file's version: its SHA-256, so a save can tell the file changed under it.
fn version_of(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn zone_json(z: &ZoneConfig, size: Option<(u32, u32)>, web: &Web, camera: &str) -> Value {
    let (polygon, coordinates): (Vec<[f32; 2]>, _) = match (z.coordinates, size) {
        (Coordinates::Pixels, Some((w, h))) => (
            z.polygon
                .iter()
                .map(|p| [p[0] / w as f32, p[1] / h as f32])
                .collect(),
            "normalised",
        ),
        (Coordinates::Pixels, None) => (z.polygon.clone(), "pixels"),
        (Coordinates::Normalised, _) => (z.polygon.clone(), "normalised"),
    };
    json!({
        "name": z.name,
        "polygon": polygon,
        "coordinates": coordinates,
        "labels": z.labels,
        "min": z.min,
        "max": z.max,
        "state": web.board.zone(camera, &z.name),
    })
}

async fn cameras(State(web): State<Arc<Web>>) -> ApiResult<Json<Value>> {
    let o = observe(&web).await?;
    let path = web.config_path.clone();
    let version = blocking(move || std::fs::read_to_string(path).map(|t| version_of(&t)))
        .await?
        .ok();
    let cameras: Vec<Value> = o
        .cameras
        .iter()
        .map(|c| {
            let shown = web
                .feeds
                .iter()
                .find(|f| f.camera == c.id)
                .and_then(|f| f.latest());
            let size = shown.as_ref().map(|s| s.frame.image.dimensions());
            let online = o
                .health
                .cameras
                .iter()
                .find(|h| h.camera == c.id)
                .is_some_and(|h| h.online);
            let (w, h) = size.map_or((1.0, 1.0), |(w, h)| (w as f32, h as f32));
            json!({
                "id": c.id,
                "online": online,
                "frame": shown.as_ref().map(|s| json!({
                    "seq": s.seq,
                    "width": s.frame.image.width(),
                    "height": s.frame.image.height(),
                    "captured_at": crate::publish::rfc3339(s.frame.captured_at),
                })),
                "zones": c.zones.iter().map(|z| zone_json(z, size, &web, &c.id)).collect::<Vec<_>>(),
                "detections": shown.as_ref().map_or_else(Vec::new, |s| s.detections.iter().map(|d| json!({
                    "label": d.label,
                    "score": d.score,
                    "box": [d.bbox.x1 / w, d.bbox.y1 / h, d.bbox.x2 / w, d.bbox.y2 / h],
                })).collect()),
            })
        })
        .collect();
    Ok(Json(json!({
        "device": o.device,
        "config_version": version,
        "editable": web.config.edit,
        "identification": web.identification.is_some(),
        "cameras": cameras,
    })))
}

fn feed<'a>(web: &'a Web, camera: &str) -> ApiResult<&'a Arc<super::feed::CameraFeed>> {
    web.feeds
        .iter()
        .find(|f| f.camera == camera)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no camera {camera:?}")))
}

async fn frame(
    State(web): State<Arc<Web>>,
    UrlPath(camera): UrlPath<String>,
) -> ApiResult<Response> {
    let feed = feed(&web, &camera)?.clone();
    let (seq, jpeg) = blocking(move || feed.jpeg()).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("camera {camera:?} has no counted frame yet"),
        )
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg".to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (
                header::HeaderName::from_static("x-frame-seq"),
                seq.to_string(),
            ),
        ],
        jpeg,
    )
        .into_response())
}

/// A zone edit: the config version it was made on and the camera's zones as they
/// should be.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveZones {
    version: String,
    zones: Vec<ZoneEdit>,
}

#[derive(Debug, Serialize)]
struct Saved {
    saved: String,
    backup: String,
    version: String,
    reloaded: bool,
}

async fn save_zones(
    State(web): State<Arc<Web>>,
    UrlPath(camera): UrlPath<String>,
    edit: Result<Json<SaveZones>, JsonRejection>,
) -> ApiResult<Json<Saved>> {
    let edit = body(edit)?;
    if !web.config.edit {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "zone editing is off (http.edit = false)",
        ));
    }
    feed(&web, &camera)?;
    let _one_at_a_time = web.edit_lock.lock().await;
    let path = web.config_path.clone();
    let (backup, version) = blocking(move || write_zones(&path, &camera, &edit)).await??;
    let reloaded = reload(&web).await;
    Ok(Json(Saved {
        saved: web.config_path.display().to_string(),
        backup: backup.display().to_string(),
        version,
        reloaded,
    }))
}

/// Reads the config, checks the version, rewrites the camera's zones, validates the
/// result exactly as `check-config` does, keeps a backup and replaces the file.
fn write_zones(
    path: &Path,
    camera: &str,
    edit: &SaveZones,
) -> ApiResult<(std::path::PathBuf, String)> {
    let io = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot {what} {}: {e}", p.display()),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| io("read", path, &e))?;
    if version_of(&text) != edit.version {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} changed since the page loaded it: reload the page and edit again",
                path.display()
            ),
        ));
    }
    let new = super::zones::rewrite(&text, camera, &edit.zones).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{}: {e}", path.display()),
        )
    })?;
    if let Err(errors) = Config::from_text(path, &new) {
        return Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("not saved: {errors}"),
            problems: errors
                .0
                .iter()
                .map(|e| json!({ "key": e.key, "line": e.line, "message": e.message, "text": e.to_string() }))
                .collect(),
        });
    }
    let mode = std::fs::metadata(path)
        .map_err(|e| io("read", path, &e))?
        .permissions();
    let mut backup = path.as_os_str().to_owned();
    backup.push(".bak");
    let backup = std::path::PathBuf::from(backup);
    let write = |target: &Path, body: &str| {
        crate::fsutil::write_atomic(target, crate::fsutil::Durability::Synced, |f| {
            use std::io::Write;
            f.set_permissions(mode.clone())?;
            f.write_all(body.as_bytes())
        })
        .map_err(|e| {
            let hint = if e.error.kind() == std::io::ErrorKind::PermissionDenied
                || e.error.raw_os_error() == Some(libc::EROFS)
            {
                " (the daemon may not write its config directory; docs/web.md says how to allow the editor)"
            } else {
                ""
            };
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("not saved: {e}{hint}"))
        })
    };
    write(&backup, &text)?;
    write(path, &new)?;
    tracing::info!(config = %path.display(), camera, zones = edit.zones.len(), "zones saved from the web editor");
    Ok((backup, version_of(&new)))
}

/// A box refers to a frame the daemon no longer keeps (see `feed`).
fn frame_gone(seq: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!("frame {seq} is no longer kept: draw the box again"),
    )
}

/// A frame a page shows, to keep while a box is drawn on it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrameRef {
    frame: u64,
}

async fn pin(
    State(web): State<Arc<Web>>,
    UrlPath(camera): UrlPath<String>,
    req: Result<Json<FrameRef>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let req = body(req)?;
    if !feed(&web, &camera)?.pin(req.frame) {
        return Err(frame_gone(req.frame));
    }
    Ok(Json(json!({
        "frame": req.frame,
        "kept_s": super::feed::PIN_FOR.as_secs(),
    })))
}

/// A box on a recent frame, in normalised coordinates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoxOnFrame {
    frame: u64,
    #[serde(rename = "box")]
    bbox: [f32; 4],
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The pixels of the box on the frame it was drawn on: at least 8 pixels a side.
fn region(web: &Web, camera: &str, req: &BoxOnFrame) -> ApiResult<(Arc<super::feed::Shown>, BBox)> {
    let shown = feed(web, camera)?
        .find(req.frame)
        .ok_or_else(|| frame_gone(req.frame))?;
    let [x1, y1, x2, y2] = req.bbox;
    let (w, h) = shown.frame.image.dimensions();
    let b = BBox {
        x1: x1.min(x2).clamp(0.0, 1.0) * w as f32,
        y1: y1.min(y2).clamp(0.0, 1.0) * h as f32,
        x2: x1.max(x2).clamp(0.0, 1.0) * w as f32,
        y2: y1.max(y2).clamp(0.0, 1.0) * h as f32,
    };
    if req.bbox.iter().any(|v| !v.is_finite()) || b.width() < 8.0 || b.height() < 8.0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "box: must lie on the frame and be at least 8 pixels wide and high",
        ));
    }
    Ok((shown, b))
}

fn identification(web: &Web) -> ApiResult<&super::Identification> {
    web.identification.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "identification is not configured ([identify] in the config)",
        )
    })
}

async fn enrol(
    State(web): State<Arc<Web>>,
    UrlPath(camera): UrlPath<String>,
    req: Result<Json<BoxOnFrame>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let req = body(req)?;
    identification(&web)?;
    let sku = req.sku.clone().unwrap_or_default();
    check_sku(&sku)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("sku: {e}")))?;
    let (shown, b) = region(&web, &camera, &req)?;
    let w = web.clone();
    let name = req.name.clone().filter(|n| !n.trim().is_empty());
    let (refs, skus) = blocking(move || -> ApiResult<(usize, usize)> {
        let id = w.identification.as_ref().expect("checked above");
        let mut embedder = id.embedder.lock().unwrap_or_else(|p| p.into_inner());
        let vector = embedder
            .embed_region(&shown.frame.image, &b)
            .map_err(ApiError::internal)?;
        let _lock = GalleryLock::acquire(&id.gallery_dir).map_err(ApiError::internal)?;
        let mut g =
            open_for_change(&id.gallery_dir, &embedder.model_id()).map_err(ApiError::internal)?;
        g.add(
            Reference {
                sku: sku.clone(),
                name,
                source: format!("web:{camera}:{}", shown.seq),
                added: crate::publish::rfc3339(std::time::SystemTime::now()),
            },
            &vector,
        )
        .map_err(ApiError::internal)?;
        g.save(&id.gallery_dir).map_err(ApiError::internal)?;
        tracing::info!(
            sku,
            camera,
            frame = shown.seq,
            "product enrolled from the web page"
        );
        Ok((g.len(), g.skus().len()))
    })
    .await??;
    let reloaded = reload(&web).await;
    Ok(Json(json!({
        "sku": req.sku,
        "references": refs,
        "skus": skus,
        "reloaded": reloaded,
    })))
}

async fn identify(
    State(web): State<Arc<Web>>,
    UrlPath(camera): UrlPath<String>,
    req: Result<Json<BoxOnFrame>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let req = body(req)?;
    identification(&web)?;
    let (shown, b) = region(&web, &camera, &req)?;
    answer(web, move |embedder| {
        embedder.embed_region(&shown.frame.image, &b)
    })
    .await
}

/// A scanner's photo as the request body (JPEG, PNG or BMP), held to the scanner
/// requests' decode limits: the whole picture is identified.
async fn identify_upload(
    State(web): State<Arc<Web>>,
    image: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Value>> {
    let image = image.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let limits = identification(&web)?.decode;
    let picture = blocking(move || crate::capture::decode_image_within(&image, &limits))
        .await?
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("image: {e}")))?;
    answer(web, move |embedder| embedder.embed(&picture)).await
}

/// Embeds with `embed` on the blocking pool and answers the closest SKUs.
async fn answer(
    web: Arc<Web>,
    embed: impl FnOnce(&mut crate::vision::Embedder) -> Result<Vec<f32>, crate::vision::VisionError>
        + Send
        + 'static,
) -> ApiResult<Json<Value>> {
    let started = std::time::Instant::now();
    let w = web.clone();
    let matches = blocking(move || -> ApiResult<Vec<crate::identify::Match>> {
        let id = w.identification.as_ref().expect("checked by the caller");
        let mut embedder = id.embedder.lock().unwrap_or_else(|p| p.into_inner());
        let vector = embed(&mut embedder).map_err(ApiError::internal)?;
        // Read at each request: an enrolment a moment ago (here or by `shelfwatch
        // enroll`) counts at once; a gallery not enrolled yet is empty.
        let gallery =
            open_for_change(&id.gallery_dir, &embedder.model_id()).map_err(ApiError::internal)?;
        Ok(gallery.search(&vector, id.top_k))
    })
    .await??;
    let threshold = identification(&web)?.unknown_threshold;
    let best = matches
        .first()
        .filter(|m| m.similarity >= threshold)
        .map_or(crate::identify::UNKNOWN, |m| m.sku.as_str());
    Ok(Json(json!({
        "sku": best,
        "matches": matches,
        "ms": started.elapsed().as_secs_f64() * 1e3,
    })))
}
