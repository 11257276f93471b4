//! The real `shelfwatch run` daemon over composed shelf scenes (tests/fixtures/scenes),
//! with its signals, state file and config handling.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::{self, fixture, jsonl, patience, Camera, Config, Daemon, Sink, Zone, SHELFWATCH};

/// With which models a daemon replays a committed frame sequence.
struct Replay {
    /// The counting model; `None`: the default (the shelf counter).
    model: Option<&'static str>,
    occluder_model: Option<&'static str>,
    /// What the zones count.
    label: &'static str,
    min: u32,
}

/// The cup scenes, composed for the generic-class SSD (cups and a person).
const CUP_SCENES: Replay = Replay {
    model: Some("ssd_mobilenetv2_oidv4.toml"),
    occluder_model: None,
    label: "Coffee cup",
    min: 2,
};

/// A config over the scene frames `frames` (a pattern) with a JSONL sink and state
/// in the directory it is written to.
fn scene_config(frames: &str, looping: bool) -> Config {
    replay_config(&CUP_SCENES, &fixture("scenes/frames").join(frames), looping)
}

fn replay_config(replay: &Replay, frames: &Path, looping: bool) -> Config {
    let zone = |z: Zone| z.labels(&[replay.label]).min(replay.min);
    let mut config = Config::new("test-device")
        .window_frames(5)
        .min_agreement(0.6)
        .out_of_stock_after_s(0.0)
        .camera(
            Camera::files(frames, 50.0)
                .looping(looping)
                .every_frame()
                .zone(zone(Zone::top_shelf()))
                .zone(zone(Zone::bottom_shelf())),
        )
        .sink(Sink::jsonl("out.jsonl"));
    if let Some(m) = replay.model {
        config = config.model(m);
    }
    if let Some(m) = replay.occluder_model {
        config = config.occluder_model(m);
    }
    config
}

fn messages(dir: &Path) -> Vec<Value> {
    jsonl(&dir.join("out.jsonl"))
}

/// Published stable counts of cups in one zone, in order.
fn zone_counts(msgs: &[Value], zone: &str) -> Vec<u64> {
    label_counts(msgs, zone, "Coffee cup")
}

/// Published stable counts of one label in one zone, in order (0 when absent).
fn label_counts(msgs: &[Value], zone: &str, label: &str) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m["type"] == "state" && m["zone"] == zone)
        .map(|m| m["counts"][label].as_u64().unwrap_or(0))
        .collect()
}

fn events(msgs: &[Value], zone: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] == "event" && m["zone"] == zone)
        .map(|m| m["event"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_for(dir: &Path, what: impl Fn(&[Value]) -> bool) {
    let t = Instant::now();
    while !what(&messages(dir)) {
        assert!(
            t.elapsed() < patience(Duration::from_secs(60)),
            "timed out; got {:?}",
            messages(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_over_the_composed_scenes_publishes_exactly_the_known_stable_counts() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = run_to_end(&scene_config("*.jpg", false).write(dir.path()));

    // expected.json: top 3 -> 2; bottom 2, held at 2 while a person hides it, 0, then 4.
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("scenes/expected.json")).unwrap())
            .unwrap();
    for zone in ["top-shelf", "bottom-shelf"] {
        let mut want: Vec<u64> = expected["stable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["stable"][zone]["Coffee cup"].as_u64().unwrap())
            .collect();
        want.dedup();
        assert_eq!(zone_counts(&msgs, zone), want, "{zone}");
    }
    assert_eq!(events(&msgs, "top-shelf"), ["count-changed"]);
    assert_eq!(
        events(&msgs, "bottom-shelf"),
        [
            "count-changed",
            "low-stock",
            "out-of-stock",
            "count-changed",
            "restocked"
        ]
    );
    // One sequence, no gaps, from 1.
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(msgs
        .iter()
        .all(|m| m["schema"] == 1 && m["device"] == "test-device"));

    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("state/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["seq"].as_u64(), seqs.last().copied());
    assert_eq!(
        state["zones"]["shelf/bottom-shelf"]["counts"]["Coffee cup"],
        4
    );
}

// Issue #19: a decompression bomb in a files camera's directory aborted `run`, which
// under systemd is a crash loop.
#[test]
fn a_decompression_bomb_among_a_cameras_frames_is_skipped_and_the_counts_still_come() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let scenes = fixture("scenes/frames");
    for entry in std::fs::read_dir(&scenes).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jpg") {
            std::fs::copy(&path, frames.join(path.file_name().unwrap())).unwrap();
        }
    }
    // Sorted between two frames of the same scene: its absence changes no majority.
    std::fs::copy(fixture("bad/bomb-60000x60000.png"), frames.join("001b.png")).unwrap();
    let config = replay_config(&CUP_SCENES, &frames.join("*"), false).write(dir.path());

    let mut daemon = Daemon::start(&config);
    let status = daemon.wait(Duration::from_secs(120));
    let stderr = daemon.log();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains("corrupt frame skipped") && stderr.contains("001b.png"),
        "{stderr}"
    );
    let msgs = messages(dir.path());
    assert_eq!(zone_counts(&msgs, "top-shelf"), [3, 2]);
    assert_eq!(zone_counts(&msgs, "bottom-shelf"), [2, 0, 4]);
}

/// The default model (the shelf counter) over tests/fixtures/shelf-scenes, with or
/// without the SSD as occluder model.
fn shelf_scene_config(occluder_model: bool) -> Config {
    let replay = Replay {
        model: None,
        occluder_model: occluder_model.then_some("ssd_mobilenetv2_oidv4.toml"),
        label: "product",
        min: 3,
    };
    replay_config(&replay, &fixture("shelf-scenes/frames/*.jpg"), false)
}

/// Two of three frames agreeing, as a shelf camera that reacts faster would configure
/// it. What the counter sees of a person (a product or two left visible, parts of the
/// person read as boxes) varies from frame to frame, so a five-frame window may find no
/// majority and hold a count by luck, and the occluder tests would prove nothing.
fn fast_window(config: Config) -> Config {
    config.window_frames(3)
}

/// Runs the daemon over a non-looping replay until it exits (the guard kills one that
/// does not, so no stray process outlives the test).
fn run_to_end(config: &Path) -> Vec<Value> {
    let mut daemon = Daemon::start(config);
    let status = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{status:?}");
    messages(config.parent().unwrap())
}

#[test]
fn the_default_counter_counts_unseen_products_and_holds_a_count_while_a_person_hides_it() {
    let dir = tempfile::tempdir().unwrap();
    // The window of the test below, where the counter alone drops the count: here the
    // occluder model is what holds it, not a window too slow to agree.
    let msgs = run_to_end(&fast_window(shelf_scene_config(true)).write(dir.path()));
    // expected.json: top 6 -> 4; bottom 5, held while the person (found by the SSD)
    // hides four of its products, emptied, restocked with 5.
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("shelf-scenes/expected.json")).unwrap(),
    )
    .unwrap();
    for zone in ["top-shelf", "bottom-shelf"] {
        let mut want: Vec<u64> = expected["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["stable"][zone].as_u64().unwrap())
            .collect();
        want.dedup();
        assert_eq!(label_counts(&msgs, zone, "product"), want, "{zone}");
    }
    assert_eq!(label_counts(&msgs, "top-shelf", "product"), [6, 4]);
    assert_eq!(events(&msgs, "top-shelf"), ["count-changed"]);
    assert_eq!(
        events(&msgs, "bottom-shelf"),
        [
            "count-changed",
            "low-stock",
            "out-of-stock",
            "count-changed",
            "restocked"
        ]
    );
    // Occluders are never counted, whichever model found them.
    assert!(msgs
        .iter()
        .filter(|m| m["type"] == "state")
        .all(|m| m["counts"].get("Person").is_none()));
}

#[test]
fn without_an_occluder_model_a_person_in_front_of_the_shelf_drops_its_count() {
    // What `counting.occluder-model` is for: the counter alone knows no people, sees
    // the one product the person leaves visible, and reports a false low stock.
    let dir = tempfile::tempdir().unwrap();
    let msgs = run_to_end(&fast_window(shelf_scene_config(false)).write(dir.path()));
    let bottom = label_counts(&msgs, "bottom-shelf", "product");
    // 5, then lower while the person stands there, then 5 again, emptied, restocked.
    assert!(bottom.len() >= 5, "{bottom:?}");
    let (while_hidden, after) = bottom[1..].split_at(bottom.len() - 4);
    assert_eq!((bottom[0], after), (5, &[5, 0, 5][..]), "{bottom:?}");
    // The products left visible, and whatever of the person looks like a box: what the
    // counter makes of it may change from frame to frame, but it is never the 5 there are.
    assert!(
        while_hidden.iter().all(|n| (1..5).contains(n)),
        "{bottom:?}"
    );
    assert_eq!(label_counts(&msgs, "top-shelf", "product"), [6, 4]);
}

#[test]
fn after_a_restart_the_last_counts_are_published_at_once_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    // First run: block A only (top 3, bottom 2).
    let config = scene_config("00[0-4].jpg", false).write(dir.path());
    assert!(Daemon::start(&config)
        .wait(Duration::from_secs(60))
        .success());
    let first = messages(dir.path());
    let last_seq = first.last().unwrap()["seq"].as_u64().unwrap();

    // Second run: a frame where nothing is decided yet (one frame is no consensus).
    let config = scene_config("018.jpg", false).write(dir.path());
    assert!(Daemon::start(&config)
        .wait(Duration::from_secs(60))
        .success());
    let all = messages(dir.path());
    let second = &all[first.len()..];
    assert_eq!(
        second[0]["seq"].as_u64(),
        Some(last_seq + 1),
        "seq continues"
    );
    assert_eq!(zone_counts(second, "top-shelf"), [3], "restored, not zero");
    assert_eq!(
        zone_counts(second, "bottom-shelf"),
        [2],
        "restored, not zero"
    );
}

#[test]
fn sigterm_exits_zero_within_two_seconds_with_the_state_written() {
    // Two seconds natively: systemd's TimeoutStopSec is 15, and a stop must not wait for
    // more than the frame in flight. (Under emulation one frame takes seconds.)
    let dir = tempfile::tempdir().unwrap();
    let config = scene_config("*.jpg", true).write(dir.path());
    let mut daemon = Daemon::start(&config);
    wait_for(dir.path(), |m| m.iter().any(|m| m["type"] == "state"));
    let t = Instant::now();
    let status = daemon.terminate();
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < patience(Duration::from_secs(2)), "took {took:?}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("state/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["seq"].as_u64(),
        messages(dir.path()).last().unwrap()["seq"].as_u64()
    );
}

#[test]
fn sighup_with_a_broken_config_keeps_running_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = scene_config("*.jpg", true);
    let config = good.write(dir.path());
    let mut daemon = Daemon::start(&config);
    wait_for(dir.path(), |m| m.iter().any(|m| m["type"] == "state"));
    good.set("counting.window-frame", 3).write(dir.path());
    daemon.signal(Signal::SIGHUP);
    std::thread::sleep(patience(Duration::from_millis(1500)));
    assert!(daemon.is_running(), "the daemon must keep running");
    let before = messages(dir.path()).len();
    wait_for(dir.path(), |m| m.len() > before + 1);
    daemon.stop();
    let stderr = daemon.log();
    assert!(stderr.contains("counting.window-frame"), "{stderr}");
    assert!(stderr.contains("keeping the running one"), "{stderr}");
}

#[test]
fn run_with_an_unknown_config_key_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = scene_config("*.jpg", false)
        .set("state.directory", "x")
        .write(dir.path());
    let out =
        util::output(Command::new(SHELFWATCH).args(["run", "--config", config.to_str().unwrap()]))
            .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state.directory"));
}

#[test]
fn run_without_any_camera_exits_78_so_systemd_does_not_restart_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shelfwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n\n[[sinks]]\nkind = \"stdout\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out =
        util::output(Command::new(SHELFWATCH).args(["run", "--config", config.to_str().unwrap()]))
            .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("shelfwatch.toml") && stderr.contains("no cameras"),
        "{stderr}"
    );
}
