//! TLS to the broker: the rustls client configuration from `tls.ca-file` and the
//! optional client certificate and key.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::settings::TlsSettings;
use super::MqttError;

/// The client configuration for `tls`; `resolve` makes config-relative paths usable.
pub(super) fn rustls_config(
    tls: &TlsSettings,
    resolve: &impl Fn(&Path) -> PathBuf,
) -> Result<rustls::ClientConfig, MqttError> {
    let read = |p: &Path| -> Result<Vec<u8>, MqttError> {
        let p = resolve(p);
        std::fs::read(&p).map_err(|error| MqttError::Io { path: p, error })
    };
    let tls_err = |p: &Path, m: String| MqttError::Tls {
        path: resolve(p),
        message: m,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read(&tls.ca_file)?;
    for cert in rustls_pemfile::certs(&mut BufReader::new(&ca[..])) {
        let cert = cert.map_err(|e| tls_err(&tls.ca_file, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls_err(&tls.ca_file, "no PEM certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs = rustls_pemfile::certs(&mut BufReader::new(&read(cert)?[..]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert, e.to_string()))?;
            let key = rustls_pemfile::private_key(&mut BufReader::new(&read(key)?[..]))
                .map_err(|e| tls_err(key, e.to_string()))?
                .ok_or_else(|| tls_err(key, "no PEM private key found".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(cert, e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(c), None) | (None, Some(c)) => {
            Err(tls_err(c, "client-cert and client-key go together".into()))
        }
    }
}
