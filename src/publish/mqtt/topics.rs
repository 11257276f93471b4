//! Topic names of one device, and the sink: the publisher thread's half, which appends
//! to the spool and wakes the client task.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use super::MqttStats;
use crate::publish::spool::Spool;
use crate::publish::{Body, Envelope, Sink, SinkError};

/// Topic names for one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Self {
        Self {
            base: format!("{}/{device}", prefix.trim_end_matches('/')),
        }
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    pub fn zone_state(&self, zone: &str) -> String {
        format!("{}/zones/{zone}/state", self.base)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }
    pub fn health(&self) -> String {
        format!("{}/health", self.base)
    }
    pub fn snapshot(&self, camera: &str) -> String {
        format!("{}/snapshot/{camera}", self.base)
    }
    pub fn commands(&self) -> String {
        format!("{}/cmd/#", self.base)
    }
    /// Where scanners publish images to identify.
    pub fn identify_request(&self) -> String {
        format!("{}/identify/request", self.base)
    }
    /// Where replies go when a request names no reply topic.
    pub fn identify_response(&self) -> String {
        format!("{}/identify/response", self.base)
    }
    pub(super) fn command(&self, topic: &str) -> Option<String> {
        topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/cmd/"))
            .map(str::to_owned)
    }
}

/// The publisher-side half: appends to the spool and wakes the client task.
pub struct MqttSink {
    pub(super) topics: Topics,
    pub(super) spool: Arc<Mutex<Spool>>,
    pub(super) wake: Arc<Notify>,
    pub(super) snapshots: mpsc::Sender<(String, Vec<u8>)>,
    pub(super) stats: Arc<MqttStats>,
}

impl Sink for MqttSink {
    fn name(&self) -> String {
        "mqtt".into()
    }

    fn publish(&mut self, msg: &Envelope, json: &str) -> Result<(), SinkError> {
        let (topic, retain) = match &msg.body {
            Body::State { zone, .. } => (self.topics.zone_state(zone), true),
            Body::Event { .. } => (self.topics.events(), false),
            Body::Health(_) => (self.topics.health(), false),
        };
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        spool.append(&topic, retain, json);
        self.stats.record(&spool);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        spool.sync();
        self.stats.record(&spool);
        self.wake.notify_one();
        Ok(())
    }

    fn snapshot(&mut self, camera: &str, jpeg: &[u8]) {
        // Snapshots are on request and large: sent when connected, never spooled.
        let _ = self.snapshots.try_send((camera.to_owned(), jpeg.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_prefix_device_and_zone() {
        let t = Topics::new("shelfwatch/", "dev-1");
        assert_eq!(t.status(), "shelfwatch/dev-1/status");
        assert_eq!(t.zone_state("top"), "shelfwatch/dev-1/zones/top/state");
        assert_eq!(
            t.command("shelfwatch/dev-1/cmd/snapshot").as_deref(),
            Some("snapshot")
        );
        assert_eq!(t.command("shelfwatch/dev-2/cmd/snapshot"), None);
    }
}
