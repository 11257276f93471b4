//! The real `shelfwatch run` daemon over composed shelf scenes (tests/fixtures/scenes),
//! with its signals, state file and config handling.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

mod common;
use common::patience;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Which committed frame sequence a daemon replays, and with which models.
struct Replay {
    /// Under tests/fixtures/.
    fixture: &'static str,
    /// The counting model; `None`: the default (the shelf counter).
    model: Option<&'static str>,
    occluder_model: Option<&'static str>,
    /// What the zones count.
    label: &'static str,
    min: u32,
}

/// The cup scenes, composed for the generic-class SSD (cups and a person).
const CUP_SCENES: Replay = Replay {
    fixture: "scenes",
    model: Some("ssd_mobilenetv2_oidv4.toml"),
    occluder_model: None,
    label: "Coffee cup",
    min: 2,
};

/// A config over the scene frames with a JSONL sink and state in `dir`.
fn scene_config(dir: &Path, frames: &str, looping: bool) -> PathBuf {
    replay_config(dir, &CUP_SCENES, frames, looping)
}

fn replay_config(dir: &Path, replay: &Replay, frames: &str, looping: bool) -> PathBuf {
    let model = replay
        .model
        .map(|m| format!("[model]\nmanifest = \"{m}\"\n"))
        .unwrap_or_default();
    let occluder = replay
        .occluder_model
        .map(|m| format!("occluder-model = \"{m}\""))
        .unwrap_or_default();
    let (label, min) = (replay.label, replay.min);
    let text = format!(
        r#"
[device]
id = "test-device"

{model}
[counting]
window-frames = 5
min-agreement = 0.6
out-of-stock-after-s = 0.0
{occluder}

[[cameras]]
id = "shelf"
[cameras.source]
kind = "files"
path = "{frames}"
fps = 50.0
loop = {looping}
every-frame = true

[[cameras.zones]]
name = "top-shelf"
polygon = [[0.0, 0.0], [1.0, 0.0], [1.0, 0.5], [0.0, 0.5]]
labels = ["{label}"]
min = {min}

[[cameras.zones]]
name = "bottom-shelf"
polygon = [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]]
labels = ["{label}"]
min = {min}

[[sinks]]
kind = "jsonl"
path = "out.jsonl"

[state]
dir = "state"

[health]
interval-s = 0
"#,
        frames = root()
            .join("tests/fixtures")
            .join(replay.fixture)
            .join("frames")
            .join(frames)
            .display(),
    );
    let path = dir.join("shelfwatch.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shelfwatch"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("SHELFWATCH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn messages(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let limit = patience(limit);
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
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
    let msgs = run_to_end(&scene_config(dir.path(), "*.jpg", false));

    // expected.json: top 3 -> 2; bottom 2, held at 2 while a person hides it, 0, then 4.
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/scenes/expected.json")).unwrap(),
    )
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
    let scenes = root().join("tests/fixtures/scenes/frames");
    for entry in std::fs::read_dir(&scenes).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jpg") {
            std::fs::copy(&path, frames.join(path.file_name().unwrap())).unwrap();
        }
    }
    // Sorted between two frames of the same scene: its absence changes no majority.
    std::fs::copy(
        root().join("tests/fixtures/bad/bomb-60000x60000.png"),
        frames.join("001b.png"),
    )
    .unwrap();
    let config = scene_config(dir.path(), "*.jpg", false);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &scenes.join("*.jpg").display().to_string(),
        &frames.join("*").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();

    let mut child = spawn(&config);
    let Some(status) = wait_exit(&mut child, Duration::from_secs(120)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the daemon did not end with its input");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
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
fn shelf_scene_config(dir: &Path, occluder_model: bool) -> PathBuf {
    let replay = Replay {
        fixture: "shelf-scenes",
        model: None,
        occluder_model: occluder_model.then_some("ssd_mobilenetv2_oidv4.toml"),
        label: "product",
        min: 3,
    };
    replay_config(dir, &replay, "*.jpg", false)
}

/// Two of three frames agreeing, as a shelf camera that reacts faster would configure
/// it. What the counter sees of a person (a product or two left visible, parts of the
/// person read as boxes) varies from frame to frame, so a five-frame window may find no
/// majority and hold a count by luck, and the occluder tests would prove nothing.
fn fast_window(config: PathBuf) -> PathBuf {
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("window-frames = 5", "window-frames = 3");
    std::fs::write(&config, text).unwrap();
    config
}

/// Runs the daemon over a non-looping replay until it exits; a daemon that does not is
/// killed before the test fails, so no stray process outlives the test.
fn run_to_end(config: &Path) -> Vec<Value> {
    let mut child = spawn(config);
    let Some(status) = wait_exit(&mut child, Duration::from_secs(120)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the daemon did not end with its input");
    };
    assert!(status.success(), "{status:?}");
    messages(config.parent().unwrap())
}

#[test]
fn the_default_counter_counts_unseen_products_and_holds_a_count_while_a_person_hides_it() {
    let dir = tempfile::tempdir().unwrap();
    // The window of the test below, where the counter alone drops the count: here the
    // occluder model is what holds it, not a window too slow to agree.
    let msgs = run_to_end(&fast_window(shelf_scene_config(dir.path(), true)));
    // expected.json: top 6 -> 4; bottom 5, held while the person (found by the SSD)
    // hides four of its products, emptied, restocked with 5.
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/shelf-scenes/expected.json")).unwrap(),
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
    let msgs = run_to_end(&fast_window(shelf_scene_config(dir.path(), false)));
    let bottom = label_counts(&msgs, "bottom-shelf", "product");
    assert_eq!(bottom.len(), 5, "{bottom:?}");
    assert_eq!((bottom[0], bottom[2], bottom[3], bottom[4]), (5, 5, 0, 5));
    // The products left visible, and whatever of the person looks like a box.
    assert!((1..5).contains(&bottom[1]), "{bottom:?}");
    assert_eq!(label_counts(&msgs, "top-shelf", "product"), [6, 4]);
}

#[test]
fn after_a_restart_the_last_counts_are_published_at_once_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    // First run: block A only (top 3, bottom 2).
    let config = scene_config(dir.path(), "00[0-4].jpg", false);
    let mut child = spawn(&config);
    assert!(wait_exit(&mut child, Duration::from_secs(60))
        .unwrap()
        .success());
    let first = messages(dir.path());
    let last_seq = first.last().unwrap()["seq"].as_u64().unwrap();

    // Second run: a frame where nothing is decided yet (one frame is no consensus).
    let config = scene_config(dir.path(), "018.jpg", false);
    let mut child = spawn(&config);
    assert!(wait_exit(&mut child, Duration::from_secs(60))
        .unwrap()
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
    let config = scene_config(dir.path(), "*.jpg", true);
    let mut child = spawn(&config);
    wait_for(dir.path(), |m| m.iter().any(|m| m["type"] == "state"));
    let t = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exits after SIGTERM");
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
    let config = scene_config(dir.path(), "*.jpg", true);
    let mut child = spawn(&config);
    wait_for(dir.path(), |m| m.iter().any(|m| m["type"] == "state"));
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace(
            "min-agreement = 0.6",
            "min-agreement = 0.6\nwindow-frame = 3",
        ),
    )
    .unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    std::thread::sleep(patience(Duration::from_millis(1500)));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon must keep running"
    );
    let before = messages(dir.path()).len();
    wait_for(dir.path(), |m| m.len() > before + 1);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(10))
        .unwrap()
        .success());
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        stderr.push_str(&line.unwrap());
        stderr.push('\n');
    }
    assert!(stderr.contains("counting.window-frame"), "{stderr}");
    assert!(stderr.contains("keeping the running one"), "{stderr}");
}

#[test]
fn run_with_an_unknown_config_key_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = scene_config(dir.path(), "*.jpg", false);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[state]", "[state]\ndirectory = \"x\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shelfwatch"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
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
    let out = Command::new(env!("CARGO_BIN_EXE_shelfwatch"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("shelfwatch.toml") && stderr.contains("no cameras"),
        "{stderr}"
    );
}
