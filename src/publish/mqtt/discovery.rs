//! Home Assistant MQTT discovery (opt-in): per zone a total sensor, a sensor per
//! planogram label and an out-of-stock binary sensor, retained under the discovery
//! prefix, and removed again for zones that left the config.

use std::path::PathBuf;

use rumqttc::QoS;

use super::link::Link;
use super::protocol::Client;
use super::topics::Topics;

/// A zone as Home Assistant discovery describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneInfo {
    pub camera: String,
    pub zone: String,
    /// Planogram labels: one count sensor each (plus the zone total).
    pub labels: Vec<String>,
}

/// What the client task needs to publish discovery for one device.
pub(super) struct Discovery {
    /// `home-assistant.discovery-prefix`.
    pub(super) prefix: String,
    pub(super) device: String,
    pub(super) topics: Topics,
    pub(super) zones: Vec<ZoneInfo>,
    /// The topics published last time, so entities of removed zones can be removed.
    pub(super) record: PathBuf,
}

impl Discovery {
    /// Where Home Assistant announces that it (re)started.
    pub(super) fn status_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// Publishes Home Assistant discovery for the configured zones (retained), and an
    /// empty retained payload for entities of zones that left the config.
    pub(super) fn publish(&self, client: &Client, link: &mut Link) {
        let configs = discovery_configs(&self.prefix, &self.device, &self.topics, &self.zones);
        let before: Vec<String> = std::fs::read_to_string(&self.record)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        for old in before
            .iter()
            .filter(|t| !configs.iter().any(|(n, _)| n == *t))
        {
            tracing::info!(topic = %old, "removing Home Assistant entity of a zone no longer configured");
            link.untracked(client.try_publish(old.clone(), QoS::AtLeastOnce, true, Vec::new()));
        }
        for (topic, payload) in &configs {
            link.untracked(client.try_publish(
                topic.clone(),
                QoS::AtLeastOnce,
                true,
                payload.to_string().into_bytes(),
            ));
        }
        let names: Vec<&String> = configs.iter().map(|(t, _)| t).collect();
        let written = serde_json::to_vec(&names)
            .map_err(std::io::Error::from)
            .and_then(|json| std::fs::write(&self.record, json));
        if let Err(e) = written {
            tracing::warn!(path = %self.record.display(), error = %e, "cannot record discovery topics");
        }
    }
}

/// Home Assistant discovery topics and payloads: per zone a total sensor, a sensor per
/// planogram label, and an out-of-stock binary sensor; availability follows the status.
pub fn discovery_configs(
    prefix: &str,
    device: &str,
    topics: &Topics,
    zones: &[ZoneInfo],
) -> Vec<(String, serde_json::Value)> {
    let dev = serde_json::json!({
        "identifiers": [format!("shelfwatch-{device}")],
        "name": format!("shelfwatch {device}"),
        "manufacturer": "shelfwatch",
        "model": "shelf stock counter",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let slug = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut out = Vec::new();
    for z in zones {
        let state = topics.zone_state(&z.zone);
        let common = |name: String, id: String| {
            serde_json::json!({
                "name": name,
                "unique_id": id,
                "object_id": id,
                "state_topic": state,
                "availability_topic": topics.status(),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": dev,
            })
        };
        let id = format!("{}_{}", slug(device), slug(&z.zone));
        let mut total = common(format!("{} total", z.zone), format!("{id}_total"));
        total["value_template"] = "{{ value_json.total }}".into();
        total["state_class"] = "measurement".into();
        total["unit_of_measurement"] = "items".into();
        out.push((
            format!("{prefix}/sensor/{}/{id}_total/config", slug(device)),
            total,
        ));
        for label in &z.labels {
            let lid = format!("{id}_{}", slug(label));
            let mut s = common(format!("{} {label}", z.zone), lid.clone());
            s["value_template"] = format!(
                "{{{{ value_json.counts[{}] | default(0) }}}}",
                serde_json::Value::from(label.as_str())
            )
            .into();
            s["state_class"] = "measurement".into();
            s["unit_of_measurement"] = "items".into();
            out.push((format!("{prefix}/sensor/{}/{lid}/config", slug(device)), s));
        }
        let mut oos = common(
            format!("{} out of stock", z.zone),
            format!("{id}_out_of_stock"),
        );
        oos["value_template"] =
            "{{ 'ON' if value_json.status == 'out-of-stock' else 'OFF' }}".into();
        oos["device_class"] = "problem".into();
        out.push((
            format!(
                "{prefix}/binary_sensor/{}/{id}_out_of_stock/config",
                slug(device)
            ),
            oos,
        ));
    }
    out
}
