//! Every published payload, and every example in docs/mqtt.md, is valid against the JSON
//! Schemas in docs/schemas.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{fixture, jsonl, patience, root, Camera, Config, Daemon, Sink, Zone};

fn validator(kind: &str) -> jsonschema::Validator {
    let path = root().join(format!("docs/schemas/{kind}.schema.json"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check(v: &Value) {
    let kind = v["type"].as_str().unwrap_or_else(|| panic!("no type: {v}"));
    let validator = validator(kind);
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{v}\n{errors:#?}");
}

#[test]
fn every_example_in_the_mqtt_doc_is_valid_against_its_schema() {
    let doc = std::fs::read_to_string(root().join("docs/mqtt.md")).unwrap();
    let mut n = 0;
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("<!-- example: ") {
        rest = &rest[i..];
        let kind = &rest["<!-- example: ".len()..rest.find(" -->").unwrap()];
        let start = rest.find("```json\n").unwrap() + "```json\n".len();
        let end = start + rest[start..].find("```").unwrap();
        let v: Value = serde_json::from_str(rest[start..end].trim()).unwrap();
        assert_eq!(v["type"], kind, "example marker and payload type differ");
        check(&v);
        n += 1;
        rest = &rest[end..];
    }
    // state, nine event kinds, health, two identify replies
    assert_eq!(n, 13, "examples found");
}

#[test]
fn a_schema_rejects_a_payload_that_breaks_it() {
    let bad = serde_json::json!({
        "schema": 1, "device": "a/b", "seq": 0, "ts": "yesterday", "type": "state",
        "camera": "c", "zone": "z", "counts": {"Cup": -1}, "total": 0, "status": "fine"
    });
    assert!(!validator("state").is_valid(&bad));
    let missing = serde_json::json!({
        "schema": 1, "device": "d", "seq": 3, "ts": "2026-11-27T08:00:00.000Z", "type": "event",
        "camera": "c", "zone": "z", "event": "count-changed", "label": "Cup"
    });
    assert!(
        !validator("event").is_valid(&missing),
        "count-changed needs from and to"
    );
}

fn run_until(dir: &Path, config: &Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut daemon = Daemon::start(config);
    let read = || jsonl(&dir.join("out.jsonl"));
    let t = Instant::now();
    while !done(&read()) {
        assert!(
            t.elapsed() < patience(Duration::from_secs(90)),
            "timed out: {:?}",
            read()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.stop();
    read()
}

#[test]
fn every_message_of_a_real_run_is_valid_against_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    // The scenes are composed for the generic-class SSD (cups and a person).
    let config = Config::new("schema-test")
        .model("ssd_mobilenetv2_oidv4.toml")
        .window_frames(3)
        .out_of_stock_after_s(0.0)
        .camera(
            Camera::files(&fixture("scenes/frames/*.jpg"), 20.0)
                .every_frame()
                .zone(Zone::top_shelf().labels(&["Coffee cup"]).min(3).max(3))
                .zone(Zone::bottom_shelf()),
        )
        .sink(Sink::jsonl("out.jsonl"))
        .health_interval_s(1)
        .write(dir.path());
    let msgs = run_until(dir.path(), &config, |m| {
        let has = |t: &str, e: &str| {
            m.iter()
                .any(|v| v["type"] == t && (e.is_empty() || v["event"] == e))
        };
        has("health", "")
            && has("event", "out-of-stock")
            && has("event", "restocked")
            && has("state", "")
    });
    for m in &msgs {
        check(m);
    }
}
