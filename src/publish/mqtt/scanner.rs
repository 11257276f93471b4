//! The scanner link: identify requests that scanners publish are answered by a thread
//! of their own (see [`crate::identify::requests`]) with its own embedder, fed through
//! bounded channels, so the client task never waits for the model.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::settings::{default_discovery_prefix, MqttSettings};
use super::MqttError;
use crate::identify::requests::{
    Answering, Incoming, Outgoing as ScannerReply, RateLimiter, ReplyPolicy,
};
use crate::identify::IdentifyConfig;
use crate::vision::Embedder;

/// What the request thread answers with; a reload puts a new one in.
pub type AnswerCell = Arc<Mutex<Arc<Answering>>>;

/// What answering scanner requests needs from the daemon (`[identify]` with
/// `requests = true`).
pub struct ScannerParts<'a> {
    /// Forked for the request thread of each MQTT sink.
    pub embedder: &'a Embedder,
    pub answering: Answering,
    pub identify: &'a IdentifyConfig,
}

/// Scanner requests waiting to be answered; more are answered "busy" at once, since a
/// scanner user waits for each answer.
const REQUEST_QUEUE: usize = 4;

/// The client's side of the scanner request thread.
pub struct ScannerLink {
    pub requests: mpsc::Sender<Incoming>,
    pub replies: mpsc::Receiver<ScannerReply>,
    /// Where a "busy" answer may go (the same rule as every reply).
    pub policy: Arc<ReplyPolicy>,
    /// Requests per reply topic, counted on arrival (`identify.requests-per-s`).
    pub limiter: RateLimiter,
}

/// Starts the request thread of one MQTT sink: the client's side of it, and the cell
/// a reload replaces the answering in.
pub(super) fn start(
    parts: &ScannerParts<'_>,
    settings: &MqttSettings,
    device: &str,
) -> Result<(ScannerLink, AnswerCell), MqttError> {
    let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
    let (rep_tx, rep_rx) = mpsc::channel(REQUEST_QUEUE);
    let cell: AnswerCell = Arc::new(Mutex::new(Arc::new(parts.answering.clone())));
    let fork = parts.embedder.fork()?;
    let discovery = settings
        .home_assistant
        .as_ref()
        .map_or_else(default_discovery_prefix, |ha| ha.discovery_prefix.clone());
    let policy = Arc::new(ReplyPolicy::new(
        &settings.prefix,
        device,
        &discovery,
        parts.identify.reply_topics.clone(),
    ));
    let thread_policy = policy.clone();
    let thread_cell = cell.clone();
    let thread_device = device.to_owned();
    std::thread::Builder::new()
        .name("identify-requests".into())
        .spawn(move || {
            crate::identify::requests::serve(
                fork,
                thread_cell,
                req_rx,
                rep_tx,
                thread_device,
                thread_policy,
            )
        })
        .map_err(MqttError::Thread)?;
    let link = ScannerLink {
        requests: req_tx,
        replies: rep_rx,
        policy,
        limiter: RateLimiter::new(parts.identify.requests_per_s, parts.identify.request_burst),
    };
    Ok((link, cell))
}

/// The next reply of the scanner thread; pending forever without one.
pub(super) async fn recv_reply(scanner: &mut Option<ScannerLink>) -> Option<ScannerReply> {
    match scanner {
        Some(s) => s.replies.recv().await,
        None => std::future::pending().await,
    }
}
