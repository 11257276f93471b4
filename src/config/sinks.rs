//! `[[sinks]]`: where messages go. Each kind's settings type lives with its sink in
//! `crate::publish`; the MQTT sink's checks are in `mqtt.rs` next to this file.

use super::{LoadedConfig, Problems};
use crate::publish::{SinkSettings, StdoutSettings};

pub(super) fn default_sinks() -> Vec<SinkSettings> {
    vec![SinkSettings::Stdout(StdoutSettings::default())]
}

/// Every sink under `key` (`sinks`); `loaded` resolves the files they name.
pub(crate) fn validate_sinks(
    sinks: &[SinkSettings],
    key: &str,
    loaded: &LoadedConfig,
    problems: &mut Problems,
) {
    if sinks.is_empty() {
        problems.push(key, "configure at least one sink");
    }
    for (i, sink) in sinks.iter().enumerate() {
        match sink {
            SinkSettings::Mqtt(m) => m.validate(&format!("{key}[{i}]"), loaded, problems),
            // Nothing here can be wrong once parsed: a jsonl file is created at start.
            SinkSettings::Stdout(_) | SinkSettings::Jsonl(_) => {}
        }
    }
}
