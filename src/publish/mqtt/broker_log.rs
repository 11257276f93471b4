//! The embedded broker's log, kept truthful and bounded: rumqttd's ERROR lines about
//! ordinary client behaviour are dropped, and every rumqttd log statement has a budget
//! of lines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps rumqttd's log truthful and bounded.
///
/// rumqttd 0.20 writes ERROR lines for ordinary client behaviour; those are dropped, so an
/// ERROR from the broker in the journal is worth reading: `router-drop` with
/// `Recv(Disconnected)` is how it logs a client's clean DISCONNECT; "no-connection id N is
/// already gone" the second of the two disconnect events such a client causes (rumqttd's
/// own comment says as much); "Error while handling MQTT connect packet" (a TCP
/// connection that went away before its CONNECT: a port probe, a client giving up) and
/// "disconnected" (a connected client that went away) when the cause is the peer: the
/// connection closed, reset or broken by the other end, or its keep-alive expired (a
/// client killed with unread data in its socket resets the connection instead of closing
/// it; under load that is the common case).
///
/// Everything else the broker says passes, at most [`BROKER_LOG_BURST`] lines at once
/// and one per [`BROKER_LOG_INTERVAL`] after that, per log statement: rumqttd's accept
/// loop logs and retries without pause when `accept` fails (EMFILE), which once wrote
/// 524 MB in 4.5 s, and a client that keeps failing to log in must not flood the journal
/// either. When lines are dropped a WARN says so once, and the next line that passes is
/// preceded by how many were dropped. A global filter: add it to the subscriber's layers.
#[derive(Debug, Default, Clone)]
pub struct BrokerNoiseFilter {
    /// One budget per rumqttd log statement, so a flood of one kind does not hide another.
    budgets: Arc<Mutex<HashMap<tracing::callsite::Identifier, LogBudget>>>,
}

/// Lines a rumqttd log statement may write at once.
const BROKER_LOG_BURST: f64 = 10.0;
/// After the burst, one line per interval and log statement.
const BROKER_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BrokerNoiseFilter {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        if !meta.target().starts_with("rumqttd") {
            return true;
        }
        let mut fields = BrokerEventFields::default();
        event.record(&mut fields);
        if *meta.level() == tracing::Level::ERROR
            && is_client_behaviour(&fields.message, &fields.error)
        {
            return false;
        }
        let admission = self
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(meta.callsite())
            .or_insert_with(LogBudget::full)
            .admit(std::time::Instant::now());
        // The lock is released: these events come back through this filter (under a
        // global subscriber; a scoped one, as in unit tests, drops nested events).
        match admission {
            Admission::Pass { dropped: 0 } => true,
            Admission::Pass { dropped } => {
                tracing::warn!(dropped, line = %fields.message, "rumqttd log lines were dropped (rate-limited)");
                true
            }
            Admission::Drop { first: true } => {
                tracing::warn!(line = %fields.message, burst = BROKER_LOG_BURST as u64,
                    interval_s = BROKER_LOG_INTERVAL.as_secs(),
                    "rumqttd logs this line too often; dropping it until it calms down");
                false
            }
            Admission::Drop { first: false } => false,
        }
    }
}

/// Whether a rumqttd ERROR line (its message and `error` field, as `Debug` prints it)
/// describes what a client did rather than a fault of the broker or the daemon.
fn is_client_behaviour(message: &str, error: &str) -> bool {
    match message {
        "router-drop" => error == "Recv(Disconnected)",
        "Error while handling MQTT connect packet" => peer_went_away(error),
        // A connected client's keep-alive expired: it vanished (power, network).
        "disconnected" => peer_went_away(error) || error.contains("KeepAlive("),
        m => m.starts_with("no-connection id ") && m.ends_with(" is already gone"),
    }
}

/// `io::ErrorKind`s of a peer that closed, reset or broke its end of the connection.
fn peer_went_away(error: &str) -> bool {
    [
        "kind: ConnectionAborted",
        "kind: ConnectionReset",
        "kind: BrokenPipe",
        "kind: UnexpectedEof",
    ]
    .iter()
    .any(|kind| error.contains(kind))
}

/// A token bucket of log lines.
#[derive(Debug)]
struct LogBudget {
    tokens: f64,
    refilled: std::time::Instant,
    dropped: u64,
}

#[derive(Debug, PartialEq)]
enum Admission {
    /// Write the line; `dropped` lines were dropped since the last one written.
    Pass { dropped: u64 },
    /// Drop the line; `first` of a run of dropped lines.
    Drop { first: bool },
}

impl LogBudget {
    fn full() -> Self {
        Self {
            tokens: BROKER_LOG_BURST,
            refilled: std::time::Instant::now(),
            dropped: 0,
        }
    }

    fn admit(&mut self, now: std::time::Instant) -> Admission {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64()
            / BROKER_LOG_INTERVAL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(BROKER_LOG_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admission::Pass {
                dropped: std::mem::take(&mut self.dropped),
            }
        } else {
            self.dropped += 1;
            Admission::Drop {
                first: self.dropped == 1,
            }
        }
    }
}

#[derive(Default)]
struct BrokerEventFields {
    message: String,
    error: String,
}

impl tracing::field::Visit for BrokerEventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_noise_filter_drops_client_disconnects_and_probes_but_keeps_real_errors() {
        // Debug output like rumqttd's error values.
        #[derive(Debug)]
        enum RecvError {
            Disconnected,
        }
        #[derive(Debug)]
        enum LinkError {
            Recv(RecvError),
            NotConnected,
        }
        // Only ever printed, through Debug, as rumqttd prints its own.
        #[derive(Debug)]
        struct Elapsed(());
        #[allow(dead_code)]
        #[derive(Debug)]
        enum NetworkError {
            Io(std::io::Error),
            KeepAlive(Elapsed),
        }
        #[allow(dead_code)]
        #[derive(Debug)]
        enum RemoteError {
            Network(NetworkError),
            Timeout(Elapsed),
            InvalidAuth,
        }
        let io = |kind| std::io::Error::new(kind, "by peer");
        let os = |code| NetworkError::Io(std::io::Error::from_raw_os_error(code));
        let seen = through_the_filter(|| {
            // Client behaviour: dropped.
            tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection closed by peer"), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Network(NetworkError::Io(io(std::io::ErrorKind::ConnectionReset))), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            // Issue #19: a subscriber killed with unread data resets its connection; under
            // load that is how mosquitto_sub leaves, and the demo test saw it as an ERROR.
            for e in [
                os(libc::ECONNRESET),
                os(libc::EPIPE),
                NetworkError::Io(io(std::io::ErrorKind::UnexpectedEof)),
                NetworkError::KeepAlive(Elapsed(())),
            ] {
                tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Network(e), "disconnected");
            }
            // Faults, or worth knowing: kept.
            tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::NotConnected, "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed"), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::InvalidAuth, "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?RemoteError::Timeout(Elapsed(())), "Error while handling MQTT connect packet");
            tracing::error!(target: "rumqttd::server::broker", error = ?os(libc::EMFILE), "Unable to accept socket.");
            tracing::error!(target: "rumqttd::server::broker", "connection-stop");
            // Only rumqttd's own ERROR lines are judged: the same words elsewhere pass.
            tracing::warn!(target: "rumqttd::server::broker", error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
            tracing::error!(error = ?LinkError::Recv(RecvError::Disconnected), "router-drop");
        });
        let shown = |needle: &str| seen.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(seen.len(), 8, "{seen:#?}");
        for kept in [
            "NotConnected",
            "malformed",
            "InvalidAuth",
            "Timeout(Elapsed",
            "Too many open files",
            "connection-stop",
        ] {
            assert_eq!(shown(kept), 1, "{kept}: {seen:#?}");
        }
        for dropped in [
            "closed by peer",
            "ConnectionReset",
            "BrokenPipe",
            "UnexpectedEof",
            "KeepAlive",
            "already gone",
        ] {
            assert_eq!(shown(dropped), 0, "{dropped}: {seen:#?}");
        }
        assert_eq!(shown("Recv(Disconnected)"), 2);
    }

    #[test]
    fn a_flooding_broker_log_statement_is_cut_to_its_budget_and_others_still_pass() {
        let seen = through_the_filter(|| {
            // Issue #19: EMFILE made rumqttd's accept loop log without pause.
            for _ in 0..10_000 {
                tracing::error!(target: "rumqttd::server::broker", error = ?std::io::Error::from_raw_os_error(libc::EMFILE), "Unable to accept socket.");
            }
            tracing::error!(target: "rumqttd::server::broker", "connection-stop");
            for _ in 0..100 {
                tracing::info!("the daemon's own lines are never limited");
            }
        });
        let shown = |needle: &str| seen.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(shown("Unable to accept socket."), BROKER_LOG_BURST as usize);
        assert_eq!(shown("connection-stop"), 1);
        assert_eq!(shown("never limited"), 100);
    }

    #[test]
    fn a_log_budget_refills_one_line_per_interval_and_reports_what_it_dropped() {
        let start = std::time::Instant::now();
        let mut budget = LogBudget {
            tokens: BROKER_LOG_BURST,
            refilled: start,
            dropped: 0,
        };
        for _ in 0..BROKER_LOG_BURST as usize {
            assert_eq!(budget.admit(start), Admission::Pass { dropped: 0 });
        }
        assert_eq!(budget.admit(start), Admission::Drop { first: true });
        assert_eq!(budget.admit(start), Admission::Drop { first: false });
        let half = start + BROKER_LOG_INTERVAL / 2;
        assert_eq!(budget.admit(half), Admission::Drop { first: false });
        let one = start + BROKER_LOG_INTERVAL;
        assert_eq!(budget.admit(one), Admission::Pass { dropped: 3 });
        assert_eq!(budget.admit(one), Admission::Drop { first: true });
        // Quiet for long: the burst is back, not more.
        let later = one + BROKER_LOG_INTERVAL * 1000;
        for _ in 0..BROKER_LOG_BURST as usize {
            assert!(matches!(budget.admit(later), Admission::Pass { .. }));
        }
        assert!(matches!(budget.admit(later), Admission::Drop { .. }));
    }

    /// The lines `log` prints through the broker noise filter, as the daemon installs it.
    fn through_the_filter(log: impl FnOnce()) -> Vec<String> {
        use tracing_subscriber::layer::SubscriberExt;

        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let writer = {
            let seen = Arc::clone(&seen);
            move || CaptureLine(Arc::clone(&seen))
        };
        let subscriber = tracing_subscriber::registry()
            .with(BrokerNoiseFilter::default())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            );
        tracing::subscriber::with_default(subscriber, log);
        let lines = seen.lock().unwrap().clone();
        lines
    }

    /// A `MakeWriter` target that keeps each formatted line.
    struct CaptureLine(Arc<Mutex<Vec<String>>>);

    impl std::io::Write for CaptureLine {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
