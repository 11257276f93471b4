//! Publishing: versioned JSON messages (zone state, events, health) to sinks.
//!
//! Every message carries the payload schema version, the device id, an RFC 3339
//! timestamp and a per-device sequence number that only ever rises (persisted across
//! restarts), so subscribers can detect gaps and drop duplicates.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::counting::{EventKind, ZoneState};

pub mod mqtt;
pub mod spool;

/// Version of the JSON payloads; bumped on any incompatible change.
pub const SCHEMA: u32 = 1;

/// `[[sinks]]`: where messages go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SinkSettings {
    /// JSON lines on standard output.
    Stdout(StdoutSettings),
    /// An append-only JSON lines file.
    Jsonl(JsonlSettings),
    /// An MQTT broker (or the embedded one), through a durable spool.
    Mqtt(Box<mqtt::MqttSettings>),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StdoutSettings {
    /// Leave health records out (they are noisy on a terminal).
    #[serde(default)]
    pub skip_health: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JsonlSettings {
    /// The file; relative to the config file. Created if missing, never truncated.
    pub path: PathBuf,
}

/// One published message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    pub schema: u32,
    pub device: String,
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    #[serde(flatten)]
    pub body: Body,
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Body {
    /// The stable counts of one zone (retained on MQTT).
    State {
        camera: String,
        zone: String,
        #[serde(flatten)]
        state: ZoneState,
    },
    /// A transition worth telling once.
    Event {
        camera: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        zone: Option<String>,
        #[serde(flatten)]
        event: EventKind,
    },
    /// Periodic pipeline health.
    Health(Health),
}

/// Pipeline health, per camera.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub uptime_s: f64,
    pub cameras: Vec<CameraHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttHealth>,
}

/// The MQTT link and its spool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MqttHealth {
    pub connected: bool,
    /// Messages waiting for the broker's acknowledgement.
    pub spooled: u64,
    /// Their size in the spool (what `spool-max-bytes` bounds).
    pub spooled_bytes: u64,
    /// Messages dropped because the spool reached its size limit, since the spool was
    /// created (kept in the spool across restarts, each drop counted once).
    pub dropped: u64,
    /// Spool records found damaged (torn by a power cut, corrupted bytes) and skipped
    /// since the spool was created; every other record was replayed.
    pub spool_damaged: u64,
    pub connect_attempts: u64,
    /// False while the spool cannot write to disk (full, failing): messages are still
    /// delivered from memory, but a restart would lose the unacknowledged ones.
    pub spool_on_disk: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CameraHealth {
    pub camera: String,
    pub online: bool,
    /// Frames processed per second over the last interval.
    pub fps: f64,
    pub inference_ms_p50: f64,
    pub inference_ms_p99: f64,
    pub frames_captured: u64,
    pub frames_processed: u64,
    /// Frames replaced before inference took them (the camera outpaced the model).
    pub frames_dropped: u64,
    pub frames_corrupt: u64,
    pub reconnects: u64,
    /// With `[identify]`: product crops embedded, and those left for a later frame by the
    /// per-frame budget (a steady rise means the budget is too small for the shelf).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub products_embedded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embeddings_deferred: Option<u64>,
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Errors of a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("stdout: {0}")]
    Stdout(io::Error),
    /// An MQTT sink could not be opened.
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
}

/// A destination for messages. Called from the publisher thread only.
pub trait Sink: Send {
    fn name(&self) -> String;
    fn publish(&mut self, msg: &Envelope, json: &str) -> Result<(), SinkError>;
    /// Makes what was published durable (end of a batch, shutdown).
    fn flush(&mut self) -> Result<(), SinkError>;
    /// An annotated JPEG of a camera, taken on request; sinks without a use for it
    /// ignore it.
    fn snapshot(&mut self, _camera: &str, _jpeg: &[u8]) {}
}

/// JSON lines on stdout.
pub struct StdoutSink {
    settings: StdoutSettings,
}

impl StdoutSink {
    pub fn new(settings: StdoutSettings) -> Self {
        Self { settings }
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> String {
        "stdout".into()
    }

    fn publish(&mut self, msg: &Envelope, json: &str) -> Result<(), SinkError> {
        if self.settings.skip_health && matches!(msg.body, Body::Health(_)) {
            return Ok(());
        }
        let mut out = io::stdout().lock();
        writeln!(out, "{json}").map_err(SinkError::Stdout)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        io::stdout().flush().map_err(SinkError::Stdout)
    }
}

/// An append-only JSON lines file, synced to disk at the end of each batch.
pub struct JsonlSink {
    path: PathBuf,
    file: File,
}

impl JsonlSink {
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let io_err = |error| SinkError::Io {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err)?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }
}

impl Sink for JsonlSink {
    fn name(&self) -> String {
        format!("jsonl {}", self.path.display())
    }

    fn publish(&mut self, _msg: &Envelope, json: &str) -> Result<(), SinkError> {
        // One write per line: with O_APPEND a line is never interleaved or torn by
        // another writer, and a crash leaves at worst a missing last line.
        let mut line = String::with_capacity(json.len() + 1);
        line.push_str(json);
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|error| SinkError::Io {
                path: self.path.clone(),
                error,
            })
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.file.sync_data().map_err(|error| SinkError::Io {
            path: self.path.clone(),
            error,
        })
    }
}

/// Builds the sinks of `[[sinks]]`, in order; `resolve` makes config-relative paths
/// usable. MQTT sinks start what they run beside the publisher thread (see
/// [`mqtt::Background::open`]), returned for the daemon's control plane and shutdown.
pub fn open_sinks(
    settings: &[SinkSettings],
    resolve: &dyn Fn(&Path) -> PathBuf,
    wiring: &mqtt::Wiring<'_>,
) -> Result<(Vec<Box<dyn Sink>>, mqtt::Background), SinkError> {
    let mut background = mqtt::Background::default();
    let sinks = settings
        .iter()
        .map(|s| open_sink(s, resolve, wiring, &mut background))
        .collect::<Result<_, _>>()?;
    Ok((sinks, background))
}

/// Builds one sink; an MQTT sink adds what it runs to `background`.
pub fn open_sink(
    s: &SinkSettings,
    resolve: &dyn Fn(&Path) -> PathBuf,
    wiring: &mqtt::Wiring<'_>,
    background: &mut mqtt::Background,
) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match s {
        SinkSettings::Stdout(s) => Box::new(StdoutSink::new(s.clone())),
        SinkSettings::Jsonl(j) => Box::new(JsonlSink::open(&resolve(&j.path))?),
        SinkSettings::Mqtt(m) => Box::new(background.open(m, wiring, resolve)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting::StockStatus;

    fn envelope(body: Body) -> Envelope {
        Envelope {
            schema: SCHEMA,
            device: "dev-1".into(),
            seq: 7,
            ts: rfc3339(SystemTime::UNIX_EPOCH),
            body,
        }
    }

    #[test]
    fn a_state_message_is_flat_json_with_schema_seq_and_counts() {
        let msg = envelope(Body::State {
            camera: "cam".into(),
            zone: "top".into(),
            state: ZoneState {
                counts: [("Bottle".to_string(), 3)].into(),
                total: 3,
                status: StockStatus::Ok,
            },
        });
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "schema": 1, "device": "dev-1", "seq": 7, "ts": "1970-01-01T00:00:00.000Z",
                "type": "state", "camera": "cam", "zone": "top",
                "counts": {"Bottle": 3}, "total": 3, "status": "ok"
            })
        );
    }

    #[test]
    fn an_event_message_names_its_kind_and_fields() {
        let msg = envelope(Body::Event {
            camera: "cam".into(),
            zone: Some("top".into()),
            event: EventKind::CountChanged {
                label: "Bottle".into(),
                from: 3,
                to: 2,
            },
        });
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["event"], "count-changed");
        assert_eq!((v["from"].as_u64(), v["to"].as_u64()), (Some(3), Some(2)));
    }

    #[test]
    fn the_jsonl_sink_appends_and_never_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.jsonl");
        for run in 0..2 {
            let mut s = JsonlSink::open(&path).unwrap();
            s.publish(
                &envelope(Body::Health(Health {
                    uptime_s: run as f64,
                    cameras: vec![],
                    mqtt: None,
                })),
                &format!("{{\"run\":{run}}}"),
            )
            .unwrap();
            s.flush().unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"run\":0}\n{\"run\":1}\n"
        );
    }
}
