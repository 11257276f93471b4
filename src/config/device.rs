//! `[device]`: this device as subscribers know it.

use serde::Deserialize;

use super::Problems;

/// This device, as subscribers know it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id in every message (and MQTT topic): letters, digits, `-` and `_`.
    /// Default: the host name.
    #[serde(default = "default_device_id")]
    pub id: String,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            id: default_device_id(),
        }
    }
}

fn default_device_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let id: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "shelfwatch".into()
    } else {
        id
    }
}

impl DeviceConfig {
    pub(crate) fn validate(&self, key: &str, problems: &mut Problems) {
        problems.name(format!("{key}.id"), &self.id);
    }
}
