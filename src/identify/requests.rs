//! Scanner requests: a handheld scanner publishes a photo of one item and gets the
//! gallery's top-k answer back (docs/mqtt.md, "Identification requests").
//!
//! MQTT 5: the payload is the image (JPEG or PNG); the reply goes to the request's
//! response topic with its correlation data. MQTT 3.1.1 has neither, so the payload may
//! be a JSON envelope `{"id", "reply-to", "image" (base64), "top-k"}`; the reply carries
//! the id. Without a reply topic the reply goes to `<prefix>/<device>/identify/response`.
//! Requests are served on their own thread (embedding is blocking work), one at a time
//! from a small bounded queue; a full queue is answered "busy" at once.
//!
//! Requests come from anyone who can publish on the broker, so nothing in them is
//! trusted: a reply topic must pass the [`ReplyPolicy`] (never our own topics, `$`
//! topics or Home Assistant's discovery), an id is capped at [`MAX_ID_BYTES`], each reply
//! topic (one scanner) is held to a token-bucket rate, and the image is decoded within
//! [`DecodeLimits`] that count the decoded picture, not the upload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{answer, Answer, Gallery};
use crate::capture::DecodeLimits;
use crate::vision::Embedder;

/// A request as it arrived.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub payload: Vec<u8>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, echoed in the reply.
    pub correlation: Option<Vec<u8>>,
    /// When it arrived: the rate is measured on arrivals, not on how fast the thread
    /// gets to them.
    pub received: Instant,
}

/// A reply to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// The JSON envelope (MQTT 3.1.1, or any client that prefers it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Envelope {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    /// Base64 (standard alphabet) of a JPEG or PNG.
    image: String,
    #[serde(default)]
    top_k: Option<usize>,
}

/// The reply payload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reply {
    /// Payload format version, as in every shelfwatch payload.
    pub schema: u32,
    /// Always "identify-reply" (docs/schemas/identify-reply.schema.json).
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub device: String,
    /// "ok" or "error".
    pub status: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time from receipt to answer, in milliseconds.
    pub ms: f64,
}

/// What the request thread needs to answer, replaced on reload.
#[derive(Debug, Clone)]
pub struct Answering {
    pub gallery: Arc<Gallery>,
    pub top_k: usize,
    pub unknown_threshold: f32,
    pub max_request_bytes: usize,
    /// Bounds on the decoded request image.
    pub decode: DecodeLimits,
}

impl Answering {
    /// Scanner limits: the daemon's `[decode]` bounds, tightened to a request's
    /// pixel and byte budgets.
    pub fn request_limits(
        global: &DecodeLimits,
        max_pixels: u64,
        max_bytes: usize,
    ) -> DecodeLimits {
        DecodeLimits {
            max_side: global.max_side.min(MAX_SIDE),
            max_pixels: global.max_pixels.min(max_pixels),
            // The picture and its float copy for the embedder: room for max_pixels at
            // 8-bit RGB with a second buffer, not for a 16-bit RGBA bomb.
            max_memory_bytes: global.max_memory_bytes.min(max_pixels.saturating_mul(6)),
            max_input_bytes: global.max_input_bytes.min(max_bytes as u64),
        }
    }
}

/// Largest image side decoded: a scanner photo needs far less, and a bigger one would
/// be a memory attack on a small board.
const MAX_SIDE: u32 = 8192;
/// Upper bound on top-k a request may ask for.
pub const MAX_TOP_K: usize = 50;
/// Longest request id echoed: ids are correlation handles, not payloads.
pub const MAX_ID_BYTES: usize = 128;
/// Longest reply topic accepted (the MQTT limit is 65,535; nothing real needs more).
pub const MAX_REPLY_TOPIC_BYTES: usize = 256;
/// Reply topics tracked by the rate limiter at once; the least recently seen goes first.
const MAX_RATE_KEYS: usize = 1024;

/// Where a request may have its reply published.
#[derive(Debug, Clone)]
pub struct ReplyPolicy {
    /// `<prefix>/<device>/identify/response`: requests that name no reply topic, and
    /// errors about a refused one.
    pub default_topic: String,
    /// `<prefix>/<device>/identify/reply/`: any one level below it is allowed.
    reply_area: String,
    /// `<prefix>/`: every topic the daemon owns, of this device and others.
    own_prefix: String,
    /// `<discovery prefix>/`: Home Assistant's configuration topics.
    discovery_prefix: String,
    /// `identify.reply-topics`.
    allowed: Vec<String>,
}

impl ReplyPolicy {
    pub fn new(prefix: &str, device: &str, discovery_prefix: &str, allowed: Vec<String>) -> Self {
        let base = format!("{prefix}/{device}/identify");
        Self {
            default_topic: format!("{base}/response"),
            reply_area: format!("{base}/reply/"),
            own_prefix: format!("{prefix}/"),
            discovery_prefix: format!("{discovery_prefix}/"),
            allowed,
        }
    }

    /// The topic to reply on, or why the requested one is refused.
    pub fn check(&self, requested: &str) -> Result<(), String> {
        if requested.len() > MAX_REPLY_TOPIC_BYTES {
            return Err(format!(
                "reply topic of {} bytes is longer than {MAX_REPLY_TOPIC_BYTES}",
                requested.len()
            ));
        }
        if requested.is_empty() || requested.contains(['+', '#', '\0']) {
            return Err("reply topic is not a valid topic name (empty, or + or #)".into());
        }
        let shown = requested.escape_debug();
        if let Some(name) = requested.strip_prefix(&self.reply_area) {
            return if name.is_empty() || name.contains('/') {
                Err(format!(
                    "reply topic \"{shown}\": one level below {} expected",
                    self.reply_area
                ))
            } else {
                Ok(())
            };
        }
        if requested.starts_with('$') {
            return Err(format!("reply topic \"{shown}\" is a broker ($) topic"));
        }
        if requested.starts_with(&self.own_prefix) {
            return Err(format!(
                "reply topic \"{shown}\" is under {}, where only shelfwatch publishes; use {}<name>",
                self.own_prefix, self.reply_area
            ));
        }
        if requested.starts_with(&self.discovery_prefix) {
            return Err(format!(
                "reply topic \"{shown}\" is under the discovery prefix {}",
                self.discovery_prefix
            ));
        }
        if self.allowed.iter().any(|f| filter_matches(f, requested)) {
            Ok(())
        } else {
            Err(format!(
                "reply topic \"{shown}\" is not allowed: use {}<name> or list it in identify.reply-topics",
                self.reply_area
            ))
        }
    }

    /// Where to reply: the requested topic if allowed, else the default topic with the
    /// reason to report.
    fn resolve(&self, requested: Option<&str>) -> (String, Option<String>) {
        match requested {
            None => (self.default_topic.clone(), None),
            Some(t) => match self.check(t) {
                Ok(()) => (t.to_owned(), None),
                Err(why) => (self.default_topic.clone(), Some(why)),
            },
        }
    }
}

/// Whether an MQTT topic filter (`+` one level, `#` the rest) matches a topic name.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A token bucket per reply topic: one scanner (or one attacker) cannot keep the
/// request thread from the others.
#[derive(Debug)]
pub struct RateLimiter {
    per_s: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_s: f64, burst: u32) -> Self {
        Self {
            per_s,
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `key` at `now`; false: over the rate.
    pub fn allow(&mut self, key: &str, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= MAX_RATE_KEYS {
            // Forget the key seen longest ago; a full bucket loses nothing by it.
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let (tokens, last) = self
            .buckets
            .entry(key.to_owned())
            .or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_s;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where the reply goes and the request's id, known even when the rest is bad.
struct Parsed {
    id: Option<String>,
    reply_to: Option<String>,
    top_k: Option<usize>,
    image: Result<Vec<u8>, String>,
}

fn parse(payload: &[u8], max_bytes: usize) -> Parsed {
    let looks_json = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if !looks_json {
        let image = if payload.is_empty() {
            Err("empty request: publish a JPEG or PNG, or a JSON envelope".to_owned())
        } else if payload.len() > max_bytes {
            Err(too_big(payload.len(), max_bytes))
        } else {
            Ok(payload.to_vec())
        };
        return Parsed {
            id: None,
            reply_to: None,
            top_k: None,
            image,
        };
    }
    // Base64 is 4/3 of the image, plus a little JSON. Saturating: `busy` parses with no
    // limit (usize::MAX), which overflowed here (found by fuzzing, issue #19).
    if payload.len() > (max_bytes / 3).saturating_mul(4).saturating_add(4096) {
        return Parsed {
            id: None,
            reply_to: None,
            top_k: None,
            image: Err(too_big(payload.len() / 4 * 3, max_bytes)),
        };
    }
    match serde_json::from_slice::<Envelope>(payload) {
        Err(e) => Parsed {
            id: None,
            reply_to: None,
            top_k: None,
            image: Err(format!("invalid JSON envelope: {e}")),
        },
        Ok(env) if env.id.as_ref().is_some_and(|id| id.len() > MAX_ID_BYTES) => Parsed {
            // Neither logged nor echoed: it could be a megabyte.
            id: None,
            reply_to: env.reply_to,
            top_k: None,
            image: Err(format!(
                "\"id\" of {} bytes is longer than {MAX_ID_BYTES}",
                env.id.map_or(0, |id| id.len())
            )),
        },
        Ok(env) => {
            let image = base64::engine::general_purpose::STANDARD
                .decode(env.image.trim())
                .map_err(|e| format!("\"image\" is not base64: {e}"))
                .and_then(|bytes| {
                    if bytes.len() > max_bytes {
                        Err(too_big(bytes.len(), max_bytes))
                    } else {
                        Ok(bytes)
                    }
                });
            Parsed {
                id: env.id,
                reply_to: env.reply_to,
                top_k: env.top_k,
                image,
            }
        }
    }
}

fn too_big(n: usize, max: usize) -> String {
    format!(
        "image of {n} bytes is larger than the limit of {max} bytes (identify.max-request-bytes)"
    )
}

/// Decodes a request image within `limits`, so a hostile or broken upload costs an
/// error, not the daemon's memory.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<image::RgbImage, String> {
    crate::capture::decode_image_within(bytes, limits).map_err(|e| match e {
        crate::capture::DecodeError::Image(image::ImageError::Unsupported(_)) => {
            "not an image (expected JPEG or PNG)".to_owned()
        }
        crate::capture::DecodeError::TooLarge { .. } => {
            format!("{e} (identify.max-request-pixels)")
        }
        e => format!("cannot decode the image: {e}"),
    })
}

/// Where a request's reply goes, whether its reply topic was refused, and the request
/// as parsed.
fn route(request: &Incoming, policy: &ReplyPolicy, max_bytes: usize) -> (String, Parsed) {
    let mut parsed = parse(&request.payload, max_bytes);
    let requested = request
        .response_topic
        .as_deref()
        .or(parsed.reply_to.as_deref());
    let (topic, refused) = policy.resolve(requested);
    if let Some(why) = refused {
        parsed.image = Err(format!("{why}; replying on {topic}"));
    }
    (topic, parsed)
}

/// Answers one request: where to send the reply, and what.
pub fn handle(
    request: &Incoming,
    embedder: &mut Embedder,
    answering: &Answering,
    device: &str,
    policy: &ReplyPolicy,
) -> Outgoing {
    let t0 = Instant::now();
    let (topic, parsed) = route(request, policy, answering.max_request_bytes);
    let result = parsed.image.and_then(|bytes| {
        let img = decode_image(&bytes, &answering.decode)?;
        let v = embedder.embed(&img).map_err(|e| e.to_string())?;
        let k = parsed.top_k.unwrap_or(answering.top_k).clamp(1, MAX_TOP_K);
        Ok(answer(
            &answering.gallery,
            &v,
            k,
            answering.unknown_threshold,
        ))
    });
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let reply = match result {
        Ok(a) => {
            tracing::info!(id = ?parsed.id, sku = %a.sku, similarity = a.similarity, ms, "identify request answered");
            Reply {
                schema: 1,
                kind: "identify-reply",
                id: parsed.id,
                device: device.to_owned(),
                status: "ok",
                answer: Some(a),
                error: None,
                ms,
            }
        }
        Err(e) => {
            let reply = error_reply(parsed.id, device, e, ms);
            tracing::warn!(id = ?reply.id, error = ?reply.error, "identify request refused");
            reply
        }
    };
    Outgoing {
        topic,
        correlation: request.correlation.clone(),
        payload: serde_json::to_vec(&reply).expect("a reply serialises"),
    }
}

/// Longest error text in a reply: a parser's message may quote the request.
const MAX_ERROR_BYTES: usize = 512;

fn error_reply(id: Option<String>, device: &str, mut error: String, ms: f64) -> Reply {
    if error.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str("...");
    }
    Reply {
        schema: 1,
        kind: "identify-reply",
        id,
        device: device.to_owned(),
        status: "error",
        answer: None,
        error: Some(error),
        ms,
    }
}

fn reply_busy(
    request: &Incoming,
    topic: String,
    id: Option<String>,
    device: &str,
    why: &str,
) -> Outgoing {
    let reply = error_reply(id, device, why.to_owned(), 0.0);
    Outgoing {
        topic,
        correlation: request.correlation.clone(),
        payload: serde_json::to_vec(&reply).expect("a reply serialises"),
    }
}

/// The fields of an envelope that say where to answer, read without decoding the image.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct EnvelopeHead {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
}

/// Where a request would be answered and its id (if short enough to echo), cheaply: run
/// on the MQTT task for every arrival, before the request may take a queue slot.
fn head(request: &Incoming, policy: &ReplyPolicy) -> (String, Option<String>) {
    let envelope = request
        .payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    let head = envelope
        .then(|| serde_json::from_slice::<EnvelopeHead>(&request.payload).ok())
        .flatten();
    let (id, reply_to) = head.map_or((None, None), |h| (h.id, h.reply_to));
    let requested = request.response_topic.as_deref().or(reply_to.as_deref());
    let (topic, _) = policy.resolve(requested);
    (topic, id.filter(|id| id.len() <= MAX_ID_BYTES))
}

/// Admission of an arriving request, on the MQTT task: a reply topic (one scanner) over
/// its rate is answered `busy` at once, so a flood never fills the queue that the other
/// scanners' requests wait in. `Err` carries the answer to publish instead.
pub fn admit(
    request: &Incoming,
    policy: &ReplyPolicy,
    limiter: &mut RateLimiter,
    device: &str,
) -> Result<(), Outgoing> {
    let (topic, id) = head(request, policy);
    if limiter.allow(&topic, request.received) {
        return Ok(());
    }
    tracing::warn!(topic = %topic, "identify request over the rate: answered busy");
    Err(reply_busy(
        request,
        topic,
        id,
        device,
        "busy: over the request rate for this reply topic (identify.requests-per-s); try again later",
    ))
}

/// The immediate reply to a request that found the queue full.
pub fn busy(request: &Incoming, device: &str, policy: &ReplyPolicy) -> Outgoing {
    // Only the reply topic and id are needed: the image is not decoded.
    let (topic, id) = head(request, policy);
    reply_busy(
        request,
        topic,
        id,
        device,
        "busy: too many identify requests waiting; try again",
    )
}

/// Serves requests until the request channel closes. Runs on a thread of its own.
pub fn serve(
    mut embedder: Embedder,
    answering: Arc<Mutex<Arc<Answering>>>,
    mut requests: tokio::sync::mpsc::Receiver<Incoming>,
    replies: tokio::sync::mpsc::Sender<Outgoing>,
    device: String,
    policy: Arc<ReplyPolicy>,
) {
    let span = tracing::info_span!("identify-requests", device = %device);
    let _g = span.enter();
    while let Some(request) = requests.blocking_recv() {
        let current = answering.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reply = handle(&request, &mut embedder, &current, &device, &policy);
        if replies.blocking_send(reply).is_err() {
            break;
        }
    }
}

// Its own file, so the envelope's fuzz target (issue #19) merges with changes here.
#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_image_payload_is_taken_as_is_within_the_limit() {
        let p = parse(&[0xff, 0xd8, 0xff, 1, 2, 3], 100);
        assert_eq!(p.image.unwrap().len(), 6);
        let p = parse(&[0xff; 200], 100);
        assert!(p.image.unwrap_err().contains("max-request-bytes"));
    }

    #[test]
    fn an_envelope_gives_id_reply_topic_and_decoded_image() {
        let env =
            br#"{"id": "r-1", "reply-to": "scanners/7/replies", "image": "/9j/AQID", "top-k": 3}"#;
        let p = parse(env, 1000);
        assert_eq!(p.id.as_deref(), Some("r-1"));
        assert_eq!(p.reply_to.as_deref(), Some("scanners/7/replies"));
        assert_eq!(p.top_k, Some(3));
        assert_eq!(p.image.unwrap(), vec![0xff, 0xd8, 0xff, 1, 2, 3]);
    }

    #[test]
    fn a_broken_envelope_is_an_error_not_a_panic() {
        let p = parse(br#"{"id": "x", "image": "***"}"#, 1000);
        assert_eq!(p.id.as_deref(), Some("x"));
        assert!(p.image.unwrap_err().contains("base64"));
        let p = parse(b"{not json", 1000);
        assert!(p.image.unwrap_err().contains("JSON"));
    }

    #[test]
    fn bytes_that_are_no_image_are_refused_with_a_reason() {
        let limits = DecodeLimits::default();
        assert!(decode_image(b"hello, this is text", &limits).is_err());
        let truncated = &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bad/truncated.jpg"
        ))
        .unwrap();
        assert!(decode_image(truncated, &limits)
            .unwrap_err()
            .contains("decode"));
    }

    fn policy() -> ReplyPolicy {
        ReplyPolicy::new(
            "shelfwatch",
            "pi-7",
            "homeassistant",
            vec!["scanners/+/replies".into()],
        )
    }

    fn request(reply_to: &str, id: &str) -> Incoming {
        let image = base64::engine::general_purpose::STANDARD.encode([0xff, 0xd8, 0xff, 0xd9]);
        let payload = serde_json::json!({"id": id, "reply-to": reply_to, "image": image});
        Incoming {
            payload: payload.to_string().into_bytes(),
            response_topic: None,
            correlation: None,
            received: Instant::now(),
        }
    }

    #[test]
    fn replies_go_to_the_reply_area_or_the_allow_list_only() {
        let p = policy();
        assert!(p.check("shelfwatch/pi-7/identify/reply/scanner-3").is_ok());
        assert!(p.check("scanners/3/replies").is_ok());
        for refused in [
            "shelfwatch/pi-7/zones/top/state",
            "shelfwatch/pi-8/cmd/reload",
            "shelfwatch/pi-7/identify/reply/a/b",
            "shelfwatch/pi-7/identify/reply/",
            "homeassistant/sensor/x/config",
            "$SYS/broker/x",
            "elsewhere/topic",
            "a/+",
            "#",
            "",
        ] {
            assert!(p.check(refused).is_err(), "{refused:?} was allowed");
        }
    }

    #[test]
    fn a_refused_reply_topic_is_answered_on_the_default_topic_with_the_reason() {
        let (topic, parsed) = route(
            &request("shelfwatch/pi-8/cmd/reload", "r-1"),
            &policy(),
            1000,
        );
        assert_eq!(topic, "shelfwatch/pi-7/identify/response");
        let err = parsed.image.unwrap_err();
        assert!(
            err.contains("shelfwatch/pi-8/cmd/reload") && err.contains("only shelfwatch"),
            "{err}"
        );
        // MQTT 5's response topic is held to the same rule.
        let mut r = request("scanners/3/replies", "r-2");
        r.response_topic = Some("homeassistant/sensor/x/config".into());
        let (topic, parsed) = route(&r, &policy(), 1000);
        assert_eq!(topic, "shelfwatch/pi-7/identify/response");
        assert!(parsed.image.unwrap_err().contains("discovery prefix"));
    }

    #[test]
    fn a_reply_topic_longer_than_an_mqtt_topic_can_be_is_refused_before_it_reaches_the_client() {
        let long = format!("scanners/{}/replies", "x".repeat(65_557));
        let (topic, parsed) = route(&request(&long, "r-1"), &policy(), 1 << 20);
        assert_eq!(topic, "shelfwatch/pi-7/identify/response");
        let err = parsed.image.unwrap_err();
        assert!(
            err.contains("longer than 256"),
            "{}",
            &err[..200.min(err.len())]
        );
        assert!(
            err.len() < 1000,
            "the refused topic is echoed: {} bytes",
            err.len()
        );
    }

    #[test]
    fn a_megabyte_request_id_is_neither_echoed_nor_accepted() {
        let id = "i".repeat(1 << 20);
        let (_, parsed) = route(&request("scanners/3/replies", &id), &policy(), 1 << 22);
        assert_eq!(parsed.id, None);
        assert!(parsed.image.unwrap_err().contains("longer than 128"));
        let reply = error_reply(None, "pi-7", "e".repeat(100_000), 0.0);
        assert!(reply.error.unwrap().len() <= MAX_ERROR_BYTES + 3);
    }

    #[test]
    fn one_reply_topic_over_its_rate_is_held_back_while_another_is_served() {
        let mut l = RateLimiter::new(2.0, 4);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(l.allow("a", t0));
        }
        assert!(!l.allow("a", t0), "the burst is spent");
        assert!(l.allow("b", t0), "another scanner has its own bucket");
        // Two a second: half a second later one more token.
        assert!(l.allow("a", t0 + std::time::Duration::from_millis(500)));
        assert!(!l.allow("a", t0 + std::time::Duration::from_millis(500)));
    }

    #[test]
    fn a_flood_on_one_reply_topic_is_turned_away_on_arrival_with_its_id_and_another_is_admitted() {
        let p = policy();
        let mut l = RateLimiter::new(0.1, 2);
        let flood = request("scanners/1/replies", "f");
        assert!(admit(&flood, &p, &mut l, "pi-7").is_ok());
        assert!(admit(&flood, &p, &mut l, "pi-7").is_ok());
        let refused = admit(&flood, &p, &mut l, "pi-7").unwrap_err();
        assert_eq!(refused.topic, "scanners/1/replies");
        let reply: serde_json::Value = serde_json::from_slice(&refused.payload).unwrap();
        assert_eq!(reply["id"], "f");
        assert!(
            reply["error"].as_str().unwrap().starts_with("busy"),
            "{reply}"
        );
        assert!(admit(&request("scanners/2/replies", "g"), &p, &mut l, "pi-7").is_ok());
        // A refused reply topic is counted where its answer goes: the default topic.
        let hostile = request("shelfwatch/pi-8/cmd/reload", "h");
        assert_eq!(head(&hostile, &p).0, "shelfwatch/pi-7/identify/response");
    }

    #[test]
    fn the_rate_limiter_forgets_the_oldest_key_instead_of_growing() {
        let mut l = RateLimiter::new(1.0, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_RATE_KEYS + 100) {
            l.allow(
                &format!("k{i}"),
                t0 + std::time::Duration::from_millis(i as u64),
            );
        }
        assert_eq!(l.buckets.len(), MAX_RATE_KEYS);
    }

    #[test]
    fn mqtt_filters_match_as_brokers_match_them() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+/c", "a/b/d"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("a/b", "a/b"));
        assert!(!filter_matches("a/b", "a/b/c"));
    }

    #[test]
    fn request_limits_refuse_a_sixteen_bit_picture_within_the_pixel_budget() {
        let l = Answering::request_limits(&DecodeLimits::default(), 12_600_000, 4 << 20);
        assert!(l.max_memory_bytes < 4096 * 4096 * 11);
        assert_eq!(l.max_input_bytes, 4 << 20);
    }
}
