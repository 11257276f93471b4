//! Scanner requests: a handheld scanner publishes a photo of one item and gets the
//! gallery's top-k answer back (docs/mqtt.md, "Identification requests").
//!
//! MQTT 5: the payload is the image (JPEG or PNG); the reply goes to the request's
//! response topic with its correlation data. MQTT 3.1.1 has neither, so the payload may
//! be a JSON envelope `{"id", "reply-to", "image" (base64), "top-k"}`; the reply carries
//! the id. Without a reply topic the reply goes to `<prefix>/<device>/identify/response`.
//! Requests are served on their own thread (embedding is blocking work), one at a time
//! from a small bounded queue; a full queue is answered "busy" at once.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{answer, Answer, Gallery};
use crate::vision::Embedder;

/// A request as it arrived.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub payload: Vec<u8>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, echoed in the reply.
    pub correlation: Option<Vec<u8>>,
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
}

/// Largest image side decoded: a scanner photo needs far less, and a bigger one would
/// be a memory attack on a small board.
const MAX_SIDE: u32 = 8192;
/// Upper bound on top-k a request may ask for.
pub const MAX_TOP_K: usize = 50;

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

/// A topic a reply may be published to: no wildcards, not empty.
fn valid_reply_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#', '\0'])
}

/// Decodes an image with bounds on its size, so a hostile or broken upload costs an
/// error, not the daemon's memory.
pub fn decode_image(bytes: &[u8]) -> Result<image::RgbImage, String> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(256 << 20);
    crate::capture::decode_image_within(bytes, limits).map_err(|e| match e {
        crate::capture::DecodeError::Image(image::ImageError::Unsupported(_)) => {
            "not an image (expected JPEG or PNG)".to_owned()
        }
        e => format!("cannot decode the image: {e}"),
    })
}

/// Answers one request: where to send the reply, and what.
pub fn handle(
    request: &Incoming,
    embedder: &mut Embedder,
    answering: &Answering,
    device: &str,
    default_reply_topic: &str,
) -> Outgoing {
    let t0 = Instant::now();
    let parsed = parse(&request.payload, answering.max_request_bytes);
    let mut topic = request
        .response_topic
        .clone()
        .or(parsed.reply_to.clone())
        .unwrap_or_else(|| default_reply_topic.to_owned());
    let mut result = parsed.image.and_then(|bytes| {
        let img = decode_image(&bytes)?;
        let v = embedder.embed(&img).map_err(|e| e.to_string())?;
        let k = parsed.top_k.unwrap_or(answering.top_k).clamp(1, MAX_TOP_K);
        Ok(answer(
            &answering.gallery,
            &v,
            k,
            answering.unknown_threshold,
        ))
    });
    if !valid_reply_topic(&topic) {
        result = Err(format!(
            "reply topic {topic:?} is not a valid topic name (no + or #); replying on {default_reply_topic}"
        ));
        topic = default_reply_topic.to_owned();
    }
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
            tracing::warn!(id = ?parsed.id, error = %e, "identify request refused");
            error_reply(parsed.id, device, e, ms)
        }
    };
    Outgoing {
        topic,
        correlation: request.correlation.clone(),
        payload: serde_json::to_vec(&reply).expect("a reply serialises"),
    }
}

fn error_reply(id: Option<String>, device: &str, error: String, ms: f64) -> Reply {
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

/// The immediate reply to a request that found the queue full.
pub fn busy(request: &Incoming, device: &str, default_reply_topic: &str) -> Outgoing {
    let parsed = parse(&request.payload, usize::MAX);
    let topic = request
        .response_topic
        .clone()
        .or(parsed.reply_to)
        .filter(|t| valid_reply_topic(t))
        .unwrap_or_else(|| default_reply_topic.to_owned());
    let reply = error_reply(
        parsed.id,
        device,
        "busy: too many identify requests waiting; try again".into(),
        0.0,
    );
    Outgoing {
        topic,
        correlation: request.correlation.clone(),
        payload: serde_json::to_vec(&reply).expect("a reply serialises"),
    }
}

/// Serves requests until the request channel closes. Runs on a thread of its own.
pub fn serve(
    mut embedder: Embedder,
    answering: Arc<Mutex<Arc<Answering>>>,
    mut requests: tokio::sync::mpsc::Receiver<Incoming>,
    replies: tokio::sync::mpsc::Sender<Outgoing>,
    device: String,
    default_reply_topic: String,
) {
    let span = tracing::info_span!("identify-requests", device = %device);
    let _g = span.enter();
    while let Some(request) = requests.blocking_recv() {
        let current = answering.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reply = handle(
            &request,
            &mut embedder,
            &current,
            &device,
            &default_reply_topic,
        );
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
        assert!(decode_image(b"hello, this is text").is_err());
        let truncated = &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bad/truncated.jpg"
        ))
        .unwrap();
        assert!(decode_image(truncated).unwrap_err().contains("decode"));
    }

    #[test]
    fn wildcard_reply_topics_are_refused() {
        assert!(valid_reply_topic("a/b"));
        assert!(!valid_reply_topic("a/+"));
        assert!(!valid_reply_topic("#"));
        assert!(!valid_reply_topic(""));
    }
}
