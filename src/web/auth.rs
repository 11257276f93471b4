//! Who may use the server: with a token configured, every request must carry it (bearer
//! or HTTP Basic password); without one (loopback only, enforced by the config check),
//! the Host header must name loopback, so a web page elsewhere cannot reach the server
//! through a DNS name rebound to 127.0.0.1.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

/// Equal in time whatever the first difference: a token is not guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request presents: `Bearer <token>`, or Basic with it as the password.
fn presented(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, pass)| pass.to_owned());
    }
    None
}

/// Whether a Host header names this machine's loopback: `localhost`, `127.x.y.z` or
/// `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// None when the request may go on; otherwise the refusal.
pub fn check(token: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    match token {
        Some(token) => match presented(headers) {
            Some(p) if same(p.as_bytes(), token.as_bytes()) => None,
            _ => Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Basic realm=\"shelfwatch\", charset=\"UTF-8\"")],
                    "401 unauthorized: send the token of http.token-file (Bearer, or as the Basic password)\n",
                )
                    .into_response(),
            ),
        },
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            (!loopback_host(host)).then(|| {
                (
                    StatusCode::FORBIDDEN,
                    "403 forbidden: without http.token-file the server answers only requests to a loopback host name\n",
                )
                    .into_response()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TOKEN: &str = "0123456789abcdef-token";

    #[test]
    fn the_token_is_accepted_as_bearer_or_basic_password_and_nothing_else() {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{TOKEN}"));
        for ok in [format!("Bearer {TOKEN}"), format!("Basic {basic}")] {
            assert!(
                check(Some(TOKEN), &headers(&[(header::AUTHORIZATION, &ok)])).is_none(),
                "{ok}"
            );
        }
        let wrong = base64::engine::general_purpose::STANDARD.encode("anyone:guess");
        for bad in [
            "Bearer 0123456789abcdef-tokeX".to_owned(),
            format!("Basic {wrong}"),
            "Basic !!!".to_owned(),
            TOKEN.to_owned(),
        ] {
            let r = check(Some(TOKEN), &headers(&[(header::AUTHORIZATION, &bad)])).unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad}");
            assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        assert_eq!(
            check(Some(TOKEN), &HeaderMap::new()).unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn without_a_token_only_loopback_host_names_are_answered() {
        for host in [
            "127.0.0.1:8480",
            "localhost",
            "LOCALHOST:80",
            "[::1]:8480",
            "127.0.0.2",
        ] {
            assert!(
                check(None, &headers(&[(header::HOST, host)])).is_none(),
                "{host}"
            );
        }
        for host in ["evil.example:8480", "192.168.1.5", "[fe80::1]:80", ""] {
            let r = check(None, &headers(&[(header::HOST, host)])).unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{host}");
        }
    }
}
