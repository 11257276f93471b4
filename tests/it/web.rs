//! The web page, its API and `/metrics` (`[http]`), against the release binary: pages
//! driven in a real headless chromium, metrics read by a Prometheus parser, and the
//! server's refusals (credentials, sizes, a flood). Everything on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::browser::{agent, Browser};
use crate::util::{
    self, fixture, free_port, jsonl, patience, root, Broker, Camera, Config, Daemon, Sink, Zone,
    SHELFWATCH,
};

/// The fixture frame the web tests show: 640x480, six products on the top shelf board
/// and five on the bottom one (tests/fixtures/shelf-scenes/frames/000.txt).
fn frame() -> PathBuf {
    fixture("shelf-scenes/frames/000.jpg")
}

/// Products whose centre lies in the rectangle (normalised x1, y1, x2, y2) of the
/// fixture frame, from its label file.
fn products_in(x1: f64, y1: f64, x2: f64, y2: f64) -> u64 {
    let labels = std::fs::read_to_string(fixture("shelf-scenes/frames/000.txt")).unwrap();
    labels
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap())
                .collect();
            (v.len() == 4).then(|| (v[0], v[1]))
        })
        .filter(|(x, y)| (x1..x2).contains(x) && (y1..y2).contains(y))
        .count() as u64
}

/// A daemon counting the fixture frame, with `[http]` on a free loopback port.
struct WebDaemon {
    dir: tempfile::TempDir,
    config: PathBuf,
    base: String,
    daemon: Daemon,
}

fn web_config(port: u16) -> Config {
    web_config_at(port, 4.0)
}

fn web_config_at(port: u16, fps: f64) -> Config {
    Config::new("web-test")
        .window_frames(3)
        .min_agreement(0.6)
        .camera(Camera::files(&frame(), fps).zone(Zone::bottom_shelf()))
        .sink(Sink::jsonl("out.jsonl"))
        .set("http.listen", format!("127.0.0.1:{port}"))
}

impl WebDaemon {
    fn start(config: impl FnOnce(u16) -> Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = config(port).write(dir.path());
        let daemon = Daemon::start(&config);
        let w = WebDaemon {
            dir,
            config,
            base: format!("http://127.0.0.1:{port}"),
            daemon,
        };
        w.wait_for_frame();
        w
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Until the camera has a counted frame to show.
    fn wait_for_frame(&self) {
        let http = agent();
        let t = Instant::now();
        loop {
            let shown = http
                .get(self.url("/api/cameras"))
                .call()
                .ok()
                .filter(|r| r.status() == 200)
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| !v["cameras"][0]["frame"].is_null());
            if shown {
                return;
            }
            assert!(
                t.elapsed() < patience(Duration::from_secs(60)),
                "no frame on the web page; daemon log:\n{}",
                self.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn messages(&self) -> Vec<Value> {
        jsonl(&self.dir.path().join("out.jsonl"))
    }

    /// The last published total of `zone`.
    fn published_total(&self, zone: &str) -> Option<u64> {
        self.messages()
            .iter()
            .rev()
            .find(|m| m["type"] == "state" && m["zone"] == zone)
            .and_then(|m| m["total"].as_u64())
    }
}

fn get_json(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

/// Saves a screenshot for docs/web.md under target/web-screenshots/.
fn keep_screenshot(name: &str, png: &[u8]) {
    let dir = root().join("target/web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Draws a polygon in the zone editor: "New zone", a click at each corner (normalised
/// on the frame), "Finish".
fn draw_zone(b: &Browser, corners: &[(f64, f64)]) {
    b.find("#new-zone").click();
    let (x, y, w, h) = b.rect("#editor");
    let points: Vec<(f64, f64)> = corners
        .iter()
        .map(|(u, v)| (x + u * w, y + v * h))
        .collect();
    b.click_at(&points);
    b.find("#finish-zone").click();
}

/// Pearson correlation of two equally long sequences.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt())
}

/// The screenshot shows the camera's frame where the page put the image: its pixels
/// follow the fixture frame's (under the zones' translucent fill), a blank or wrong
/// image would not.
fn assert_shows_the_frame(png: &[u8], rect: (f64, f64, f64, f64)) {
    let shot = image::load_from_memory(png).unwrap().to_luma8();
    let (x, y, w, h) = rect;
    let frame = image::open(frame()).unwrap().to_luma8();
    let frame = image::imageops::resize(
        &frame,
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for j in (4..h as u32 - 4).step_by(3) {
        for i in (4..w as u32 - 4).step_by(3) {
            a.push(f64::from(shot.get_pixel(x as u32 + i, y as u32 + j)[0]));
            b.push(f64::from(frame.get_pixel(i, j)[0]));
        }
    }
    let r = correlation(&a, &b);
    assert!(
        r > 0.6,
        "the screenshot's image area does not show the frame (correlation {r:.2})"
    );
}

/// The screenshot has the zone's outline where the page drew it: along the top edge of
/// the polygon's box, pixels of its stroke colour.
fn assert_shows_the_zone(b: &Browser, png: &[u8], zone: &str) {
    let v = b.script(
        "const p = document.querySelector(`polygon.zone[data-zone=\"${arguments[0]}\"]`); \
         const r = p.getBoundingClientRect(); \
         const c = getComputedStyle(p).stroke.match(/\\d+/g).map(Number); \
         return [r.x, r.y, r.width, r.height, c[0], c[1], c[2]];",
        vec![json!(zone)],
    );
    let n = |i: usize| v[i].as_f64().unwrap();
    let (x, y, w) = (n(0), n(1), n(2));
    let stroke = [n(4), n(5), n(6)];
    let shot = image::load_from_memory(png).unwrap().to_rgb8();
    let columns: Vec<u32> = (1..20)
        .map(|k| (x + w * f64::from(k) / 20.0) as u32)
        .collect();
    let hits = columns
        .iter()
        .filter(|&&cx| {
            (y as i64 - 3..=y as i64 + 3).any(|cy| {
                let p = shot.get_pixel(cx, cy.max(0) as u32);
                let d: f64 = (0..3).map(|i| (f64::from(p[i]) - stroke[i]).abs()).sum();
                d < 90.0
            })
        })
        .count();
    assert!(
        hits >= columns.len() * 3 / 4,
        "zone {zone}'s outline (rgb {stroke:?}) is on {hits} of {} columns of its top edge",
        columns.len()
    );
}

#[test]
fn a_zone_drawn_in_the_browser_is_checked_saved_reloaded_and_counted_on_the_live_view() {
    let web = WebDaemon::start(web_config);
    let original = std::fs::read(&web.config).unwrap();
    let b = Browser::start();
    b.goto(&web.url("/zones"));
    b.wait(
        "the frame in the editor",
        "document.querySelector('#editor-frame') && document.querySelector('#editor-frame').naturalWidth > 0",
        Duration::from_secs(30),
    );
    // The top shelf board, drawn, first under a name check-config refuses.
    let top = [(0.02, 0.02), (0.98, 0.02), (0.98, 0.48), (0.02, 0.48)];
    draw_zone(&b, &top);
    let name = b.find("#zone-name");
    name.clear();
    name.type_text("top shelf");
    b.find("#save").click();
    b.wait(
        "the refusal",
        "document.querySelector('#save-result').classList.contains('error')",
        Duration::from_secs(20),
    );
    let refusal = b.find("#save-result").text();
    assert!(
        refusal.contains("cameras[0].zones[1].name"),
        "the refusal names the key: {refusal}"
    );
    assert_eq!(
        std::fs::read(&web.config).unwrap(),
        original,
        "a refused edit writes nothing"
    );

    name.clear();
    name.type_text("drawn");
    b.find("#save").click();
    b.wait(
        "the save",
        "document.querySelector('#save-result').classList.contains('ok')",
        Duration::from_secs(20),
    );
    let saved = std::fs::read_to_string(&web.config).unwrap();
    assert!(saved.contains("name = \"drawn\""), "{saved}");
    assert!(
        saved.contains("name = \"bottom-shelf\""),
        "the other zone stays: {saved}"
    );
    let mut backup = web.config.clone().into_os_string();
    backup.push(".bak");
    assert_eq!(
        std::fs::read(backup).unwrap(),
        original,
        "the previous config is kept"
    );
    keep_screenshot("zones", &b.screenshot());

    // The daemon reloaded it (as SIGHUP does) and counts the new zone: the live view
    // shows what was published for it.
    b.goto(&web.url("/"));
    b.wait(
        "a count for the drawn zone",
        "(() => { const c = document.querySelector('tr[data-zone=\"drawn\"] td.total'); \
         return c && /^\\d+$/.test(c.textContent.trim()); })()",
        Duration::from_secs(60),
    );
    let shown: u64 = b
        .find("tr[data-zone=\"drawn\"] td.total")
        .text()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(Some(shown), web.published_total("drawn"));
    assert_eq!(
        shown,
        products_in(0.02, 0.02, 0.98, 0.48),
        "the six products of the top board"
    );
    assert!(web.daemon.log().contains("configuration reloaded"));

    b.wait(
        "the frame on the live view",
        "document.querySelector('img.frame') && document.querySelector('img.frame').naturalWidth > 0",
        Duration::from_secs(20),
    );
    let png = b.screenshot();
    keep_screenshot("live", &png);
    assert_shows_the_frame(&png, b.rect("img.frame"));
    // rect() scrolled the image into view: take the shot again where it now is.
    let png = b.screenshot();
    assert_shows_the_frame(&png, b.rect("img.frame"));
    assert_shows_the_zone(&b, &png, "drawn");
    assert_shows_the_zone(&b, &png, "bottom-shelf");

    move_a_corner_and_delete_a_zone(&web, &b);
}

/// Back in the editor: a corner of `drawn` dragged up, `bottom-shelf` deleted, saved;
/// the config follows.
fn move_a_corner_and_delete_a_zone(web: &WebDaemon, b: &Browser) {
    b.goto(&web.url("/zones"));
    b.wait(
        "the frame in the editor",
        "document.querySelector('#editor-frame') && document.querySelector('#editor-frame').naturalWidth > 0",
        Duration::from_secs(30),
    );
    b.find("li[data-zone=\"drawn\"]").click();
    let (x, y, w, h) = b.rect("#editor");
    b.drag((x + 0.98 * w, y + 0.48 * h), (x + 0.98 * w, y + 0.40 * h));
    b.find("li[data-zone=\"bottom-shelf\"]").click();
    b.find("#delete-zone").click();
    b.find("#save").click();
    b.wait(
        "the second save",
        "document.querySelector('#save-result').classList.contains('ok')",
        Duration::from_secs(20),
    );
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(&web.config).unwrap()).unwrap();
    let zones = config["cameras"][0]["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 1, "bottom-shelf deleted: {zones:?}");
    assert_eq!(zones[0]["name"].as_str(), Some("drawn"));
    let corner = zones[0]["polygon"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_float().unwrap(), p[1].as_float().unwrap()))
        .find(|(x, y)| *x > 0.9 && *y > 0.3)
        .unwrap_or_else(|| panic!("no lower right corner: {zones:?}"));
    assert!(
        (corner.1 - 0.40).abs() < 0.01,
        "the corner moved to y 0.40: {corner:?}"
    );
}

#[test]
fn a_product_enrolled_from_a_box_on_the_live_frame_is_then_identified_and_health_is_shown() {
    let web = WebDaemon::start(|port| web_config(port).gallery("gallery"));
    let b = Browser::start();
    b.goto(&web.url("/identify"));
    b.wait(
        "the frame",
        "document.querySelector('#identify-frame') && document.querySelector('#identify-frame').naturalWidth > 0",
        Duration::from_secs(30),
    );
    // The first product of the top board: centre (0.14, 0.35), 0.10 x 0.20 of the frame.
    let (x, y, w, h) = b.rect("#identify-svg");
    b.drag((x + 0.09 * w, y + 0.25 * h), (x + 0.19 * w, y + 0.45 * h));
    b.find("#sku").type_text("SKU-CEREAL");
    b.find("#product-name").type_text("Cereal 500 g");
    b.find("#enrol").click();
    b.wait(
        "the enrolment",
        "document.querySelector('#identify-result').textContent.includes('SKU-CEREAL')",
        Duration::from_secs(60),
    );
    let enrolled = b.find("#identify-result").text();
    assert!(!enrolled.to_lowercase().contains("error"), "{enrolled}");
    assert!(Path::new(&web.dir.path().join("gallery")).is_dir());
    b.find("#identify").click();
    b.wait(
        "the identification",
        "document.querySelector('#identify-result td.similarity')",
        Duration::from_secs(60),
    );
    let answer = b.find("#identify-result").text();
    assert!(
        answer.contains("SKU-CEREAL"),
        "the box just enrolled is that SKU: {answer}"
    );
    let similarity: f64 = b
        .find("#identify-result td.similarity")
        .text()
        .trim()
        .parse()
        .unwrap();
    assert!(similarity > 0.9, "the same crop: {similarity}");
    keep_screenshot("identify", &b.screenshot());
    a_scanner_photo_is_identified_and_a_bomb_refused(&web);
    // The same photo chosen on the page.
    let photo = web.dir.path().join("cereal-photo.png");
    std::fs::write(&photo, first_product_png()).unwrap();
    b.find("#photo").type_text(&photo.display().to_string());
    b.find("#identify-photo").click();
    b.wait(
        "the photo's identification",
        "document.querySelector('#identify-result').textContent.includes('cereal-photo.png')",
        Duration::from_secs(60),
    );
    let answer = b.find("#identify-result").text();
    assert!(answer.contains("Identified as SKU-CEREAL"), "{answer}");

    b.goto(&web.url("/health"));
    b.wait(
        "frames processed on the health page",
        "(() => { const c = document.querySelector('tr[data-camera=\"shelf\"] td.processed'); \
         return c && Number(c.textContent.replace(/[^0-9]/g, '')) > 0; })()",
        Duration::from_secs(30),
    );
    keep_screenshot("health", &b.screenshot());
}

/// `POST /api/identify` with a photo as a scanner sends it: the product just enrolled
/// from the live frame, cut from the fixture frame as a PNG, is that SKU; a
/// decompression bomb is a 422 naming the limit, and the daemon goes on.
fn a_scanner_photo_is_identified_and_a_bomb_refused(web: &WebDaemon) {
    let png = first_product_png();
    let post = |bytes: &[u8], kind: &str| {
        let mut r = agent()
            .post(web.url("/api/identify"))
            .header("Content-Type", kind)
            .send(bytes)
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json::<Value>().unwrap(),
        )
    };
    let (status, answer) = post(&png, "image/png");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["sku"], "SKU-CEREAL", "{answer}");
    let bomb = std::fs::read(fixture("bad/bomb-60000x60000.png")).unwrap();
    let (status, refusal) = post(&bomb, "image/png");
    assert_eq!(status, 422, "{refusal}");
    assert_valid("api-error", &refusal);
    assert!(
        refusal["error"].as_str().unwrap().contains("60000"),
        "{refusal}"
    );
    let (status, _) = get_json(&web.url("/api/state"));
    assert_eq!(status, 200);
}

/// The first product of the fixture frame's top board, cut out as a PNG.
fn first_product_png() -> Vec<u8> {
    let frame = image::open(frame()).unwrap().to_rgb8();
    let (w, h) = frame.dimensions();
    let crop = image::imageops::crop_imm(
        &frame,
        (0.09 * f64::from(w)) as u32,
        (0.25 * f64::from(h)) as u32,
        (0.10 * f64::from(w)) as u32,
        (0.20 * f64::from(h)) as u32,
    )
    .to_image();
    let mut png = std::io::Cursor::new(Vec::new());
    crop.write_to(&mut png, image::ImageFormat::Png).unwrap();
    png.into_inner()
}

/// The daemon's health records in `msgs`, by their uptime.
fn health_records(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m["type"] == "health")
        .cloned()
        .collect()
}

/// A scrape of /metrics, parsed by prometheus-parse.
struct Scrape {
    text: String,
    parsed: prometheus_parse::Scrape,
}

impl Scrape {
    fn of(base: &str) -> Self {
        let mut res = agent().get(format!("{base}/metrics")).call().unwrap();
        assert_eq!(res.status(), 200);
        let kind = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        let text = res.body_mut().read_to_string().unwrap();
        let parsed =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        Scrape { text, parsed }
    }

    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> &prometheus_parse::Sample {
        self.parsed
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match &self.sample(name, labels).value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Until both zones are counted, a corrupt frame was seen and MQTT is connected.
fn wait_until_settled(out: &Path, daemon: &Daemon) {
    let t = Instant::now();
    loop {
        let msgs = jsonl(out);
        let states = ["top-shelf", "bottom-shelf"]
            .iter()
            .all(|z| msgs.iter().any(|m| m["type"] == "state" && m["zone"] == *z));
        let settled = health_records(&msgs).last().is_some_and(|h| {
            h["cameras"][0]["frames_corrupt"].as_u64() > Some(0) && h["mqtt"]["connected"] == true
        });
        if states && settled {
            return;
        }
        assert!(
            t.elapsed() < patience(Duration::from_secs(60)),
            "not settled:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The health records made just before and just after the daemon's uptime `at`.
fn health_around(out: &Path, at: f64) -> (Value, Value) {
    let t = Instant::now();
    loop {
        let records = health_records(&jsonl(out));
        let before = records
            .iter()
            .rev()
            .find(|h| h["uptime_s"].as_f64() < Some(at))
            .cloned();
        let after = records
            .iter()
            .find(|h| h["uptime_s"].as_f64() > Some(at))
            .cloned();
        if let (Some(b), Some(a)) = (before, after) {
            return (b, a);
        }
        assert!(
            t.elapsed() < patience(Duration::from_secs(30)),
            "no health record after the scrape"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `m` lies between the records' `path` values (a JSON pointer).
fn assert_between(what: &str, m: f64, before: &Value, after: &Value, path: &str) {
    let (lo, hi) = (
        before.pointer(path).and_then(Value::as_f64).unwrap(),
        after.pointer(path).and_then(Value::as_f64).unwrap(),
    );
    assert!(
        lo <= m && m <= hi,
        "{what} = {m}, health records {lo}..{hi}"
    );
}

/// The inference histogram: cumulative, one observation per processed frame.
fn assert_histogram(scrape: &Scrape, before: &Value, after: &Value) {
    let model = [("model", "shelf_counter")];
    let prometheus_parse::Value::Histogram(buckets) =
        &scrape.sample("shelfwatch_inference_seconds", &model).value
    else {
        panic!(
            "shelfwatch_inference_seconds is not a histogram\n{}",
            scrape.text
        )
    };
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative buckets"
    );
    let count = scrape.value("shelfwatch_inference_seconds_count", &model);
    assert_eq!(buckets.last().unwrap().count, count, "+Inf holds every run");
    // A model run is counted just before its frame is: at most one run ahead.
    let processed = |h: &Value| h["cameras"][0]["frames_processed"].as_f64().unwrap();
    let (lo, hi) = (processed(before), processed(after) + 1.0);
    assert!(
        lo <= count && count <= hi,
        "{count} runs, frames processed {lo}..{hi}"
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_agree_with_the_health_records() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    std::fs::copy(frame(), frames.join("000.jpg")).unwrap();
    // A frame cut short: skipped and counted at every pass.
    let jpeg = std::fs::read(frame()).unwrap();
    std::fs::write(frames.join("001.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    let broker = Broker::anonymous(dir.path());
    let port = free_port();
    let config = Config::new("metrics-test")
        .window_frames(3)
        .min_agreement(0.6)
        .health_interval_s(1)
        .camera(
            Camera::files(&frames, 4.0)
                .zone(Zone::top_shelf())
                .zone(Zone::bottom_shelf()),
        )
        .sink(Sink::jsonl("out.jsonl"))
        .sink(Sink::mqtt(&broker.address()))
        .set("http.listen", format!("127.0.0.1:{port}"))
        .write(dir.path());
    let daemon = Daemon::start(&config);
    let out = dir.path().join("out.jsonl");
    wait_until_settled(&out, &daemon);

    let scrape = Scrape::of(&format!("http://127.0.0.1:{port}"));
    // The health records made just before and just after the scrape bound every counter.
    let (before, after) = health_around(&out, scrape.value("shelfwatch_uptime_seconds", &[]));
    let cam = [("camera", "shelf")];
    for (metric, field) in [
        ("shelfwatch_frames_captured_total", "frames_captured"),
        ("shelfwatch_frames_processed_total", "frames_processed"),
        ("shelfwatch_frames_corrupt_total", "frames_corrupt"),
        ("shelfwatch_frames_dropped_total", "frames_dropped"),
        ("shelfwatch_camera_reconnects_total", "reconnects"),
    ] {
        let path = format!("/cameras/0/{field}");
        assert_between(metric, scrape.value(metric, &cam), &before, &after, &path);
    }
    let reconnects = scrape.value("shelfwatch_mqtt_reconnects_total", &[]);
    assert_between(
        "reconnects",
        reconnects,
        &before,
        &after,
        "/mqtt/connect_attempts",
    );
    assert!(scrape.value("shelfwatch_frames_corrupt_total", &cam) > 0.0);
    assert_eq!(scrape.value("shelfwatch_camera_online", &cam), 1.0);
    assert_eq!(scrape.value("shelfwatch_mqtt_connected", &[]), 1.0);
    assert!(scrape.value("process_resident_memory_bytes", &[]) > 16e6);
    assert_histogram(&scrape, &before, &after);

    // Counts and events are what was published.
    let msgs = jsonl(&out);
    for zone in ["top-shelf", "bottom-shelf"] {
        let published = msgs
            .iter()
            .rev()
            .find(|m| m["type"] == "state" && m["zone"] == zone)
            .unwrap();
        assert_eq!(
            scrape.value(
                "shelfwatch_zone_products",
                &[("zone", zone), ("label", "product")]
            ),
            published["counts"]["product"].as_f64().unwrap()
        );
        let status = published["status"].as_str().unwrap();
        assert_eq!(
            scrape.value(
                "shelfwatch_zone_status",
                &[("zone", zone), ("status", status)]
            ),
            1.0
        );
    }
    let online = msgs
        .iter()
        .filter(|m| m["event"] == "camera-online")
        .count();
    assert_eq!(
        scrape.value("shelfwatch_events_total", &[("type", "camera-online")]),
        online as f64
    );
    for family in [
        "shelfwatch_frames_processed_total",
        "shelfwatch_inference_seconds",
        "shelfwatch_zone_products",
    ] {
        assert!(scrape.parsed.docs.contains_key(family), "{family} has HELP");
    }
}

/// Resolves the schemas' references to each other from docs/schemas/.
struct DocsSchemas;

impl jsonschema::Retrieve for DocsSchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let name = uri
            .as_str()
            .strip_prefix("https://shelfwatch.invalid/schemas/")
            .ok_or("not one of ours")?;
        let text = std::fs::read_to_string(root().join("docs/schemas").join(name))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// `v` is valid against docs/schemas/`name`.schema.json.
fn assert_valid(name: &str, v: &Value) {
    let path = root().join(format!("docs/schemas/{name}.schema.json"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::options()
        .with_retriever(DocsSchemas)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {v}\n{errors:#?}");
}

/// A raw request, for what an HTTP client library would not send: a foreign Host, a
/// body that outgrows its limit. The status code of the answer.
fn raw_status(port: u16, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[test]
fn without_a_token_only_loopback_may_listen_and_only_loopback_host_names_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = web_config(port)
        .set("http.listen", format!("0.0.0.0:{port}"))
        .write(dir.path());
    let out = util::output(
        std::process::Command::new(SHELFWATCH)
            .args(["run", "--config"])
            .arg(&config),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("http.token-file"),
        "the key is named: {stderr}"
    );
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let web = WebDaemon::start(web_config);
    let port: u16 = web.base.rsplit(':').next().unwrap().parse().unwrap();
    // A page elsewhere, its DNS name rebound to 127.0.0.1, reaches the port with its own
    // Host: refused.
    assert_eq!(
        raw_status(
            port,
            b"GET /api/state HTTP/1.1\r\nHost: shop.example:8480\r\nConnection: close\r\n\r\n"
        ),
        403
    );
    assert_eq!(
        raw_status(
            port,
            b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ),
        200
    );

    // What the API answers is what docs/schemas says, once the zone is counted.
    let t = Instant::now();
    while web.published_total("bottom-shelf").is_none() {
        assert!(
            t.elapsed() < patience(Duration::from_secs(60)),
            "{}",
            web.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (path, schema) in [
        ("/api/cameras", "api-cameras"),
        ("/api/state", "api-state"),
        ("/api/health", "api-health"),
        ("/api/cameras/nowhere/frame.jpg", "api-error"),
    ] {
        let (_, v) = get_json(&web.url(path));
        assert_valid(schema, &v);
    }
    let (_, state) = get_json(&web.url("/api/state"));
    assert_eq!(
        state["cameras"][0]["zones"][0]["state"]["total"].as_u64(),
        web.published_total("bottom-shelf")
    );
}

#[test]
fn with_a_token_every_route_needs_it_and_wrong_credentials_get_401() {
    use std::os::unix::fs::PermissionsExt;
    let token = "s3cret-token-for-the-shelf-1";
    let run = |mode: u32| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("http-token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, file)
    };
    // A token others can read is refused, naming the key.
    let (dir, file) = run(0o644);
    let config = web_config(free_port())
        .set("http.token-file", file.display().to_string())
        .write(dir.path());
    let out = util::output(
        std::process::Command::new(SHELFWATCH)
            .args(["check-config"])
            .arg(&config),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.token-file"));

    let (_keep, file) = run(0o600);
    let web = WebDaemon::start_with_token(&file);
    let http = agent();
    for path in [
        "/",
        "/zones",
        "/metrics",
        "/api/state",
        "/api/cameras/shelf/frame.jpg",
    ] {
        let r = http.get(web.url(path)).call().unwrap();
        assert_eq!(r.status(), 401, "{path} without credentials");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        let r = http
            .get(web.url(path))
            .header("Authorization", "Bearer s3cret-token-for-the-shelf-2")
            .call()
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
        let r = http
            .get(web.url(path))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the token");
    }
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{token}"));
    let r = http
        .get(web.url("/api/state"))
        .header("Authorization", format!("Basic {basic}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200, "the token as a browser's Basic password");
}

impl WebDaemon {
    /// The daemon with `http.token-file`; waits for a frame with the token.
    fn start_with_token(file: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = web_config(port)
            .set("http.token-file", file.display().to_string())
            .write(dir.path());
        let daemon = Daemon::start(&config);
        let base = format!("http://127.0.0.1:{port}");
        let token = std::fs::read_to_string(file).unwrap();
        let t = Instant::now();
        loop {
            let ok = agent()
                .get(format!("{base}/api/cameras"))
                .header("Authorization", format!("Bearer {}", token.trim()))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| !v["cameras"][0]["frame"].is_null());
            if ok {
                break;
            }
            assert!(
                t.elapsed() < patience(Duration::from_secs(60)),
                "{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        WebDaemon {
            dir,
            config,
            base,
            daemon,
        }
    }
}

#[test]
fn an_oversized_body_is_refused_and_a_stale_or_invalid_edit_changes_nothing() {
    let web = WebDaemon::start(|port| web_config(port).set("http.max-body-bytes", 2048));
    let port: u16 = web.base.rsplit(':').next().unwrap().parse().unwrap();
    let original = std::fs::read(&web.config).unwrap();
    let big = format!(
        "{{\"version\":\"x\",\"zones\":[],\"pad\":\"{}\"}}",
        "x".repeat(4096)
    );
    let request = format!(
        "PUT /api/cameras/shelf/zones HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    assert_eq!(raw_status(port, request.as_bytes()), 413);

    let (_, cams) = get_json(&web.url("/api/cameras"));
    let version = cams["config_version"].as_str().unwrap().to_owned();
    let put = |body: Value| {
        let mut r = agent()
            .put(web.url("/api/cameras/shelf/zones"))
            .send_json(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"));
        (status, v)
    };
    let zone = json!({"name": "top", "polygon": [[0, 0], [1, 0], [1, 0.5]], "min": 5, "max": 2});
    let (status, body) = put(json!({"version": version, "zones": [zone]}));
    assert_eq!(status, 422, "{body}");
    assert_valid("api-error", &body);
    assert_eq!(
        body["problems"][0]["key"], "cameras[0].zones[0].min",
        "{body}"
    );
    assert!(body["problems"][0]["text"]
        .as_str()
        .unwrap()
        .contains("min 5 is above max 2"));
    let (status, body) = put(json!({"version": "0".repeat(64), "zones": []}));
    assert_eq!(status, 409, "an edit made on an older file: {body}");
    assert_eq!(std::fs::read(&web.config).unwrap(), original);
    let (status, _) = put(json!({"version": version, "zones": [], "extra": 1}));
    assert_eq!(status, 422, "unknown fields are refused");
}

/// Frames the daemon processed, from its health API.
fn processed(base: &str) -> u64 {
    let (_, v) = get_json(&format!("{base}/api/health"));
    v["health"]["cameras"][0]["frames_processed"]
        .as_u64()
        .unwrap()
}

/// Open file descriptors of process `pid`: what its accepted connections cost.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_flood_of_requests_and_idle_connections_leaves_the_server_answering_and_counting_going_on() {
    let web = WebDaemon::start(|port| web_config_at(port, 8.0).set("http.max-connections", 8));
    let port: u16 = web.base.rsplit(':').next().unwrap().parse().unwrap();
    let measure = || {
        let (p0, t0) = (processed(&web.base), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        (processed(&web.base) - p0) as f64 / t0.elapsed().as_secs_f64()
    };
    let calm = measure();

    // Clients hammering what the pages ask for, as fast as they are answered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let stop = stop.clone();
            let base = web.base.clone();
            std::thread::spawn(move || {
                let http = agent();
                let paths = [
                    "/api/state",
                    "/metrics",
                    "/api/cameras/shelf/frame.jpg",
                    "/api/cameras",
                    "/",
                    "/api/health",
                ];
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut r = http
                        .get(format!("{base}{}", paths[i % paths.len()]))
                        .call()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.body_mut()
                        .with_config()
                        .limit(16 << 20)
                        .read_to_vec()
                        .unwrap();
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let t = Instant::now();
    let during = measure();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let rate = answered as f64 / t.elapsed().as_secs_f64();
    eprintln!("frames/s: {calm:.1} calm, {during:.1} during {rate:.0} requests/s");
    assert!(during > 0.0, "counting stopped during the flood");

    // Idle connections far beyond the cap: the daemon accepts no more than the cap (the
    // rest wait in the kernel's backlog, costing it nothing), and answers once they go.
    let pid = web.daemon.pid();
    let before = open_fds(pid);
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = open_fds(pid);
    eprintln!(
        "descriptors: {before} before, {held} with {} idle connections",
        idle.len()
    );
    assert!(
        held <= before + 8 + 4,
        "{held} descriptors open, {before} before: the cap of 8 did not hold"
    );
    drop(idle);
    let (status, _) = get_json(&web.url("/api/state"));
    assert_eq!(status, 200, "the server answers after the flood");
    assert!(web.daemon.log().lines().all(|l| !l.contains("panicked")));
}
