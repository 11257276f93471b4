//! The client task: the rumqttc event loop on a tokio task of its own, which hands the
//! spool to the broker (see [`super::link`]), reconnects with exponential backoff and
//! jitter, answers commands, scanner requests and Home Assistant restarts, and says
//! goodbye on shutdown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::{mpsc, watch, Notify};

use super::discovery::Discovery;
use super::link::Link;
use super::protocol::{Client, Ev, EventLoop, LinkOptions};
use super::scanner::{recv_reply, ScannerLink};
use super::settings::MqttSettings;
use super::topics::Topics;
use super::{Command, MqttStats};
use crate::identify::requests::{Incoming, Outgoing as ScannerReply};
use crate::publish::spool::Spool;

/// The client task's half.
pub struct MqttClient {
    pub(super) settings: MqttSettings,
    pub(super) device: String,
    pub(super) topics: Topics,
    pub(super) spool: Arc<Mutex<Spool>>,
    pub(super) wake: Arc<Notify>,
    pub(super) snapshots: mpsc::Receiver<(String, Vec<u8>)>,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) stats: Arc<MqttStats>,
    pub(super) options: LinkOptions,
    /// With `home-assistant`.
    pub(super) discovery: Option<Discovery>,
    pub(super) scanner: Option<ScannerLink>,
    /// Set once the goodbye `offline` is on its way, so it is not taken back.
    pub(super) leaving: bool,
}

impl MqttClient {
    /// Runs until `shutdown` fires; then tries for `grace` to deliver what is spooled,
    /// publishes `offline` and disconnects.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let span =
            tracing::info_span!("mqtt", device = %self.device, broker = %self.settings.broker);
        let _g = span.enter();
        let (client, mut eventloop) = self.options.connect();
        let mut link = Link::default();
        let mut attempt: u32 = 0;
        let mut rng = Jitter::seeded();
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            if let Some(deadline) = stopping {
                // Shutting down: deliver what is spooled if the broker can be reached
                // within the grace period; whatever is left stays spooled for next time.
                if self.spool().is_empty() || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            self.feed(&client, &mut link);
            // rumqttc's poll() is not cancel-safe while it connects: a branch below that
            // fires meanwhile drops the half-made connection, and the next poll starts
            // another. At start-up the first counted frames woke the loop twice before
            // CONNACK, so the broker saw two connections closed or reset right after
            // CONNECT (rumqttd logs a reset as an ERROR). Branches that only matter when
            // connected wait until then (a Notify keeps its permit; snapshots wait in
            // their channel).
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(ev) => {
                        if self.on_event(ev, &client, &mut link) {
                            attempt = 0;
                        }
                    }
                    Err(e) => {
                        link.connection_lost();
                        self.stats.connected.store(false, Ordering::Relaxed);
                        attempt += 1;
                        self.stats.connect_attempts.fetch_add(1, Ordering::Relaxed);
                        let delay = rng.backoff(attempt, self.settings.reconnect_min_ms, self.settings.reconnect_max_s);
                        log_connection_error(&e, attempt, delay);
                        let delay = match stopping {
                            Some(deadline) => delay.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                            None => delay,
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            r = shutdown.changed(), if stopping.is_none() => {
                                let _ = r;
                                stopping = Some(tokio::time::Instant::now() + grace);
                            }
                        }
                    }
                },
                _ = self.wake.notified(), if link.is_connected() => {}
                Some(reply) = recv_reply(&mut self.scanner) => self.send_reply(reply, &client, &mut link),
                Some((camera, jpeg)) = self.snapshots.recv(), if link.is_connected() => {
                    self.publish_snapshot(&camera, jpeg, &client, &mut link);
                }
                r = shutdown.changed(), if stopping.is_none() => {
                    let _ = r;
                    stopping = Some(tokio::time::Instant::now() + grace);
                }
                // The grace period's end, not a tick (a tick would cancel a connect).
                _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => {}
            }
        }
        if link.is_connected() {
            self.say_goodbye(&client, &mut eventloop, &mut link).await;
        }
        tracing::info!(spooled = self.spool().len(), "mqtt client stopped");
    }

    fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A clean goodbye: the retained status says offline without waiting for the broker
    /// to fire the last will.
    async fn say_goodbye(&mut self, client: &Client, eventloop: &mut EventLoop, link: &mut Link) {
        self.leaving = true;
        link.untracked(client.try_publish(
            self.topics.status(),
            QoS::AtLeastOnce,
            true,
            b"offline".to_vec(),
        ));
        let _ = client.try_disconnect();
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while tokio::time::Instant::now() < until {
            match tokio::time::timeout_at(until, eventloop.poll()).await {
                Ok(Ok(Ev::Disconnected)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(ev)) => {
                    self.on_event(ev, client, link);
                }
            }
        }
    }

    /// Hands spooled messages to rumqttc, in order, while there is room in the window.
    fn feed(&mut self, client: &Client, link: &mut Link) {
        let spool = self.spool();
        link.feed(&spool, |e| {
            client.try_publish(
                e.topic.clone(),
                QoS::AtLeastOnce,
                e.retain,
                e.payload.clone().into_bytes(),
            )
        });
    }

    /// A reply is for a person waiting at a scanner: sent now or lost with the
    /// connection, never spooled.
    fn send_reply(&mut self, reply: ScannerReply, client: &Client, link: &mut Link) {
        if link.is_connected() {
            link.untracked(client.try_publish_reply(reply));
        } else {
            tracing::warn!(topic = %reply.topic, "identify reply lost: not connected");
        }
    }

    fn publish_snapshot(&mut self, camera: &str, jpeg: Vec<u8>, client: &Client, link: &mut Link) {
        let topic = self.topics.snapshot(camera);
        // A QoS 0 PUBLISH's remaining length: topic length field, topic, payload.
        let packet = 2 + topic.len() + jpeg.len();
        if self.settings.broker == "embedded" && packet > self.settings.embedded_max_packet_bytes {
            // The broker would drop our connection for it.
            tracing::warn!(camera = %camera, bytes = jpeg.len(),
                limit = self.settings.embedded_max_packet_bytes,
                "snapshot not published: larger than embedded-max-packet-bytes");
        } else {
            link.untracked(client.try_publish(topic, QoS::AtMostOnce, false, jpeg));
        }
    }

    /// Returns true when a connection was (re)established.
    fn on_event(&mut self, ev: Ev, client: &Client, link: &mut Link) -> bool {
        match ev {
            Ev::Connected(receive_max) => {
                link.connection_up(receive_max);
                self.on_connected(client, link);
                return true;
            }
            Ev::Sent(pkid) => link.sent(pkid),
            Ev::Acked(pkid) => {
                if let Some(id) = link.acked(pkid) {
                    let mut spool = self.spool();
                    spool.ack(id);
                    self.stats.record(&spool);
                }
            }
            Ev::Message {
                topic,
                payload,
                response_topic,
                correlation,
            } => {
                if topic == self.topics.status() {
                    self.on_own_status(&payload, client, link);
                } else if topic == self.topics.identify_request() {
                    let request = Incoming {
                        payload,
                        response_topic,
                        correlation,
                        received: std::time::Instant::now(),
                    };
                    self.on_identify_request(request, client, link);
                } else {
                    self.on_message(&topic, &payload, client, link);
                }
            }
            _ => {}
        }
        false
    }

    /// Says `online`, subscribes, and publishes Home Assistant discovery.
    fn on_connected(&mut self, client: &Client, link: &mut Link) {
        self.stats.connected.store(true, Ordering::Relaxed);
        let pending = self.spool().len();
        tracing::info!(replaying = pending, "connected to the broker");
        link.untracked(client.try_publish(
            self.topics.status(),
            QoS::AtLeastOnce,
            true,
            b"online".to_vec(),
        ));
        let _ = client.try_subscribe(self.topics.commands(), QoS::AtLeastOnce);
        // Our own status, to take back a stale `offline` (see on_own_status).
        let _ = client.try_subscribe(self.topics.status(), QoS::AtLeastOnce);
        if self.scanner.is_some() {
            let _ = client.try_subscribe(self.topics.identify_request(), QoS::AtLeastOnce);
        }
        if let Some(discovery) = &self.discovery {
            let _ = client.try_subscribe(discovery.status_topic(), QoS::AtLeastOnce);
            discovery.publish(client, link);
        }
    }

    /// The client id is new at every start, so the broker may still hold the previous
    /// run's connection (half-open after a power cut) and fire its last will after we
    /// said `online`; anyone may also publish there. While we are connected, `offline`
    /// is wrong: say `online` again.
    fn on_own_status(&mut self, payload: &[u8], client: &Client, link: &mut Link) {
        if payload == b"offline" && !self.leaving {
            tracing::info!("status said offline while connected (a previous session's last will?); publishing online again");
            link.untracked(client.try_publish(
                self.topics.status(),
                QoS::AtLeastOnce,
                true,
                b"online".to_vec(),
            ));
        }
    }

    /// Admits a scanner request to the request thread, or answers it at once (refused,
    /// over its rate, or busy).
    fn on_identify_request(&mut self, request: Incoming, client: &Client, link: &mut Link) {
        let Some(scanner) = &mut self.scanner else {
            return;
        };
        if let Err(reply) = crate::identify::requests::admit(
            &request,
            &scanner.policy,
            &mut scanner.limiter,
            &self.device,
        ) {
            link.untracked(client.try_publish_reply(reply));
        } else if let Err(mpsc::error::TrySendError::Full(request)) =
            scanner.requests.try_send(request)
        {
            let reply = crate::identify::requests::busy(&request, &self.device, &scanner.policy);
            link.untracked(client.try_publish_reply(reply));
        }
    }

    /// Home Assistant's status, or a command under `<prefix>/<device>/cmd/`.
    fn on_message(&mut self, topic: &str, payload: &[u8], client: &Client, link: &mut Link) {
        let discovery = self
            .discovery
            .as_ref()
            .filter(|d| topic == d.status_topic());
        if let Some(discovery) = discovery {
            if payload == b"online" {
                // Home Assistant restarted: it forgot non-retained discovery state.
                discovery.publish(client, link);
                return;
            }
        }
        if let Some(cmd) = self.topics.command(topic) {
            let payload = String::from_utf8_lossy(payload).trim().to_owned();
            let command = match cmd.as_str() {
                "snapshot" => Some(Command::Snapshot((!payload.is_empty()).then_some(payload))),
                "reload" => Some(Command::Reload),
                other => {
                    tracing::warn!(command = other, "unknown command ignored");
                    None
                }
            };
            if let Some(c) = command {
                tracing::info!(command = ?c, "command received");
                let _ = self.commands.try_send(c);
            }
        }
    }
}

fn log_connection_error(why: &str, attempt: u32, delay: Duration) {
    tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64, reason = %why, "mqtt connection failed");
}

/// Exponential backoff with jitter (so a fleet does not reconnect in lock-step after a
/// broker restart), from a small xorshift generator.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self(t | 1)
    }

    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// min * 2^(attempt-1), capped at max, then scaled into [0.5, 1.0] of itself.
    fn backoff(&mut self, attempt: u32, min_ms: u64, max_s: u64) -> Duration {
        let base = (min_ms as f64) * 2f64.powi(attempt.saturating_sub(1).min(20) as i32);
        let capped = base.min(max_s as f64 * 1000.0);
        Duration::from_millis((capped * (0.5 + 0.5 * self.next())) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_stays_within_jitter_bounds_and_is_capped() {
        let mut j = Jitter(12345);
        for attempt in 1..12 {
            let d = j.backoff(attempt, 500, 60).as_millis() as f64;
            let base = (500.0 * 2f64.powi(attempt as i32 - 1)).min(60_000.0);
            assert!(
                d >= base * 0.5 - 1.0 && d <= base,
                "attempt {attempt}: {d} vs {base}"
            );
        }
    }
}
