//! Fuzz target of the scanner request parser (issue #19, part 5): whatever a client
//! publishes on the request topic, `parse` gives an image within the size limit or a
//! reason, never a panic. Strategies and configuration: `crate::fuzz_tests`.

use base64::Engine;
use proptest::prelude::*;

use super::parse;
use crate::fuzz_tests::{any_bytes, fuzz_config, images, mutated};

/// Members, values and escapes the envelope's deserialiser branches on.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"\"",
    b",",
    b":",
    b"null",
    b"\"id\":",
    b"\"reply-to\":",
    b"\"image\":",
    b"\"top-k\":",
    b"\"extra\":1,",
    b"-1",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e999",
    b"0.5",
    b"\\ud800",
    b"\\u0000",
    b"\\\"",
    b"====",
    b"/+/+",
    b" \n",
    b"\xc3\xa9",
];

/// The limit: CI's range, the busy path's unlimited parse, and anything.
fn max_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=8192,
        1 => Just(usize::MAX),
        1 => any::<usize>(),
    ]
}

/// An envelope as a scanner client writes it, and its parts.
#[derive(Debug, Clone)]
struct Envelope {
    id: Option<String>,
    reply_to: Option<String>,
    image: Vec<u8>,
    top_k: Option<usize>,
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        // At most 128 bytes (32 characters of up to 4): longer ids are refused by the
        // id cap of issue #19 part 1, which has its own tests.
        prop::option::of(".{0,32}"),
        prop::option::of(".{0,64}"),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::sample::select(images::seeds()),
        ],
        prop::option::of(0usize..=100),
    )
        .prop_map(|(id, reply_to, image, top_k)| Envelope {
            id,
            reply_to,
            image,
            top_k,
        })
}

fn encode(e: &Envelope) -> Vec<u8> {
    let image = base64::engine::general_purpose::STANDARD.encode(&e.image);
    serde_json::to_vec(&serde_json::json!({
        "id": e.id, "reply-to": e.reply_to, "image": image, "top-k": e.top_k,
    }))
    .expect("an envelope serialises")
}

/// The bound every answer keeps, whatever the payload: an image is never larger than
/// the limit.
fn check(payload: &[u8], max: usize) -> Result<(), TestCaseError> {
    let p = parse(payload, max);
    if let Ok(image) = &p.image {
        prop_assert!(image.len() <= max, "{} bytes over {}", image.len(), max);
        let envelope = payload.first() == Some(&b'{');
        prop_assert!(!image.is_empty() || envelope, "an empty raw image");
    }
    let json = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if !json && !payload.is_empty() && payload.len() <= max {
        prop_assert_eq!(p.image.as_deref().ok(), Some(payload), "a raw image as is");
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_config(20_000))]

    #[test]
    fn any_bytes_as_a_scanner_request_give_an_image_within_the_limit_or_a_reason_never_a_panic(
        payload in prop_oneof![
            any_bytes(2048),
            // Past the JSON sniffing.
            any_bytes(512).prop_map(|b| [b"{".as_slice(), &b].concat()),
        ],
        max in max_bytes(),
    ) {
        check(&payload, max)?;
    }

    #[test]
    fn mutated_request_envelopes_give_an_image_within_the_limit_or_a_reason_never_a_panic(
        payload in prop_oneof![
            envelope().prop_flat_map(|e| mutated(vec![encode(&e)], DICTIONARY, 6)),
            images::mutated_images(),
        ],
        max in max_bytes(),
    ) {
        check(&payload, max)?;
    }

    #[test]
    fn a_well_formed_envelope_within_the_limit_gives_back_its_id_reply_topic_top_k_and_image(
        e in envelope(),
        headroom in prop_oneof![Just(0usize), 0usize..4096, Just(usize::MAX / 2)],
    ) {
        let payload = encode(&e);
        // The limit is on the image; the envelope may be 4/3 of it plus the JSON.
        let max = payload.len().max(e.image.len()).saturating_add(headroom);
        let p = parse(&payload, max);
        prop_assert_eq!(&p.id, &e.id);
        prop_assert_eq!(&p.reply_to, &e.reply_to);
        prop_assert_eq!(p.top_k, e.top_k);
        prop_assert_eq!(p.image, Ok(e.image));
    }
}

/// Issue #19 (found by fuzzing with overflow checks on): `busy` parses a request with no
/// limit, and the envelope's bound `usize::MAX / 3 * 4` overflowed; a build with overflow
/// checks (debug, or the long fuzz runs) panicked on every JSON request that found the
/// queue full. A release build wrapped to a bound that happened to be large.
#[test]
fn a_request_parsed_without_a_limit_is_an_envelope_not_an_overflow() {
    let p = parse(br#"{"id": "r-1", "image": "/9j/AQID"}"#, usize::MAX);
    assert_eq!(p.id.as_deref(), Some("r-1"));
    assert_eq!(p.image.unwrap(), vec![0xff, 0xd8, 0xff, 1, 2, 3]);
}
