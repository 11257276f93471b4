//! Prometheus `/metrics` in the text exposition format (version 0.0.4), and the latency
//! histogram the workers record into. Names follow Prometheus' conventions: a
//! `shelfwatch_` prefix, base units (seconds, bytes), `_total` on counters; the process
//! metrics use the standard `process_` names. docs/web.md lists them all.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Observation;
use crate::publish::CameraHealth;

/// Upper bounds (seconds) of the inference histogram's buckets: from a fast model on a
/// desktop (a few ms) to a large frame tiled on a Pi 4 under load (seconds).
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// A latency histogram written by one thread and read by the scrape: atomics, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; summed at read).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// The sum in microseconds: an integer keeps the addition atomic.
    sum_us: AtomicU64,
}

/// A histogram as read, cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or below each bound of [`BUCKETS`].
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add((seconds * 1e6).round() as u64, Ordering::Relaxed);
        // Last: a scrape that sees the count sees the bucket too (or one bucket ahead
        // of the count at worst, never a count no bucket explains).
        self.count.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.count.load(Ordering::Acquire);
        let mut running = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running.min(count)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count,
            sum_s: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A label value escaped as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes families: HELP and TYPE once, then the samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The resident set size of this process in bytes, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant; no pointers are involved.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The whole exposition.
pub fn render(o: &Observation, board: &super::board::Board) -> String {
    let mut out = Out(String::with_capacity(8 << 10));
    let h = &o.health;
    type Figure = fn(&CameraHealth) -> f64;
    let per_camera: [(&str, &str, &str, Figure); 7] = [
        (
            "shelfwatch_frames_captured_total",
            "counter",
            "Frames delivered by the camera.",
            |c| c.frames_captured as f64,
        ),
        (
            "shelfwatch_frames_processed_total",
            "counter",
            "Frames run through the model and the zone counters.",
            |c| c.frames_processed as f64,
        ),
        (
            "shelfwatch_frames_dropped_total",
            "counter",
            "Frames replaced by a newer one before inference took them.",
            |c| c.frames_dropped as f64,
        ),
        (
            "shelfwatch_frames_corrupt_total",
            "counter",
            "Frames skipped because they could not be decoded.",
            |c| c.frames_corrupt as f64,
        ),
        (
            "shelfwatch_camera_reconnects_total",
            "counter",
            "Times the camera was reopened after a failure.",
            |c| c.reconnects as f64,
        ),
        (
            "shelfwatch_camera_online",
            "gauge",
            "1 while the camera delivers frames.",
            |c| f64::from(u8::from(c.online)),
        ),
        (
            "shelfwatch_frames_per_second",
            "gauge",
            "Frames processed per second over the last few seconds.",
            |c| c.fps,
        ),
    ];
    for (name, kind, help, figure) in per_camera {
        out.family(name, kind, help);
        for c in &h.cameras {
            out.sample(name, &[("camera", &c.camera)], figure(c));
        }
    }
    inference(&mut out, o);
    zones(&mut out, o, board);
    out.family(
        "shelfwatch_events_total",
        "counter",
        "Stock and camera events published since start, by type.",
    );
    for (kind, n) in board.event_counts() {
        out.sample("shelfwatch_events_total", &[("type", &kind)], n as f64);
    }
    if let Some(m) = &h.mqtt {
        mqtt(&mut out, m);
    }
    out.family(
        "shelfwatch_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    out.sample("shelfwatch_uptime_seconds", &[], h.uptime_s);
    if let Some(rss) = resident_bytes() {
        out.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        out.sample("process_resident_memory_bytes", &[], rss as f64);
    }
    out.0
}

fn inference(out: &mut Out, o: &Observation) {
    let name = "shelfwatch_inference_seconds";
    out.family(
        name,
        "histogram",
        "Time of one model run on one frame (all of a frame's zone crops and tiles), by camera and model.",
    );
    for cam in &o.cameras {
        for m in &cam.models {
            let s = &m.histogram;
            let labels = [("camera", cam.id.as_str()), ("model", m.model.as_str())];
            for (bound, n) in BUCKETS.iter().zip(&s.cumulative) {
                let le = bound.to_string();
                out.sample(
                    &format!("{name}_bucket"),
                    &[labels[0], labels[1], ("le", &le)],
                    *n as f64,
                );
            }
            out.sample(
                &format!("{name}_bucket"),
                &[labels[0], labels[1], ("le", "+Inf")],
                s.count as f64,
            );
            out.sample(&format!("{name}_sum"), &labels, s.sum_s);
            out.sample(&format!("{name}_count"), &labels, s.count as f64);
        }
    }
    out.family(
        "shelfwatch_inference_errors_total",
        "counter",
        "Frames skipped because a model failed on them.",
    );
    for cam in &o.cameras {
        out.sample(
            "shelfwatch_inference_errors_total",
            &[("camera", &cam.id)],
            cam.inference_errors as f64,
        );
    }
}

fn zones(out: &mut Out, o: &Observation, board: &super::board::Board) {
    let published = board.zones();
    out.family(
        "shelfwatch_zone_products",
        "gauge",
        "Stable count of a zone, by label (SKU with identification).",
    );
    for cam in &o.cameras {
        for z in &cam.zones {
            if let Some(e) = published.get(&(cam.id.clone(), z.name.clone())) {
                for (label, n) in &e.state.counts {
                    out.sample(
                        "shelfwatch_zone_products",
                        &[("camera", &cam.id), ("zone", &z.name), ("label", label)],
                        f64::from(*n),
                    );
                }
            }
        }
    }
    out.family(
        "shelfwatch_zone_status",
        "gauge",
        "1 for the zone's current stock status, 0 for the others.",
    );
    for cam in &o.cameras {
        for z in &cam.zones {
            let Some(e) = published.get(&(cam.id.clone(), z.name.clone())) else {
                continue;
            };
            let current = serde_json::to_value(e.state.status).unwrap_or_default();
            for status in ["ok", "low-stock", "out-of-stock", "over-stock"] {
                out.sample(
                    "shelfwatch_zone_status",
                    &[("camera", &cam.id), ("zone", &z.name), ("status", status)],
                    f64::from(u8::from(current == status)),
                );
            }
        }
    }
}

fn mqtt(out: &mut Out, m: &crate::publish::MqttHealth) {
    let rows: [(&str, &str, &str, f64); 6] = [
        (
            "shelfwatch_mqtt_connected",
            "gauge",
            "1 while the MQTT client is connected to the broker.",
            f64::from(u8::from(m.connected)),
        ),
        (
            "shelfwatch_mqtt_spool_messages",
            "gauge",
            "Messages waiting for the broker's acknowledgement.",
            m.spooled as f64,
        ),
        (
            "shelfwatch_mqtt_spool_bytes",
            "gauge",
            "Bytes of the messages waiting for the broker's acknowledgement.",
            m.spooled_bytes as f64,
        ),
        (
            "shelfwatch_mqtt_dropped_total",
            "counter",
            "Messages dropped because the spool was full, since it was created.",
            m.dropped as f64,
        ),
        (
            "shelfwatch_mqtt_reconnects_total",
            "counter",
            "Times the broker connection failed or was lost, each followed by a reconnect.",
            m.connect_attempts as f64,
        ),
        (
            "shelfwatch_mqtt_spool_damaged_total",
            "counter",
            "Damaged spool records skipped, since the spool was created.",
            m.spool_damaged as f64,
        ),
    ];
    for (name, kind, help, value) in rows {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket_and_reads_cumulative() {
        let h = Histogram::default();
        for s in [0.004, 0.03, 0.03, 0.7, 100.0] {
            h.observe(s);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.cumulative[0], 1, "0.004 <= 0.005");
        assert_eq!(s.cumulative[3], 3, "two at 0.03 <= 0.05");
        assert_eq!(s.cumulative[7], 4, "0.7 <= 1");
        assert_eq!(*s.cumulative.last().unwrap(), 4, "100 s is only in +Inf");
        assert!((s.sum_s - 100.764).abs() < 1e-6);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_resident_size_is_read_from_proc() {
        let rss = resident_bytes().unwrap();
        assert!(rss > 1 << 20, "a test process holds more than 1 MiB: {rss}");
    }
}
