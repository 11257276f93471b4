//! `[http]`: the local web page, its JSON API and Prometheus `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{LoadedConfig, Problems};

/// The HTTP server. Absent: no server. Bound to loopback it may run without
/// credentials; bound to anything else it must have them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on, such as `127.0.0.1:8480` or `[::]:8480`.
    pub listen: String,
    /// A file holding the access token (first line; at least 16 characters). Clients
    /// send it as `Authorization: Bearer <token>` or as the password of HTTP Basic
    /// authentication (any user name). Relative to the config file; must not be
    /// readable by others (mode 0640 or stricter).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The largest request body accepted (zone edits, enrolment, image uploads).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Connections served at once; more wait in the kernel's backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Whether the zone editor may rewrite the config file. Off: the editor shows the
    /// zones read-only and saving is refused.
    #[serde(default = "default_edit")]
    pub edit: bool,
}

fn default_max_body_bytes() -> usize {
    4 << 20
}
fn default_max_connections() -> usize {
    64
}
fn default_edit() -> bool {
    true
}

/// The shortest token accepted: 16 characters leave no room for guessing over a network.
pub const MIN_TOKEN_LEN: usize = 16;

impl HttpConfig {
    /// The listen address; `None` when it does not parse (validation says so).
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        match self.address() {
            None => problems.push(
                format!("{key}.listen"),
                format!(
                    "{:?}: expected address:port, such as \"127.0.0.1:8480\" or \"[::]:8480\"",
                    self.listen
                ),
            ),
            Some(a) if !a.ip().is_loopback() && self.token_file.is_none() => problems.push(
                format!("{key}.token-file"),
                format!(
                    "required when {key}.listen ({}) is not a loopback address: anyone on \
                     the network could otherwise edit zones and read the cameras",
                    self.listen
                ),
            ),
            Some(_) => {}
        }
        if let Some(p) = &self.token_file {
            let path = loaded.resolve(p);
            match crate::fsutil::check_secret_file(&path).and_then(|()| read_token(&path)) {
                Ok(_) => {}
                Err(e) => problems.push(format!("{key}.token-file"), e),
            }
        }
        problems.between(
            format!("{key}.max-body-bytes"),
            self.max_body_bytes as u64,
            1024,
            64 << 20,
            "",
        );
        problems.between(
            format!("{key}.max-connections"),
            self.max_connections as u64,
            1,
            4096,
            "",
        );
    }
}

/// The token in `path`: its first line, trimmed, at least [`MIN_TOKEN_LEN`] characters.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "{}: the token (first line) must have at least {MIN_TOKEN_LEN} characters, has {}",
            path.display(),
            token.chars().count()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::config::Config;

    fn problems(text: &str) -> Vec<(String, Option<usize>, String)> {
        match Config::from_text(
            std::path::Path::new("/etc/shelfwatch/shelfwatch.toml"),
            text,
        ) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|p| (p.key, p.line, p.message))
                    .collect()
            }
        }
    }

    #[test]
    fn beyond_loopback_a_token_is_required_and_the_key_and_line_are_named() {
        let p = problems("[http]\nlisten = \"0.0.0.0:8480\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].0.as_str(), p[0].1), ("http.token-file", Some(1)));
        assert!(p[0].2.contains("not a loopback address"), "{p:?}");
        for ok in ["127.0.0.1:8480", "[::1]:0", "127.0.0.53:80"] {
            assert!(
                problems(&format!("[http]\nlisten = {ok:?}\n")).is_empty(),
                "{ok}"
            );
        }
    }

    #[test]
    fn an_address_that_does_not_parse_is_named() {
        let p = problems("[http]\nlisten = \"localhost\"\nmax-connections = 0\n");
        let keys: Vec<_> = p.iter().map(|p| (p.0.as_str(), p.1)).collect();
        assert_eq!(
            keys,
            [("http.listen", Some(2)), ("http.max-connections", Some(3))]
        );
    }

    #[test]
    fn a_token_file_must_be_private_and_hold_a_long_enough_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let text = format!("[http]\nlisten = \"[::]:8480\"\ntoken-file = {file:?}\n");
        assert!(problems(&text)[0].2.contains("No such file"));
        std::fs::write(&file, "short\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            problems(&text)[0]
                .2
                .contains("at least 16 characters, has 5"),
            "{:?}",
            problems(&text)
        );
        std::fs::write(&file, "0123456789abcdefXYZ\nsecond line ignored\n").unwrap();
        assert!(problems(&text).is_empty());
        assert_eq!(super::read_token(&file).unwrap(), "0123456789abcdefXYZ");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).unwrap();
        let p = problems(&text);
        assert_eq!(p[0].0, "http.token-file");
        assert!(p[0].2.contains("world-readable"), "{p:?}");
    }
}
