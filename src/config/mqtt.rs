//! The checks of an MQTT sink's settings (`[[sinks]]` with `kind = "mqtt"`). The type
//! lives with the MQTT client in `crate::publish::mqtt`; its validation lives here, with
//! the rest of the config's.

use super::{check_name, LoadedConfig, Problems};
use crate::publish::mqtt::{embedded_listen_address, MqttSettings};

impl MqttSettings {
    /// `loaded` resolves the password, CA and key files, which must exist (the secret
    /// ones readable by their owner and group only).
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        if self.prefix.is_empty()
            || self
                .prefix
                .split('/')
                .any(|level| check_name(level).is_err())
        {
            problems.push(
                format!("{key}.prefix"),
                format!(
                    "{:?}: topic levels of letters, digits, '-' and '_', separated by '/'",
                    self.prefix
                ),
            );
        }
        if let Some(id) = &self.client_id {
            if check_name(id).is_err() {
                problems.push(
                    format!("{key}.client-id"),
                    "letters, digits, '-' and '_' only",
                );
            }
        }
        if self.broker != "embedded"
            && self
                .broker
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
        {
            problems.push(
                format!("{key}.broker"),
                format!("{:?}: expected \"embedded\" or host:port", self.broker),
            );
        }
        if self.password_file.is_some() && self.username.is_none() {
            problems.push(format!("{key}.password-file"), "needs a username");
        }
        if let Some(p) = &self.password_file {
            if let Err(e) = crate::fsutil::check_secret_file(&loaded.resolve(p)) {
                problems.push(format!("{key}.password-file"), e);
            }
        }
        if self.broker == "embedded" {
            self.validate_embedded_broker(key, problems);
        }
        if let Some(t) = &self.tls {
            let ca = loaded.resolve(&t.ca_file);
            if let Err(e) = std::fs::metadata(&ca) {
                problems.push(
                    format!("{key}.tls.ca-file"),
                    format!("{}: {e}", ca.display()),
                );
            }
            if let Some(k) = &t.client_key {
                if let Err(e) = crate::fsutil::check_secret_file(&loaded.resolve(k)) {
                    problems.push(format!("{key}.tls.client-key"), e);
                }
            }
        }
        problems.between(
            format!("{key}.keep-alive-s"),
            self.keep_alive_s,
            5,
            3600,
            "",
        );
    }

    /// The embedded broker's keys. Run before anything binds: a broker open to the LAN
    /// without credentials is refused here, with exit 78.
    fn validate_embedded_broker(&self, key: &str, problems: &mut Problems) {
        match embedded_listen_address(&self.embedded_listen) {
            Err(e) => problems.push(format!("{key}.embedded-listen"), e),
            Ok(addr)
                if !addr.ip().is_loopback()
                    && (self.username.is_none() || self.password_file.is_none()) =>
            {
                problems.push(
                    format!("{key}.embedded-listen"),
                    format!(
                        "{addr} is not a loopback address: the embedded broker has no \
                         authentication unless username and password-file are set (then every \
                         client must log in); set them, keep it on 127.0.0.1, or use mosquitto \
                         for the LAN (docs/mqtt.md)"
                    ),
                );
            }
            Ok(_) => {}
        }
        if self.username.is_some() && self.password_file.is_none() {
            problems.push(
                format!("{key}.password-file"),
                "the embedded broker checks username against this password: set it",
            );
        }
        problems.between(
            format!("{key}.embedded-max-connections"),
            self.embedded_max_connections,
            2,
            4096,
            "the daemon's own client is one",
        );
        problems.between(
            format!("{key}.embedded-max-packet-bytes"),
            self.embedded_max_packet_bytes,
            4 << 10,
            16 << 20,
            "",
        );
        problems.between(
            format!("{key}.embedded-connect-timeout-ms"),
            self.embedded_connect_timeout_ms,
            500,
            60_000,
            "",
        );
    }
}
