//! The embedded broker: rumqttd started on its own threads, within the limits the
//! open-file limit allows, and ready (accepting connections) before start-up goes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::settings::MqttSettings;
use super::{read_password_file, MqttError};

/// Starts the embedded broker (rumqttd, MQTT 3.1.1, no TLS) on its own threads and
/// returns once it accepts connections. Config validation has already refused a
/// non-loopback `embedded-listen` without credentials; this refuses it again, so that no
/// caller can open the broker to the LAN without them.
pub fn start_embedded_broker(
    settings: &MqttSettings,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<(), MqttError> {
    let addr = embedded_listen_address(&settings.embedded_listen)
        .map_err(|e| MqttError::Embedded(format!("embedded-listen: {e}")))?;
    let auth = logins(settings, addr, resolve)?;
    let fd_limit =
        open_files_limit().map_err(|e| MqttError::Embedded(format!("RLIMIT_NOFILE: {e}")))?;
    let connect_timeout = Duration::from_millis(settings.embedded_connect_timeout_ms);
    let limits = EmbeddedLimits::new(fd_limit, settings.embedded_max_connections, connect_timeout)
        .map_err(MqttError::Embedded)?;
    if limits.max_connections < settings.embedded_max_connections {
        tracing::warn!(configured = settings.embedded_max_connections, used = limits.max_connections,
            fd_limit, "embedded-max-connections lowered: the open-file limit (LimitNOFILE=) has no room for more");
    }
    // Fail here, clearly, if the port is taken, rather than inside the broker's thread.
    drop(
        std::net::TcpListener::bind(addr)
            .map_err(|e| MqttError::Embedded(format!("{addr}: {e}")))?,
    );
    let config = rumqttd_config(settings, addr, limits, auth.clone());
    let broker = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| MqttError::Embedded(e.to_string()))?;
    // rumqttd binds inside its own runtime and has no ready signal. On a loaded board
    // the daemon's client got there first, was refused, logged a failed attempt and
    // waited out a back-off: so wait until the broker accepts.
    let started = std::time::Instant::now();
    wait_until_accepting(addr, &broker)?;
    tracing::info!(listen = %addr, ready_ms = started.elapsed().as_millis() as u64,
        max_connections = limits.max_connections,
        max_packet_bytes = settings.embedded_max_packet_bytes,
        accept_interval_ms = limits.accept_interval.as_millis() as u64,
        fd_limit, login_required = auth.is_some(),
        "embedded MQTT broker started");
    Ok(())
}

/// The logins the embedded broker requires: none on loopback without `username`;
/// anywhere else `username` and `password-file` must be set.
fn logins(
    settings: &MqttSettings,
    addr: std::net::SocketAddr,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<Option<HashMap<String, String>>, MqttError> {
    match (&settings.username, &settings.password_file) {
        (Some(user), Some(file)) => {
            let file = resolve(file);
            crate::fsutil::check_secret_file(&file).map_err(MqttError::Embedded)?;
            Ok(Some(HashMap::from([(
                user.clone(),
                read_password_file(&file)?,
            )])))
        }
        _ if !addr.ip().is_loopback() => Err(MqttError::Embedded(format!(
            "embedded-listen: {addr} is not loopback and no username and password-file are set"
        ))),
        _ => Ok(None),
    }
}

/// rumqttd's configuration: one MQTT 3.1.1 listener on `addr`, within `limits`.
fn rumqttd_config(
    settings: &MqttSettings,
    addr: std::net::SocketAddr,
    limits: EmbeddedLimits,
    auth: Option<HashMap<String, String>>,
) -> rumqttd::Config {
    let server = rumqttd::ServerSettings {
        name: "shelfwatch-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: limits.accept_interval.as_millis() as u64,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: u16::try_from(settings.embedded_connect_timeout_ms)
                .unwrap_or(u16::MAX),
            max_payload_size: settings.embedded_max_packet_bytes,
            max_inflight_count: 200,
            auth,
            external_auth: None,
            // Publishes to a topic nobody subscribes to are kept (under a filter of their
            // own); without this rumqttd disconnects their publisher, the daemon included.
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: limits.max_connections,
            max_outgoing_packet_count: 200,
            // Each topic filter keeps its recent messages in memory, in segments of this
            // size (rumqttd refuses less than 1 KiB): at most EMBEDDED_SEGMENTS of them
            // plus one packet, so a filter holds a few packets rather than megabytes.
            max_segment_size: settings.embedded_max_packet_bytes.max(1024),
            max_segment_count: EMBEDDED_SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("1".to_string(), server)].into()),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// `embedded-listen` as a socket address (an IP address, not a host name: the broker
/// binds it, and whether it is loopback must be known before binding).
pub fn embedded_listen_address(listen: &str) -> Result<std::net::SocketAddr, String> {
    listen.parse().map_err(|e| {
        format!("{listen:?}: expected an IP address and port, e.g. \"127.0.0.1:1883\" ({e})")
    })
}

/// Segments of recent messages a topic filter of the embedded broker keeps in memory.
/// Two: one being filled while a slow subscriber still reads the other.
const EMBEDDED_SEGMENTS: usize = 2;

/// File descriptors kept for the daemon itself: cameras, model and gallery files, spool,
/// state, logging, the async runtime and the client's own socket. The demo (one camera,
/// the embedded broker idle) holds 20 (`ls /proc/<pid>/fd`); three times that leaves
/// room for more cameras, reloads and snapshots. The embedded broker gets the rest.
const FD_RESERVE: u64 = 64;

/// What the open-file limit lets the embedded broker hold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct EmbeddedLimits {
    /// Clients with an MQTT session.
    max_connections: usize,
    /// rumqttd's pause after accepting a connection. A connection that has not sent
    /// CONNECT holds a file descriptor for up to the connect timeout, and rumqttd
    /// counts only sessions against `max_connections`: spacing the accepts is the only
    /// bound on those, and it keeps the broker under the file limit. At the limit,
    /// rumqttd's accept loop retries without pause and logs each failure (300 idle
    /// connections against a 256-file limit: 3.3 million lines in 4.5 s), and the
    /// cameras' reads fail with EMFILE.
    accept_interval: Duration,
}

impl EmbeddedLimits {
    /// `fd_limit` is RLIMIT_NOFILE's soft limit.
    fn new(
        fd_limit: u64,
        max_connections: usize,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let budget = fd_limit.saturating_sub(FD_RESERVE);
        // Sessions may take half of the broker's files; connections that have not sent
        // CONNECT yet the other half.
        let max_connections = (max_connections as u64).min(budget / 2);
        let waiting = budget - max_connections;
        if max_connections < 2 || waiting < 2 {
            return Err(format!(
                "the open-file limit ({fd_limit}) leaves the embedded broker no room: raise it \
                 (LimitNOFILE=) to at least {}",
                FD_RESERVE + 4
            ));
        }
        // At most connect_timeout / interval + 1 connections wait for CONNECT at once.
        let timeout_ms = connect_timeout.as_millis() as u64;
        let interval_ms = timeout_ms.div_ceil(waiting - 1).max(1);
        Ok(Self {
            max_connections: max_connections as usize,
            accept_interval: Duration::from_millis(interval_ms),
        })
    }
}

/// RLIMIT_NOFILE's soft limit (`u64::MAX` when unlimited).
fn open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own and keeps no pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // rlim_t is 32 bits on armv7.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

/// Waits until the embedded broker accepts connections on `addr`, by connecting to it (on
/// loopback when it listens on every address). A connection needs nothing from /proc:
/// watching /proc/net/tcp instead made every start under the systemd unit, whose
/// `ProcSubset=pid` hides it, wait out a 5 s timeout. rumqttd logs the probe, closed
/// before its CONNECT, as an error that the noise filter drops. There is no timeout to
/// wait out: rumqttd binds as soon as its thread runs, and if it cannot, its thread ends,
/// which ends the wait with an error.
fn wait_until_accepting(
    addr: std::net::SocketAddr,
    broker: &std::thread::JoinHandle<()>,
) -> Result<(), MqttError> {
    let probe = probe_address(addr);
    loop {
        match std::net::TcpStream::connect(probe) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if broker.is_finished() {
                    return Err(MqttError::Embedded(format!(
                        "{addr}: the broker stopped before it listened (its error is logged above)"
                    )));
                }
                // Polling: rumqttd offers nothing to wait on.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(MqttError::Embedded(format!(
                    "cannot connect to {probe} to see that the broker listens: {e}"
                )))
            }
        }
    }
}

/// Where to connect to reach a listener on `addr`: loopback for "every address".
fn probe_address(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings for the embedded broker on a free loopback port.
    fn embedded_on_a_free_port() -> MqttSettings {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        toml::from_str(&format!("embedded-listen = \"{addr}\"")).unwrap()
    }

    #[test]
    fn the_embedded_broker_listens_before_start_returns() {
        let settings = embedded_on_a_free_port();
        start_embedded_broker(&settings, Path::to_owned).unwrap();
        // Ready means a client's first attempt is accepted, not refused (under load the
        // broker thread can take milliseconds to bind; the demo's client once got there first).
        std::net::TcpStream::connect(&settings.embedded_listen)
            .expect("connect to the embedded broker");
    }

    #[test]
    fn readiness_is_a_connection_to_the_listener_not_a_look_at_proc() {
        // Issue #19: under the unit's ProcSubset=pid there is no /proc/net/tcp. The wait
        // connects instead; a listener nobody accepts on is enough (the kernel completes
        // the handshake).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = std::thread::spawn(|| {});
        wait_until_accepting(addr, &broker).unwrap();
        drop(listener);
        // A broker on every address is reached on loopback (nothing binds those here).
        let every: std::net::SocketAddr = "0.0.0.0:1883".parse().unwrap();
        assert_eq!(probe_address(every), "127.0.0.1:1883".parse().unwrap());
        let every6: std::net::SocketAddr = "[::]:1883".parse().unwrap();
        assert_eq!(probe_address(every6), "[::1]:1883".parse().unwrap());
        let lan: std::net::SocketAddr = "192.168.1.20:1883".parse().unwrap();
        assert_eq!(probe_address(lan), lan);
    }

    #[test]
    fn readiness_fails_instead_of_waiting_when_the_broker_thread_ended_without_listening() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let ended = std::thread::spawn(|| {});
        while !ended.is_finished() {
            std::thread::yield_now();
        }
        let e = wait_until_accepting(addr, &ended).unwrap_err();
        assert!(e.to_string().contains("stopped before it listened"), "{e}");
    }

    #[test]
    fn the_broker_gets_the_files_the_daemon_does_not_need_and_no_more() {
        let timeout = Duration::from_millis(5000);
        // Issue #19: 300 idle connections against a 256-file limit. Sessions and
        // connections still waiting for CONNECT (one per accept interval, each for up to
        // the timeout) stay within the files above the daemon's reserve.
        let l = EmbeddedLimits::new(256, 32, timeout).unwrap();
        assert_eq!(l.max_connections, 32);
        let waiting = timeout.as_millis() / l.accept_interval.as_millis() + 1;
        assert!(
            l.max_connections as u128 + waiting <= 256 - FD_RESERVE as u128,
            "{l:?}"
        );
        // A roomy limit: no pause to speak of, the configured sessions.
        let l = EmbeddedLimits::new(1 << 20, 32, timeout).unwrap();
        assert_eq!(
            l,
            EmbeddedLimits {
                max_connections: 32,
                accept_interval: Duration::from_millis(1)
            }
        );
        // A tight one lowers the sessions too; none at all is an error that says what to raise.
        let l = EmbeddedLimits::new(FD_RESERVE + 20, 32, timeout).unwrap();
        assert_eq!(l.max_connections, 10);
        let e = EmbeddedLimits::new(FD_RESERVE + 2, 32, timeout).unwrap_err();
        assert!(e.contains("LimitNOFILE"), "{e}");
        assert!(EmbeddedLimits::new(u64::MAX, 32, timeout).is_ok());
    }

    #[test]
    fn a_non_loopback_embedded_broker_without_credentials_does_not_start() {
        let settings: MqttSettings = toml::from_str("embedded-listen = \"0.0.0.0:0\"").unwrap();
        let e = start_embedded_broker(&settings, Path::to_owned).unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
    }
}
